"""Continual run reports: report.json, report.md (the accuracy matrix, its summary, each experience's
training) and matrix.png, the matrix as a heatmap."""

from pathlib import Path

from tunelab.io import atomic_write_json, atomic_write_text
from tunelab.report import save_figure

WORDS = {"average": "average final score", "newest": "newest experience", "backward_transfer": "backward transfer",
         "forgetting": "forgetting", "forward_transfer": "forward transfer"}


def write_report(out, report: dict) -> None:
    out = Path(out)
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", markdown(report))
    plot_matrix(out / "matrix.png", report)


def _pct(v) -> str:
    return "–" if v is None else f"{v * 100:.2f}"


def _signed(v) -> str:
    return "–" if v is None else f"{v * 100:+.2f}"


def matrix_markdown(r: dict) -> str:
    """The accuracy matrix (rows: after experience i; columns: experience j) and its summary, in points."""
    names = [e["name"] for e in r["experiences"]]
    rows = ["joint"] if len(r["matrix"]) == 1 and len(names) > 1 else names
    lines = ["| after \\ on | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for after, row in zip(rows, r["matrix"]):
        lines.append(f"| {after} | " + " | ".join(_pct(v) for v in row) + " |")
    if any(v is not None for v in r.get("reference") or []):
        lines.append("| alone (reference) | " + " | ".join(_pct(v) for v in r["reference"]) + " |")
    s = r["summary"]
    lines += ["", "| " + " | ".join(WORDS[k] for k in WORDS) + " |", "|" + "---:|" * len(WORDS),
              "| " + " | ".join((_pct if k in ("average", "newest") else _signed)(s.get(k)) for k in WORDS) + " |"]
    return "\n".join(lines)


def markdown(r: dict) -> str:
    t = r["tune"]
    lines = [f"# tunelab report: continual learning with {r['model']}", "",
             f"Strategy {r['strategy']}; seed {r['seed']}; {t['method']} tuning, {t['trainable_params']:,} of "
             f"{t['total_params']:,} parameters trainable at the end. {r['train_seconds']:.0f} s of training "
             f"({r['wall_seconds']:.0f} s wall, evaluation included)" +
             (f", peak memory {r['peak_memory_mb']:.0f} MB" if r.get("peak_memory_mb") else "") + ".", "",
             "| # | experience | task | head | labels | train / dev / test |", "|---|---|---|---|---|---|"]
    for i, e in enumerate(r["experiences"]):
        s = e["sizes"]
        labels = ", ".join(e["labels"][:8]) + (" ..." if len(e["labels"]) > 8 else "")
        lines.append(f"| {i} | {e['name']} | {e['task']} | {e['head']} | {labels} | "
                     f"{s['train']} / {s['dev']} / {s['test']} |")
    lines += ["", "## Accuracy matrix", "",
              "Row i: the model after experience i; column j: experience j's score (0-100: entity micro-F1, "
              "macro-F1, ...) on its own " + ("test" if all(e["eval_split"] == "test" for e in r["experiences"])
                                                  else "dev" if all(e["eval_split"] == "dev" for e in r["experiences"])
                                                  else "test (dev where it has none)") +
              " data, with the labels that experience has. Selection within each experience is on its dev split.",
              "", matrix_markdown(r), "", "![accuracy matrix](matrix.png)", "",
              "Backward transfer: the final score minus the score right after learning, averaged over the "
              "earlier experiences (negative: forgotten). Forgetting: the drop from each earlier experience's "
              "best. Forward transfer: each later experience's score in the sequence minus its score trained "
              "alone (continual.reference=true).", "", "## Training per experience", "",
              "| experience | steps | best step | dev | seconds | tokens/s | peak MB | loss terms |",
              "|---|---:|---:|---:|---:|---:|---:|---|"]
    for p in r["phases"]:
        terms = ", ".join(f"{k[5:]} {v:.4g}" for k, v in p["terms"].items()) or "–"
        lines.append(f"| {p['name']} | {p['steps']} | {p['best_step'] if p['best_step'] is not None else '–'} | "
                     f"{_pct(p['dev'])} | {p['train_seconds']:.0f} | {p['tokens_per_second']:.0f} | "
                     f"{p['peak_memory_mb'] or 0:.0f} | {terms} |")
    return "\n".join(lines) + "\n"


def plot_matrix(path, r: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [e["name"] for e in r["experiences"]]
    rows = ["joint"] if len(r["matrix"]) == 1 and len(names) > 1 else names
    m = np.array([[np.nan if v is None else v * 100 for v in row] for row in r["matrix"]], dtype=float)
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(names), 1.2 + 0.8 * len(rows)))
    im = ax.imshow(m, vmin=0, vmax=100, cmap="viridis")
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            if not np.isnan(m[i, j]):
                ax.text(j, i, f"{m[i, j]:.1f}", ha="center", va="center", color="white" if m[i, j] < 60 else "black")
    ax.set_xticks(range(len(names)), names)
    ax.set_yticks(range(len(rows)), [f"after {n}" for n in rows])
    ax.set_xlabel("evaluated on")
    ax.set_title(f"continual: {r['strategy']}")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    save_figure(fig, path)
