"""How many trials at once on one machine, with how many torch threads each: `tunelab search --workers K
--threads T` on the same small study (MiniLM, CoNLL-2003, the first 300 training sentences, a fixed step budget
per trial, no pruning), timed end to end for each (K, T). The default of tunelab search is T = cores / K;
K x T above the cores oversubscribes them.

    .venv/bin/python bench/search_workers.py --trials 6 --out bench/results/search_workers.json
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPACE = "train.lr: {type: loguniform, low: 5.0e-5, high: 5.0e-4}\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=6)
    p.add_argument("--steps", type=int, default=30, help="each trial's step budget")
    p.add_argument("--settings", default="1x2,2x1,2x2", help="K workers x T threads, comma-separated")
    p.add_argument("--out")
    args = p.parse_args()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_workers_") as tmp:
        space = Path(tmp) / "space.yaml"
        space.write_text(SPACE)
        for setting in args.settings.split(","):
            k, t = map(int, setting.split("x"))
            out = Path(tmp) / setting
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "tunelab", "search", str(ROOT / "recipes" / "conll2003_quick.yaml"),
                            "data.max_train_examples=300", "data.max_eval_examples=200", "train.eval_every=10",
                            "track.tensorboard=false", "--space", str(space), "--trials", str(args.trials),
                            "--out", str(out), "--pruner", "none", "--max-steps", str(args.steps),
                            "--workers", str(k), "--threads", str(t)], cwd=ROOT, env=env, check=True,
                           stdout=subprocess.DEVNULL)
            wall = time.perf_counter() - t0
            doc = json.loads((out / "search.json").read_text())
            done = sum(1 for r in doc["trials"] if r["state"] == "COMPLETE")
            rows.append({"workers": k, "threads": t, "trials": done, "wall_seconds": wall,
                         "trials_per_hour": done / wall * 3600,
                         "mean_trial_train_seconds": sum(r["train_seconds"] for r in doc["trials"]) / done})
            print(json.dumps(rows[-1]), flush=True)
    base = rows[0]["trials_per_hour"]
    lines = ["| workers x threads | trials | wall s | trials/hour | vs first | mean train s per trial |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['workers']} x {r['threads']} | {r['trials']} | {r['wall_seconds']:.0f} | {r['trials_per_hour']:.1f} "
              f"| {r['trials_per_hour'] / base:.2f}× | {r['mean_trial_train_seconds']:.1f} |" for r in rows]
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows, "table": "\n".join(lines)}, indent=2)
                                  + "\n")


if __name__ == "__main__":
    main()
