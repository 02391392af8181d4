"""`tunelab runs DIR` and `tunelab compare RUN...`: what was trained, and how runs compare.

A run is a folder with the resolved config.yaml and either report.json (finished) or a resumable checkpoint
(interrupted or still training). Curves are read from the run's own report or checkpoint state (the history
and dev evaluations), under the names TensorBoard shows: "train/loss", "train/lr", "dev/main" (what model
selection maximises; the aggregate of a multi-task run), "dev/micro/f1", "dev/NER_TASK/micro/f1", ...
Single-task reports hold `dev` as a metrics dict; multi-task reports hold `dev` as the aggregate and each
task's metrics under `tasks`; both are read.
"""

import json
import os
from pathlib import Path

import yaml

from tunelab.errors import TunelabError
from tunelab.track import metric_scalars

SKIP = {"tensorboard", "checkpoint", ".checkpoint.old", ".checkpoint.tmp", "merged", "mlruns", ".model.tmp"}


def _state_file(folder: Path) -> Path | None:
    for name in ("checkpoint", ".checkpoint.old"):
        if (folder / name / "state.json").is_file():
            return folder / name / "state.json"
    return None


CONTINUAL_STATE = "continual.json"  # a continual run's progress (tunelab.continual.train.STATE)


def is_run(folder: Path) -> bool:
    return (folder / "config.yaml").is_file() and ((folder / "report.json").is_file() or _state_file(folder) is not None
                                                   or (folder / CONTINUAL_STATE).is_file())


def find_runs(root) -> list[Path]:
    """Every run folder at or under `root`, sorted by path."""
    root = Path(root)
    if not root.is_dir():
        raise TunelabError(f"{root}: no such folder")
    found = []
    for here, dirs, _ in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP)
        if is_run(Path(here)):
            found.append(Path(here))
    return found


def load_run(folder) -> dict:
    """config, report (None while unfinished) and the training state (history, evals) of one run folder."""
    folder = Path(folder)
    if not is_run(folder):
        inside = find_runs(folder) if folder.is_dir() else []
        hint = (f"; it holds {len(inside)} run(s): " + ", ".join(str(p) for p in inside[:5]) +
                (" ..." if len(inside) > 5 else "")) if inside else ""
        raise TunelabError(f"{folder} is not a tunelab run folder (it needs config.yaml and report.json, or a "
                           f"checkpoint of an unfinished run){hint}")
    config = yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8")) or {}
    report = json.loads((folder / "report.json").read_text()) if (folder / "report.json").is_file() else None
    unfinished = _state_file(folder) or folder / CONTINUAL_STATE
    state = report if report is not None else json.loads(unfinished.read_text())
    return {"path": folder, "config": config, "report": report, "state": state}


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def curves(run: dict) -> dict[str, list[tuple[int, float]]]:
    """Every metric of a run as (step, value) points, under the names TensorBoard uses."""
    out: dict[str, list] = {}

    def add(step, scalars):
        for k, v in scalars.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out.setdefault(k, []).append((step, float(v)))

    for h in run["state"].get("history", []):
        add(h["step"], {f"train/{k}": h.get(k) for k in ("loss", "lr", "grad_norm", "tokens_per_second",
                                                           "samples_per_second", "peak_memory_mb")})
        add(h["step"], {f"train/loss/{n}": v for n, v in (h.get("tasks") or {}).items()})
    if run["config"].get("task") == "rl":  # RL: per-rollout scalars and held-out evaluations (rl/, held_out/)
        for h in run["state"].get("history", []):
            add(h["step"], {f"rl/{k}": v for k, v in h.items() if k != "step"})
            add(h["step"], {f"rl/reward_{n}": v for n, v in (h.get("parts") or {}).items()})
        for e in run["state"].get("evals", []):
            add(e["step"], {f"held_out/{k}": v for k, v in e.items() if k != "step"})
        return out
    for e in run["state"].get("evals", []):
        add(e["step"], {"dev/main": e.get("dev")})
        if "metrics" in e:  # single task
            add(e["step"], metric_scalars("dev", e["metrics"]))
        for n, m in (e.get("tasks") or {}).items():  # multi-task: per task, and its 0-1 score
            add(e["step"], metric_scalars(f"dev/{n}", m))
        add(e["step"], {f"dev/score/{n}": v for n, v in (e.get("scores") or {}).items()})
    report = run["report"] or {}
    last = report.get("steps", 0)
    if isinstance(report.get("test"), dict):
        add(last, metric_scalars("test", report["test"]))
    for n, entry in (report.get("tasks") or {}).items():
        if isinstance(entry, dict) and entry.get("test"):
            add(last, metric_scalars(f"test/{n}", entry["test"]))
    return out


