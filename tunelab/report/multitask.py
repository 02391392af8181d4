"""Multi-task run reports: report.json, report.md with one section per task, curves.png with each task's
training loss and dev score beside the aggregate that selects the checkpoint."""

from pathlib import Path

from tunelab.io import atomic_write_json, atomic_write_text
from tunelab.report import metrics_table, samples_table, save_figure
from tunelab.tasks import task_type


def write_report(out, report: dict) -> None:
    out = Path(out)
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", markdown(report))
    plot_curves(out / "curves.png", report)


def _main(kind: str, m: dict) -> str:
    t = task_type(kind)
    return f"{t.main_name} {t.format_main(m)}"


def markdown(r: dict) -> str:
    t = r["tune"]
    lines = [f"# tunelab report: multi-task with {r['model']}", "",
             "Tasks: " + ", ".join(f"{n} ({e['task']})" for n, e in r["tasks"].items()) + "; one shared backbone. "
             f"Tuning: {t['method']}" + (" (one LoRA adapter per task)" if t["method"] == "lora" else "") +
             f", {t['trainable_params']:,} of {t['total_params']:,} parameters trained.", "",
             f"Sampling {r['sampling']}, mix {r['mix']}, loss weighting {r['weighting']}; selection on the dev "
             f"{'mean of task scores' if r['select'] == 'mean' else r['select'] + ' score'}. Seed {r['seed']}. "
             f"{r['steps']} of {r['total_steps']} steps" + (" (stopped early)" if r["stopped_early"] else "") +
             f", {r['train_seconds']:.0f} s of training, {r['tokens_per_second']:.0f} real tokens/s.", ""]
    if r.get("best_step") is not None:
        lines += [f"Selected checkpoint: step {r['best_step']}, dev aggregate {r['dev']:.4f}.", ""]
    if r.get("final_weights"):
        lines += ["Learned loss weights at the end (½·exp(−s)): " +
                  ", ".join(f"{n} {w:.3f}" for n, w in r["final_weights"].items()), ""]
    lines += ["| task | type | train / dev / test | weight | share of batches | dev | test |",
              "|---|---|---|---:|---:|---|---|"]
    for n, e in r["tasks"].items():
        s = e["sizes"]
        lines.append(f"| {n} | {e['task']} | {s['train']} / {s['dev']} / {s['test']} | {e['weight']:g} | "
                     f"{e['batch_share'] * 100:.1f} % | {_main(e['task'], e['dev']) if e['dev'] else '-'} | "
                     f"{_main(e['task'], e['test']) if e['test'] else '-'} |")
    lines.append("")
    for n, e in r["tasks"].items():
        lines += [f"## Task {n} ({e['task']})", ""]
        if e.get("data"):
            lines += [f"Data: {e['data']}", ""]
        for split in ("dev", "test"):
            if e.get(split):
                what = "selected checkpoint" if split == "dev" else "evaluated once, on the selected checkpoint"
                lines += [f"### {split.capitalize()} ({what})", "", metrics_table(e[split]), ""]
        if e.get("samples"):
            lines += ["### Sample outputs (greedy)", "", samples_table(e["samples"]), ""]
    lines += ["![training curves](curves.png)", ""]
    return "\n".join(lines)


def _smooth(xs: list[float], k: int) -> list[float]:
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= k:
            acc -= xs[i - k]
        out.append(acc / min(i + 1, k))
    return out


def plot_curves(path, r: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for n in r["tasks"]:
        pts = [(h["step"], h["tasks"][n]) for h in r["history"] if n in h["tasks"]]
        if pts:
            k = max(1, len(pts) // 50)
            axes[0].plot([p[0] for p in pts], _smooth([p[1] for p in pts], k), lw=0.9, label=n)
    axes[0].set(title="training loss per task (moving mean)", xlabel="step", yscale="log")
    axes[0].legend(fontsize=8)
    axes[1].plot([h["step"] for h in r["history"]], [h["lr"] for h in r["history"]])
    axes[1].set(title="learning rate", xlabel="step")
    if r["evals"]:
        steps = [e["step"] for e in r["evals"]]
        for n, e in r["tasks"].items():
            axes[2].plot(steps, [ev["scores"].get(n) for ev in r["evals"]], marker=".", lw=0.9,
                         label=f"{n} ({task_type(e['task']).score_name})")
        axes[2].plot(steps, [ev["dev"] for ev in r["evals"]], color="black", lw=1.6, label=f"selection ({r['select']})")
        if r.get("best_step"):
            axes[2].axvline(r["best_step"], color="grey", ls="--", lw=0.8)
        axes[2].legend(fontsize=8)
    axes[2].set(title="dev score per task", xlabel="step")
    fig.tight_layout()
    save_figure(fig, path)
