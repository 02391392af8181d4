"""Vocabulary trimming (model.trim_vocab) measured: the same recipe trained with the full 250k-piece
multilingual-e5-small vocabulary and with it trimmed, one fresh `tunelab train` process each, one after the
other. Reports training tokens/s, the process's peak RSS, the optimizer's parameter count, the saved
folder's size and dev/test F1 (which should agree: rows no text uses get no gradient either way).

    .venv/bin/python bench/trim_vocab.py --out bench/results/trim_vocab.json

Extra key=value arguments override the run (defaults: recipes/msra_ner.yaml on its first 3,000 training
sentences, 1 epoch, 2 threads).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULTS = ["data.max_train_examples=3000", "data.max_eval_examples=500", "train.epochs=1", "train.threads=2",
            "train.seed=1"]


def run_side(recipe: str, trim: bool, out: Path, overrides: list[str]) -> dict:
    cmd = [sys.executable, "-m", "tunelab", "train", recipe, f"model.trim_vocab={str(trim).lower()}",
           f"output_dir={out}", *DEFAULTS, *overrides, "--overwrite"]
    print(f"\n=== trim_vocab={trim} ===\n{' '.join(cmd)}", file=sys.stderr, flush=True)
    load_before = os.getloadavg()[0]
    proc = subprocess.Popen(cmd, cwd=str(ROOT))
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"trim_vocab={trim}: tunelab train failed (exit {os.waitstatus_to_exitcode(status)})")
    report = json.loads((out / "report.json").read_text())
    return {"trim_vocab": trim, "tokens_per_second": report["tokens_per_second"],
            "train_seconds": report["train_seconds"], "peak_rss_mib": usage.ru_maxrss / 1024,
            "parameters": report["tune"]["total_params"], "dev_f1": report["dev"]["main"], "test_f1": report["test"]["main"],
            "folder_mib": sum(f.stat().st_size for f in out.iterdir() if f.is_file()) / 2**20,
            "loadavg_1min": {"before": load_before, "after": os.getloadavg()[0]}}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="recipes/msra_ner.yaml")
    ap.add_argument("--runs-dir", default="runs/trim_vocab")
    ap.add_argument("--out", default="bench/results/trim_vocab.json")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    started = time.strftime("%Y-%m-%d %H:%M")
    sides = [run_side(args.recipe, trim, Path(args.runs_dir) / ("trimmed" if trim else "full"), args.overrides)
             for trim in (False, True)]
    full, trimmed = sides
    doc = {"started": started, "recipe": args.recipe, "overrides": DEFAULTS + args.overrides, "runs": sides,
           "speedup": trimmed["tokens_per_second"] / full["tokens_per_second"],
           "rss_ratio": trimmed["peak_rss_mib"] / full["peak_rss_mib"],
           "folder_ratio": trimmed["folder_mib"] / full["folder_mib"]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print("| vocabulary | parameters | tokens/s | train s | peak RSS MiB | saved folder MiB | dev F1 | test F1 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in sides:
        print(f"| {'trimmed' if r['trim_vocab'] else 'full 250k'} | {r['parameters'] / 1e6:.1f}M | "
              f"{r['tokens_per_second']:,.0f} | "
              f"{r['train_seconds']:.0f} | {r['peak_rss_mib']:,.0f} | {r['folder_mib']:,.0f} | "
              f"{r['dev_f1'] * 100:.2f} | {r['test_f1'] * 100:.2f} |")
    print(f"trimmed vs full: {doc['speedup']:.2f}x tokens/s, {doc['rss_ratio']:.2f}x peak RSS, "
          f"{doc['folder_ratio']:.2f}x folder")


if __name__ == "__main__":
    main()