def best(name: str, points: list) -> float:
    """The best value of a metric: the lowest for losses, perplexities and costs, the highest otherwise."""
    values = [v for _, v in points]
    lower = any(w in name for w in ("loss", "perplexity", "memory", "seconds", "grad_norm"))
    return min(values) if lower else max(values)


def summary(run: dict) -> dict:
    """One row of `tunelab runs`: key config and best metrics."""
    cfg, report, state = run["config"], run["report"], run["state"]
    dev = report.get("dev") if report else state.get("best")
    dev_main = dev.get("main") if isinstance(dev, dict) else dev
    test = report.get("test") if report else None
    if report and report.get("tasks"):  # multi-task: the tasks' test scores
        test = {n: e["test"]["main"] for n, e in report["tasks"].items() if isinstance(e, dict) and e.get("test")}
    elif isinstance(test, dict):
        test = test.get("main")
    lr, epochs = _get(cfg, "train.lr"), _get(cfg, "train.epochs")
    if cfg.get("task") == "rl":  # "dev": the held-out mean reward after (or at the last evaluation)
        evals = state.get("evals") or [{}]
        dev_main, test = (report["after"] if report else evals[-1]).get("reward"), None
        lr, epochs = _get(cfg, "rl.lr"), None
    if cfg.get("task") == "continual":  # "test": the accuracy matrix's summary (after every experience)
        n = len(cfg.get("experiences") or {})
        dev_main, test = None, {k: v for k, v in (report or {}).get("summary", {}).items() if v is not None} or None
        return {"run": str(run["path"]), "status": "finished" if report else
                f"unfinished (experience {state.get('done', 0)}/{n})", "task": "continual",
                "model": _get(cfg, "model.name"), "method": f"{_get(cfg, 'tune.method')} {_get(cfg, 'continual.strategy')}",
                "lr": lr, "epochs": epochs, "seed": _get(cfg, "train.seed"),
                "steps": sum(p["steps"] for p in state.get("phases", [])), "best_step": None, "dev": dev_main,
                "test": test}
    steps, total = state.get("step", state.get("steps")), report.get("total_steps") if report else None
    return {"run": str(run["path"]), "status": "finished" if report else f"unfinished (step {steps})",
            "task": cfg.get("task"), "model": _get(cfg, "model.name"), "method": _get(cfg, "tune.method"),
            "lr": lr, "epochs": epochs, "seed": _get(cfg, "train.seed"),
            "steps": f"{steps}/{total}" if total else steps, "best_step": state.get("best_step"),
            "dev": dev_main, "test": test}


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return ", ".join(f"{k} {_cell(x)}" for k, x in v.items())
    return "-" if v is None else str(v).replace("|", "\\|")


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return ""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_cell(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def list_runs(root) -> list[dict]:
    return [summary(load_run(p)) for p in find_runs(root)]


def compare(folders, metrics=None, png=None) -> list[dict]:
    """Rows of key config and, per metric, its best and last value; with `png` also the curves overlaid
    (a panel per metric, a line per run). Default metrics: train/loss and dev/main (RL runs: rl/reward and
    held_out/reward)."""
    runs = [load_run(f) for f in folders]
    data = [curves(r) for r in runs]
    rl = all(r["config"].get("task") == "rl" for r in runs)
    metrics = list(metrics or (["rl/reward", "held_out/reward"] if rl else ["train/loss", "dev/main"]))
    for r, c in zip(runs, data):
        missing = [m for m in metrics if m not in c]
        if missing:
            raise TunelabError(f"{r['path']}: no metric {', '.join(missing)}; this run has: "
                               + ", ".join(sorted(c)))
    rows = []
    for r, c in zip(runs, data):
        s = summary(r)
        row = {k: s[k] for k in ("run", "task", "method", "lr", "epochs", "seed", "steps")}
        for m in metrics:
            row[f"{m} best"] = best(m, c[m])
            row[f"{m} last"] = c[m][-1][1]
        rows.append(row)
    if png:
        plot(png, [str(r["path"]) for r in runs], data, metrics)
    return rows


def plot(path, names: list[str], data: list[dict], metrics: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tunelab.report import save_figure

    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.8), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        for name, c in zip(names, data):
            pts = c[m]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if len(pts) < 30 else None, lw=1,
                    label=Path(name).name)
        ax.set(title=m, xlabel="step")
        if m.startswith("train/loss"):
            ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, Path(path))
