"""Full CoNLL-2003 results with the packaged MiniLM: dev/test entity F1 over several seeds, with and
without document context. Selection is on dev (best epoch); test is evaluated once per run.

    .venv/bin/python bench/conll2003_seeds.py --seeds 1 2 3 --contexts 0 1 --out bench/results/conll2003_seeds.json

Extra key=value arguments override the recipe (recipes/conll2003_ner.yaml), e.g. train.epochs=3.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

from tunelab.config import load_config
from tunelab.io import atomic_write_json
from tunelab.train import train


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="recipes/conll2003_ner.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--contexts", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--runs-dir", default="runs/conll2003_seeds")
    ap.add_argument("--out", default="bench/results/conll2003_seeds.json")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    results = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else {}
    for seed in args.seeds:  # seed-major: an interrupted run still has both settings for the first seeds
        for ctx in args.contexts:
            key = f"context={ctx} seed={seed}"
            if key in results:  # finished earlier: the script can be re-run after an interruption
                continue
            out = Path(args.runs_dir) / f"ctx{ctx}_seed{seed}"
            cfg = load_config(args.recipe, [f"data.context_sentences={ctx}", f"train.seed={seed}",
                                            f"output_dir={out}", *args.overrides])
            rep = train(cfg, resume=True)
            results[key] = {"context": ctx, "seed": seed, "dev": rep["dev"], "test": rep["test"],
                            "best_step": rep["best_step"], "steps": rep["steps"],
                            "train_seconds": rep["train_seconds"], "tokens_per_second": rep["tokens_per_second"],
                            "config": args.overrides}
            atomic_write_json(args.out, results)
            print(f"{key}: dev {rep['dev']['main'] * 100:.2f} test {rep['test']['main'] * 100:.2f}", file=sys.stderr)
    print(table(results))


def table(results: dict) -> str:
    def ms(xs):
        xs = [x * 100 for x in xs]
        return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else f"{xs[0]:.2f}"

    lines = ["| context sentences | seeds | dev F1 | test F1 | test P | test R | test PER | test LOC | test ORG | "
             "test MISC | train s/run |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for ctx in sorted({r["context"] for r in results.values()}):
        rs = [r for r in results.values() if r["context"] == ctx]
        t = [r["test"] for r in rs]
        cells = [ms([r["dev"]["main"] for r in rs]), ms([x["main"] for x in t]),
                 ms([x["micro"]["precision"] for x in t]), ms([x["micro"]["recall"] for x in t])]
        cells += [ms([x["per_type"][k]["f1"] for x in t]) for k in ("PER", "LOC", "ORG", "MISC")]
        secs = statistics.mean(r["train_seconds"] for r in rs)
        lines.append(f"| {ctx} | {', '.join(str(r['seed']) for r in rs)} | " + " | ".join(cells) + f" | {secs:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
