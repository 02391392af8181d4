"""NER results of a recipe over several seeds (and document-context settings): dev/test entity F1, per-type
test F1, training time and peak memory. Selection is on dev (best epoch); test is evaluated once per run.

    .venv/bin/python bench/ner_seeds.py --seeds 1 2 3 --contexts 0 1 --out bench/results/conll2003_seeds.json
    .venv/bin/python bench/ner_seeds.py --recipe recipes/msra_ner.yaml --contexts 0 --seeds 1 \
        --out bench/results/msra_seeds.json

Extra key=value arguments override the recipe (default recipes/conll2003_ner.yaml), e.g. train.epochs=3;
--tag names such a variant, so that several share one results file (its rows are grouped by tag).
"""

import argparse
import json
import resource
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # this checkout's tunelab (a worktree snapshot), not the one installed in .venv
    sys.path.insert(0, str(ROOT))

from tunelab.config import load_config  # noqa: E402
from tunelab.io import atomic_write_json  # noqa: E402
from tunelab.train import train  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="recipes/conll2003_ner.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--contexts", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--runs-dir", default="runs/ner_seeds")
    ap.add_argument("--out", default="bench/results/conll2003_seeds.json")
    ap.add_argument("--tag", default="", help="a name for this variant of the recipe (its overrides)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    results = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else {}
    for seed in args.seeds:  # seed-major: an interrupted run still has both settings for the first seeds
        for ctx in args.contexts:
            key = f"{args.tag + ' ' if args.tag else ''}context={ctx} seed={seed}"
            if key in results:  # finished earlier: the script can be re-run after an interruption
                continue
            out = Path(args.runs_dir) / f"{Path(args.recipe).stem}_{args.tag + '_' if args.tag else ''}ctx{ctx}_seed{seed}"
            cfg = load_config(args.recipe, [f"data.context_sentences={ctx}", f"train.seed={seed}",
                                            f"output_dir={out}", *args.overrides])
            rep = train(cfg, resume=True)
            results[key] = {"tag": args.tag, "recipe": args.recipe, "context": ctx, "seed": seed, "dev": rep["dev"],
                            "test": rep["test"], "best_step": rep["best_step"], "steps": rep["steps"],
                            "train_seconds": rep["train_seconds"], "tokens_per_second": rep["tokens_per_second"],
                            # (the process's peak so far: runs of one invocation are in rising order of it)
                            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                            "config": args.overrides}
            atomic_write_json(args.out, results)
            print(f"{key}: dev {rep['dev']['main'] * 100:.2f} test {rep['test']['main'] * 100:.2f}", file=sys.stderr)
    print(table(results))


def table(results: dict) -> str:
    def ms(xs):
        xs = [x * 100 for x in xs]
        return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else f"{xs[0]:.2f}"

    types = sorted({k for r in results.values() for k in r["test"]["per_type"]})
    lines = ["| variant | context sentences | seeds | dev F1 | test F1 | test P | test R | "
             + " | ".join(f"test {k}" for k in types) + " | train s/run | tokens/s |",
             "|---|---|---|" + "---:|" * (6 + len(types))]
    for tag, ctx in sorted({(r.get("tag", ""), r["context"]) for r in results.values()}):
        rs = [r for r in results.values() if r.get("tag", "") == tag and r["context"] == ctx]
        t = [r["test"] for r in rs]
        cells = [ms([r["dev"]["main"] for r in rs]), ms([x["main"] for x in t]),
                 ms([x["micro"]["precision"] for x in t]), ms([x["micro"]["recall"] for x in t])]
        cells += [ms([x["per_type"][k]["f1"] for x in t]) if all(k in x["per_type"] for x in t) else "" for k in types]
        secs = statistics.mean(r["train_seconds"] for r in rs)
        speed = statistics.mean(r["tokens_per_second"] for r in rs)
        lines.append(f"| {tag or 'recipe'} | {ctx} | {', '.join(str(r['seed']) for r in rs)} | " + " | ".join(cells)
                     + f" | {secs:.0f} | {speed:,.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
