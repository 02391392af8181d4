"""Continual-learning strategies side by side with the packaged all-MiniLM-L6-v2, on two real sequences:

  tasks     task-incremental (recipes/continual_en.yaml): CoNLL-2003 NER -> BBC News topics -> Rotten
            Tomatoes sentiment, a head each on one shared encoder
  classes   class-incremental NER (recipes/continual_ner_classes.yaml): CoNLL-2003 sentences annotated for
            PER+LOC, then other sentences annotated for ORG+MISC, one head widened

Every run is `tunelab train RECIPE` with the same budget (the recipe's experiences, epochs, batch size, lr,
bf16, threads) and seed, in its own process, one after the other; only continual.* differs (and, for
`adapters`, LoRA r 16, alpha 64 on query/key/value/dense at lr --adapter-lr: the settings `tunelab search`
found on CoNLL-2003 dev, docs/benchmarks.md). Reported per strategy, mean ± std over the seeds: the
final average score, forgetting (the drop of each earlier experience from its best), backward transfer,
the newest experience's score, training and wall seconds and peak memory (the process's RSS), and each
seed's forgetting and newest-experience change against naive's (paired).

    .venv/bin/python bench/continual.py --sequence classes --strategies naive,ewc,replay,lwf,replay+lwf,joint \
        --seeds 1,2,3 --out bench/results/continual_classes.json
    .venv/bin/python bench/continual.py --sequence tasks \
        --strategies naive,ewc,replay,lwf,replay+lwf,adapters,joint --seeds 1,2,3 \
        --out bench/results/continual_tasks.json

A strategy is continual.strategy's value, optionally with EWC's lambda (`ewc:1e5`). --eval-split dev scores
the matrix on the dev splits (to choose settings such as lambda there; the tables report test). With --out,
each finished run is written at once and runs already there are kept: a killed bench continues.

Smoke test (minutes): --sequence classes --strategies naive,lwf --seeds 1 --max-train 200
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
RECIPES = {"tasks": ROOT / "recipes" / "continual_en.yaml", "classes": ROOT / "recipes" / "continual_ner_classes.yaml"}
EXPERIENCES = {"tasks": ["ner", "topic", "sentiment"], "classes": ["per_loc", "org_misc"]}


def overrides_of(strategy: str, args) -> list[str]:
    name, _, lam = strategy.partition(":")
    out = [f"continual.strategy={name}"]
    if lam:
        out.append(f"continual.ewc_lambda={float(lam)}")
    if "adapters" in name.split("+"):  # the LoRA settings tunelab search found on CoNLL-2003 dev
        out += ["tune.method=lora", f"train.lr={args.adapter_lr}", "tune.lora_r=16", "tune.lora_alpha=64",
                "tune.target_modules=[query,key,value,dense]"]
    return out


def run_one(sequence: str, strategy: str, seed: int, args, work: Path, env: dict) -> dict:
    out = work / f"{sequence}-{strategy.replace(':', '_').replace('+', '_')}-{seed}"
    overrides = [f"output_dir={out}", f"train.seed={seed}", f"train.threads={args.threads}",
                 f"continual.eval_split={args.eval_split}", *overrides_of(strategy, args)]
    if args.max_train:
        overrides += [f"experiences.{n}.data.max_train_examples={args.max_train}" for n in EXPERIENCES[sequence]]
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "tunelab", "train", str(RECIPES[sequence]), *overrides, "--overwrite"],
                   cwd=ROOT, env=env, check=True)
    wall = time.perf_counter() - t0
    r = json.loads((out / "report.json").read_text())
    return {"sequence": sequence, "strategy": strategy, "seed": seed, "matrix": r["matrix"], **r["summary"],
            "train_seconds": r["train_seconds"], "wall_seconds": wall, "peak_memory_mb": r["peak_memory_mb"],
            "eval_split": args.eval_split}


def _ms(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    m = statistics.mean(values) * 100
    return f"{m:.2f} ± {statistics.stdev(values) * 100:.2f}" if len(values) > 1 else f"{m:.2f}"


def table(rows: list[dict], sequence: str) -> str:
    rows = [r for r in rows if r["sequence"] == sequence]
    naive = {r["seed"]: r for r in rows if r["strategy"] == "naive"}
    base_train = statistics.mean([r["train_seconds"] for r in naive.values()]) if naive else None
    base_wall = statistics.mean([r["wall_seconds"] for r in naive.values()]) if naive else None
    lines = ["| strategy | seeds | final average | forgetting | backward transfer | newest | forgetting vs naive "
             "(paired) | newest vs naive (paired) | train s (× naive) | wall s (× naive) | peak RSS MB |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in dict.fromkeys(r["strategy"] for r in rows):
        mine = [r for r in rows if r["strategy"] == s]
        paired_f = [r["forgetting"] - naive[r["seed"]]["forgetting"] for r in mine
                    if r["seed"] in naive and r["forgetting"] is not None]
        paired_n = [r["newest"] - naive[r["seed"]]["newest"] for r in mine if r["seed"] in naive]
        train_s = statistics.mean(r["train_seconds"] for r in mine)
        wall_s = statistics.mean(r["wall_seconds"] for r in mine)
        lines.append(
            f"| {s} | {','.join(str(r['seed']) for r in mine)} | {_ms(r['average'] for r in mine)} | "
            f"{_ms(r['forgetting'] for r in mine)} | {_ms(r['backward_transfer'] for r in mine)} | "
            f"{_ms(r['newest'] for r in mine)} | {_ms(paired_f) if s != 'naive' else '–'} | "
            f"{_ms(paired_n) if s != 'naive' else '–'} | {train_s:.0f}"
            f"{f' ({train_s / base_train:.2f}×)' if base_train else ''} | {wall_s:.0f}"
            f"{f' ({wall_s / base_wall:.2f}×)' if base_wall else ''} | "
            f"{statistics.mean(r['peak_memory_mb'] or 0 for r in mine):.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sequence", choices=sorted(RECIPES), required=True)
    ap.add_argument("--strategies", default="naive,ewc,replay,lwf,replay+lwf,joint")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--adapter-lr", type=float, default=1.33e-3, help="train.lr of the adapters strategy (LoRA)")
    ap.add_argument("--eval-split", choices=["test", "dev"], default="test")
    ap.add_argument("--max-train", type=int, default=None, help="smoke tests: training examples per experience")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    rows = json.loads(args.out.read_text())["rows"] if args.out and args.out.is_file() else []
    with tempfile.TemporaryDirectory(prefix="continual-bench-") as tmp:
        for strategy in args.strategies.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                if any(r["sequence"] == args.sequence and r["strategy"] == strategy and r["seed"] == seed and
                       r["eval_split"] == args.eval_split for r in rows):
                    continue
                rows.append(run_one(args.sequence, strategy, seed, args, Path(tmp), env))
                if args.out:
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    args.out.write_text(json.dumps({"rows": rows}, indent=1))
                print(f"{args.sequence} {strategy} seed {seed}: average {rows[-1]['average']:.4f}, forgetting "
                      f"{rows[-1]['forgetting']}, newest {rows[-1]['newest']:.4f}", flush=True)
    print(table([r for r in rows if r["eval_split"] == args.eval_split], args.sequence))


if __name__ == "__main__":
    main()
