"""RL run reports: report.json, report.md (held-out before/after, samples side by side) and curves.png
(training reward, KL, entropy and the held-out reward by step)."""

from pathlib import Path

from tunelab.io import atomic_write_json, atomic_write_text
from tunelab.report import save_figure


def write_rl_report(out, report: dict) -> None:
    out = Path(out)
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", markdown(report))
    plot_curves(out / "curves.png", report)


ROWS = [("mean reward (one sample per prompt)", "reward", "{:.4f}"), ("mean reward, greedy", "greedy_reward", "{:.4f}"),
        ("KL to reference (nats per completion)", "kl", "{:.3f}"),
        ("perplexity under the reference", "ref_perplexity", "{:.2f}"), ("distinct-1", "distinct_1", "{:.3f}"),
        ("distinct-2", "distinct_2", "{:.3f}"), ("distinct-2, greedy", "greedy_distinct_2", "{:.3f}"),
        ("mean length (tokens)", "length", "{:.1f}")]


def before_after_table(before: dict, after: dict) -> str:
    rows = ["| held-out | before | after |", "|---|---:|---:|"]
    for label, key, fmt in ROWS:
        rows.append(f"| {label} | {fmt.format(before[key])} | {fmt.format(after[key])} |")
    for name in before["parts"]:
        rows.append(f"| reward part {name} | {before['parts'][name]:.4f} | {after['parts'][name]:.4f} |")
    return "\n".join(rows)


def _cell(text) -> str:
    return " ".join(str(text or "").split()).replace("|", "\\|")


def markdown(r: dict) -> str:
    s = r["settings"]
    t = r["tune"]
    lines = [f"# tunelab RL report: {r['estimator']} on {r['model']}", "",
             f"Data: {r['data']}", "",
             f"Start: {r['start']}. Rewards (weights): {r['rewards']}. Tuning: {t['method']}, "
             f"{t['trainable_params']:,} of {t['total_params']:,} parameters trained.", "",
             f"{r['steps']} steps of {s['prompts_per_step']} prompts x {s['samples_per_prompt']} samples "
             f"(temperature {s['temperature']}, top-p {s['top_p']}, at most {s['max_new_tokens']} new tokens), "
             f"lr {s['lr']}, KL coefficient {s['kl_coef']}" + (f" (adaptive, target {s['kl_target']})"
                                                             if s["kl_target"] else "")
             + f", seed {r['seed']}. {r['train_seconds']:.0f} s, of which rollouts {r['rollout_seconds']:.0f} s "
             f"({r['rollout_tokens_per_second']:.0f} sampled tokens/s).", "",
             f"## Held-out prompts ({r['sizes']['held_out']}), before and after", "",
             before_after_table(r["before"], r["after"]), "",
             "## Sample outputs (greedy), before and after", "",
             "| prompt | reference | before | after |", "|---|---|---|---|"]
    for x in r["samples"]:
        prompt = " ".join(x["prompt"].split()[:25]) + (" ..." if len(x["prompt"].split()) > 25 else "")
        lines.append(f"| {_cell(prompt)} | {_cell(x['reference'])} | {_cell(x['before'])} | {_cell(x['after'])} |")
    lines += ["", "![curves](curves.png)", ""]
    return "\n".join(lines)


def plot_curves(path, r: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist, evals = r["history"], r["evals"]
    steps = [h["step"] for h in hist]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    axes[0].plot(steps, [h["reward"] for h in hist], lw=0.8, label="training samples")
    axes[0].plot([e["step"] for e in evals], [e["reward"] for e in evals], marker="o", label="held-out")
    axes[0].set(title="mean reward", xlabel="step")
    axes[0].legend(fontsize=8)
    axes[1].plot(steps, [h["kl"] for h in hist], lw=0.8, label="training samples")
    axes[1].plot([e["step"] for e in evals], [e["kl"] for e in evals], marker="o", label="held-out")
    axes[1].set(title="KL to reference (per completion)", xlabel="step")
    axes[1].legend(fontsize=8)
    axes[2].plot(steps, [h["entropy"] for h in hist], lw=0.8)
    axes[2].set(title="policy entropy (per token)", xlabel="step")
    fig.tight_layout()
    save_figure(fig, path)
