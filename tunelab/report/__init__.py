"""Run reports: report.json (everything), report.md (for people), curves.png (loss, learning rate, dev
metric), confusion.png for classification."""

from pathlib import Path

from tunelab.io import atomic_write_json, atomic_write_text


def write_report(out, report: dict) -> None:
    out = Path(out)
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", markdown(report))
    plot_curves(out / "curves.png", report)
    for split in ("test", "dev"):
        if report.get(split) and "confusion" in report[split]:
            plot_confusion(out / "confusion.png", report[split]["confusion"], split)
            break


def metrics_table(m: dict) -> str:
    """Markdown table of one split's metrics (entity, classification or generation)."""
    if "predicted_tokens" in m:  # continued pre-training
        return (f"Loss {m['loss']:.4f} per predicted token, perplexity {m['perplexity']:.2f} ({m['predicted_tokens']} "
                f"tokens in {m['blocks']} blocks" + (f"; masked-token accuracy {m['masked_accuracy'] * 100:.2f}"
                                                      if "masked_accuracy" in m else "") + ")")
    if "perplexity" in m:
        return (f"Loss {m['loss']:.4f} per reference token, perplexity {m['perplexity']:.2f} "
                f"({m['target_tokens']} reference tokens, teacher forcing)" +
                (f"; {generation_line(m)}" if "bleu" in m else ""))
    if "per_type" in m:
        rows = ["| type | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
        for name, v in list(m["per_type"].items()) + [("**micro**", m["micro"]), ("macro", m["macro"])]:
            rows.append(f"| {name} | {v['precision'] * 100:.2f} | {v['recall'] * 100:.2f} | {v['f1'] * 100:.2f} "
                        f"| {v['support']} |")
        rows.append(f"\nToken accuracy (secondary): {m['token_accuracy'] * 100:.2f}")
        return "\n".join(rows)
    if "bleu" in m and "perplexity" not in m:  # (generation scored by outputs only)
        return generation_line(m)
    if "pearson" in m:
        return (f"Pearson r {m['pearson']:.4f}, Spearman rho {m['spearman']:.4f}, MSE {m['mse']:.4f}, "
                f"MAE {m['mae']:.4f} ({m['n']} examples)")
    if "exact_match" in m:
        return (f"Exact match {m['exact_match'] * 100:.2f}, F1 {m['f1'] * 100:.2f} ({m['questions']} questions, "
                f"{m['answerable']} with an answer; official SQuAD normalisation, best over the gold answers)")
    if "per_label" in m:
        rows = ["| label | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
        rows += [f"| {name} | {v['precision'] * 100:.2f} | {v['recall'] * 100:.2f} | {v['f1'] * 100:.2f} | "
                 f"{v['support']} |" for name, v in m["per_label"].items()]
        rows.append(f"\nMicro-F1 {m['micro_f1'] * 100:.2f}, macro-F1 {m['macro_f1'] * 100:.2f}, subset accuracy "
                    f"{m['subset_accuracy'] * 100:.2f} at threshold {m['threshold']} (best on these examples: "
                    f"{m['best_threshold']}, micro-F1 {m['best_threshold_micro_f1'] * 100:.2f})")
        return "\n".join(rows)
    rows = ["| class | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
    for name, v in m["per_class"].items():
        rows.append(f"| {name} | {v['precision'] * 100:.2f} | {v['recall'] * 100:.2f} | {v['f1'] * 100:.2f} "
                    f"| {v['support']} |")
    if "no_relation" in m:  # relation extraction: scored without the no-relation class
        return "\n".join(rows + [f"\nMicro-F1 {m['micro_f1'] * 100:.2f} and macro-F1 {m['macro_f1'] * 100:.2f} over "
                                 f"the relations (without {m['no_relation']!r}); accuracy {m['accuracy'] * 100:.2f}"])
    rows.append(f"\nAccuracy {m['accuracy'] * 100:.2f}, macro-F1 {m['macro_f1'] * 100:.2f}\n")
    labels = m["confusion"]["labels"]
    rows += ["Confusion (rows gold, columns predicted):", "", "| | " + " | ".join(labels) + " |",
             "|---" * (len(labels) + 1) + "|"]
    for lab, row in zip(labels, m["confusion"]["matrix"]):
        rows.append(f"| {lab} | " + " | ".join(map(str, row)) + " |")
    return "\n".join(rows)


def generation_line(m: dict) -> str:
    return (f"greedy outputs: sacreBLEU {m['bleu']:.2f}, chrF {m['chrf']:.2f}, ROUGE-L {m['rougeL']:.2f} "
            f"({m['outputs']} outputs)")


def samples_table(samples: list[dict]) -> str:
    """Generation samples as a Markdown table: prompt start, reference, output."""
    rows = ["| prompt (start) | reference | output |", "|---|---|---|"]
    for s in samples:
        cells = [" ".join(s["prompt"].split()[:25]) + " ...", s["reference"] or "", s["output"]]
        rows.append("| " + " | ".join(" ".join(c.split()).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows)


def markdown(r: dict) -> str:
    from tunelab.tasks import task_type

    kind = task_type(r["task"])
    main = kind.main_name
    lines = [f"# tunelab report: {r['task']} with {r['model']}", ""]
    if r.get("data"):
        lines += [f"Data: {r['data']}", ""]
    lines += [f"Examples: {r['sizes']['train']} train / {r['sizes']['dev']} dev / {r['sizes']['test']} test. "
              f"Seed {r['seed']}. {r['steps']} of {r['total_steps']} steps"
              + (" (stopped early)" if r["stopped_early"] else "") + f", {r['train_seconds']:.0f} s of training, "
              f"{r['tokens_per_second']:.0f} real tokens/s, padding {r['padding_share'] * 100:.1f} % of batch slots.",
              ""]
    if r.get("dev"):
        lines += [f"## Dev (selected checkpoint: step {r['best_step']}, {main} {kind.format_main(r['dev'])})", "",
                  metrics_table(r["dev"]), ""]
    if r.get("test"):
        lines += [f"## Test (evaluated once, on the selected checkpoint): {main} {kind.format_main(r['test'])}", "",
                  metrics_table(r["test"]), ""]
    if r.get("tune"):
        t = r["tune"]
        lines[2:2] = [f"Tuning: {t['method']}, {t['trainable_params']:,} of {t['total_params']:,} parameters trained "
                      f"({100 * t['trainable_params'] / max(1, t['total_params']):.3g} %).", ""]
    if r.get("samples"):
        lines += ["## Sample outputs (greedy)", "", samples_table(r["samples"]), ""]
    if robust_line(r):
        lines[2:2] = [robust_line(r), ""]
    lines += ["![training curves](curves.png)", ""]
    return "\n".join(lines)


def robust_line(r: dict) -> str:
    """One sentence on the run's `robust:` section and what it cost ('' when the section is the default)."""
    rb, parts = r.get("robust") or {}, []
    if rb.get("adversarial", "none") != "none":
        how = {"fgm": "", "pgd": f", alpha {rb['alpha']:g}, {rb['steps']} steps",
               "freelb": f", alpha {rb['alpha']:g}, {rb['steps']} steps"}[rb["adversarial"]]
        parts.append(f"adversarial training {rb['adversarial'].upper()} (epsilon {rb['epsilon']:g}{how})")
    if rb.get("rdrop"):
        parts.append(f"R-Drop (weight {rb['rdrop']:g})")
    if rb.get("augment"):
        ops = ", ".join(f"{k} {v:g}" for k, v in rb["augment"].items())
        parts.append(f"augmentation each epoch ({ops}; intensity {rb['augment_intensity']:g})")
    if not parts:
        return ""
    history = r.get("history") or []
    seen = []
    for key, what in (("perturb/loss", "adversarial loss"), ("perturb/delta_norm", "perturbation norm"),
                      ("term/rdrop", "R-Drop term")):
        values = [h[key] for h in history if key in h]
        if values:
            seen.append(f"{what} {sum(values) / len(values):.4f}")
    return "Robust training: " + "; ".join(parts) + "." + (f" Mean over the logged steps: {', '.join(seen)}."
                                                           if seen else "")


def robustness_markdown(doc: dict, main_name: str, data: str, plot: str | None = None) -> str:
    """`tunelab eval --perturb`'s result (clean, perturbed, drop, perturb) for people: the main score and each
    entity type's or class's F1, clean vs perturbed and the drop, and the chart if there is one."""
    clean, pert, how = doc["clean"], doc["perturbed"], doc["perturb"]
    ops = ", ".join(f"{k} {v:g}" for k, v in how["operations"].items())
    lines = [f"# Robustness: {data}", "",
             f"A perturbed copy of the data (operations with their probability per example: {ops}; intensity "
             f"{how['intensity']:g}; seed {how['seed']}) scored beside the clean data.", "",
             "| score | clean | perturbed | drop |", "|---|---:|---:|---:|",
             f"| **{main_name}** | {clean['main'] * 100:.2f} | {pert['main'] * 100:.2f} | {doc['drop'] * 100:.2f} |"]
    parts = clean.get("per_type") or clean.get("per_class") or {}
    other = pert.get("per_type") or pert.get("per_class") or {}
    for name in sorted(parts):
        a, b = parts[name]["f1"], other.get(name, {}).get("f1", 0.0)
        lines.append(f"| {name} F1 | {a * 100:.2f} | {b * 100:.2f} | {(a - b) * 100:.2f} |")
    if plot:
        lines += ["", f"![clean vs perturbed]({plot})"]
    return "\n".join(lines) + "\n"


def plot_curves(path, r: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = r["history"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    steps = [h["step"] for h in hist]
    axes[0].plot(steps, [h["loss"] for h in hist], lw=0.8)
    axes[0].set(title="training loss", xlabel="step", yscale="log")
    axes[1].plot(steps, [h["lr"] for h in hist])
    axes[1].set(title="learning rate", xlabel="step")
    from tunelab.tasks import task_type

    kind = task_type(r["task"])
    if r["evals"]:
        axes[2].plot([e["step"] for e in r["evals"]], [kind.curve_value(e["dev"]) for e in r["evals"]], marker="o")
        if r.get("best_step"):
            axes[2].axvline(r["best_step"], color="grey", ls="--", lw=0.8)
    axes[2].set(title=kind.curve_title, xlabel="step")
    fig.tight_layout()
    save_figure(fig, path)


def plot_confusion(path, conf: dict, split: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, m = conf["labels"], conf["matrix"]
    size = max(4, 0.6 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(m, cmap="Blues")
    ax.set(xticks=range(len(labels)), yticks=range(len(labels)), xlabel="predicted", ylabel="gold",
           title=f"confusion ({split})")
    ax.set_xticklabels(labels, rotation=45, ha="right")
    ax.set_yticklabels(labels)
    top = max(max(row) for row in m) or 1
    for i, row in enumerate(m):
        for j, v in enumerate(row):
            ax.text(j, i, v, ha="center", va="center", color="white" if v > top / 2 else "black", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def plot_robustness(path, clean: dict, perturbed: dict, title: str) -> None:
    """Clean vs perturbed scores as grouped bars: `main`, and each entity type's or class's F1 (NER per_type,
    classification per_class) where the metrics have them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = clean.get("per_type") or clean.get("per_class") or {}
    names = ["main"] + sorted(parts)
    other = perturbed.get("per_type") or perturbed.get("per_class") or {}

    def score(m, rows, n):
        return m["main"] if n == "main" else rows.get(n, {}).get("f1", 0.0)

    xs = range(len(names))
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(names) + 2), 3.6))
    ax.bar([x - 0.2 for x in xs], [score(clean, parts, n) for n in names], 0.4, label="clean")
    ax.bar([x + 0.2 for x in xs], [score(perturbed, other, n) for n in names], 0.4, label="perturbed")
    ax.set_xticks(list(xs), names)
    ax.set(title=title, ylabel="score (main; per-type or per-class F1)")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def save_figure(fig, path) -> None:
    import io

    import matplotlib.pyplot as plt

    from tunelab.io import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
