"""Hyper-parameter search with a fixed CPU budget on CoNLL-2003 NER (the packaged all-MiniLM-L6-v2), low-resource
slice (the first N training sentences), one search after the other:

  (a) full fine-tuning: `tunelab search` over lr, warmup, epochs, dropout, weight decay
      (recipes/search/conll2003_full.yaml) against the shipped recipe's settings (recipes/conll2003_quick.yaml:
      lr 1e-4, warmup 0.1, dropout and weight decay as shipped) with the same epochs as the robust bench;
  (b) LoRA: `tunelab search` over rank, alpha, target modules, lr, adapter dropout
      (recipes/search/conll2003_lora.yaml) against (a)'s chosen full fine-tuning.

Trials select on the dev split (its first --max-dev sentences, to keep trials cheap); the chosen configuration
of each search is trained again with seeds 1, 2, 3 (--rerun-top 1) and the test split is evaluated once on
those models, at the end. The baseline is trained with the same seeds. Reported: dev and test entity
micro-F1 (mean ± sd over seeds), trainable parameters, peak memory (RSS of a fresh process training the
choice with seed 1; the baseline's own runs) and train time of the runs.

    .venv/bin/python bench/search.py --trials 16 --out bench/results/search.json

Smoke test: --trials 2 --max-train 200 --max-dev 100 --epochs 1
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QUICK, LORA = ROOT / "recipes" / "conll2003_quick.yaml", ROOT / "recipes" / "conll2003_lora.yaml"
SPACES = {"full": ROOT / "recipes" / "search" / "conll2003_full.yaml",
          "lora": ROOT / "recipes" / "search" / "conll2003_lora.yaml"}
SEEDS = (1, 2, 3)


def tunelab(*argv: str, env: dict) -> None:
    subprocess.run([sys.executable, "-m", "tunelab", *argv], cwd=ROOT, env=env, check=True)


def common(args) -> list[str]:
    return [f"data.max_train_examples={args.max_train}", f"data.max_eval_examples={args.max_dev}",
            f"train.threads={args.threads}", "track.tensorboard=false"]


def run_stats(folders) -> dict:
    """Dev/test/params/memory/time of finished runs (test: the report's, or the search's test-once scores)."""
    reports = [json.loads((Path(f) / "report.json").read_text()) for f in folders]
    return {"trainable": reports[0]["tune"]["trainable_params"], "total": reports[0]["tune"]["total_params"],
            "peak_memory_mb": max(r["peak_memory_mb"] for r in reports),
            "train_seconds": statistics.mean(r["train_seconds"] for r in reports),
            "dev": [max(e["dev"] for e in r["evals"]) for r in reports]}


def baseline(args, work: Path, env: dict) -> dict:
    folders = []
    for seed in SEEDS:
        out = work / f"baseline-{seed}"
        if not (out / "report.json").is_file():
            tunelab("train", str(QUICK), *common(args), f"train.epochs={args.epochs}", f"train.seed={seed}",
                    f"output_dir={out}", "--overwrite", env=env)
        folders.append(out)
    row = run_stats(folders)
    row["test"] = [json.loads((f / "report.json").read_text())["test"]["main"] for f in folders]
    row["config"] = "shipped quick recipe (lr 1e-4, warmup 0.1)"
    return row


def searched(name: str, recipe: Path, args, work: Path, env: dict) -> dict:
    out = work / f"search-{name}"
    t0 = time.perf_counter()
    extra = ["tune.merge=false"] if name == "lora" else []  # no merged copy per trial
    tunelab("search", str(recipe), *common(args), *extra, f"train.epochs={args.epochs}", "--space", str(SPACES[name]),
            "--trials", str(args.trials), "--out", str(out), "--pruner", "median", "--seed", "0",
            "--rerun-top", "1", "--rerun-seeds", ",".join(map(str, SEEDS)), env=env)
    doc = json.loads((out / "search.json").read_text())
    chosen = doc["chosen"]["trial"]
    folders = [r["folder"] for r in doc["reruns"] if r["trial"] == chosen and r["seed"] in SEEDS]
    row = run_stats(folders)
    by_folder = {r["folder"]: r["score"] for r in doc["test"]["runs"]}
    row["test"] = [by_folder[f] for f in folders]
    row["config"] = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                              for k, v in doc["chosen"]["params"].items())
    row["search_seconds"] = time.perf_counter() - t0
    # Peak memory of the choice in a process of its own (the search's process held every trial before it)
    fresh = work / f"fresh-{name}"
    tunelab("train", str(out / "best.yaml"), f"output_dir={fresh}", "train.seed=1", "--overwrite", env=env)
    row["peak_memory_mb"] = json.loads((fresh / "report.json").read_text())["peak_memory_mb"]
    row["trials"] = {s: sum(1 for t in doc["trials"] if t["state"] == s) for s in ("COMPLETE", "PRUNED", "FAIL")}
    return row


def cell(values) -> str:
    values = [v * 100 for v in values]
    return f"{statistics.mean(values):.2f}" + (f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else "")


def table(rows: dict) -> str:
    lines = ["| run | configuration | dev F1 (seeds 1-3) | test F1 (seeds 1-3) | trained params | peak RSS | train s |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['config']} | {cell(r['dev'])} | {cell(r['test'])} | "
                     f"{r['trainable']:,} ({100 * r['trainable'] / r['total']:.2f} %) | {r['peak_memory_mb']:.0f} MB "
                     f"| {r['train_seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=16)
    p.add_argument("--max-train", type=int, default=1404, help="the first N training sentences (10 %%)")
    p.add_argument("--max-dev", type=int, default=1000, help="the first N dev sentences trials select on")
    p.add_argument("--epochs", type=int, default=3, help="the baseline's epochs (the searches choose their own)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", help="keep the runs here (default: a temporary folder)")
    p.add_argument("--out", help="write the rows and the table here (JSON)")
    args = p.parse_args()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    with tempfile.TemporaryDirectory(prefix="bench_search_") as tmp:
        work = Path(args.work or tmp)
        rows = {"baseline (full)": baseline(args, work, env),
                "search (full)": searched("full", QUICK, args, work, env),
                "search (LoRA)": searched("lora", LORA, args, work, env)}
    print(table(rows))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows, "table": table(rows)}, indent=2) + "\n")


if __name__ == "__main__":
    main()
