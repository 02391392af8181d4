"""The new task types on real data, each a shipped recipe run as a user runs it (`tunelab train RECIPE`, one
process per run, one after the other), test split once on the dev-selected weights:

  squad     extractive QA, recipes/squad_qa.yaml (MiniLM; SQuAD v1.1 dev split by article), then the same
            model on the SQuADShifts domains (`tunelab eval MODEL --data squad_shifts_*`: out-of-domain)
  vitaminc  sentence pairs, recipes/vitaminc_pairs.yaml (MiniLM; evidence/claim -> 3 classes)
  xsum      generation scored by its outputs, recipes/xsum_smollm_lora.yaml (SmolLM2-135M + LoRA)
  ecommerce Chinese text pairs, recipes/ecommerce_pairs_gemma.yaml (Gemma 3 270M): trained without the
            in-run test evaluation, then `tunelab eval --predictions` on the test split once, from which the
            corpus's own ranking score is computed too: R10@1, the share of the 1,000 test contexts whose true
            reply gets the highest P(match) of its 10 candidates

    .venv/bin/python bench/task_types.py --runs squad,vitaminc,xsum,ecommerce --seeds 1 --out bench/results/task_types.json

Extra key=value overrides after `--` go to every run (e.g. -- data.max_train_examples=12000). With --out, each
finished run is written at once and runs already there are kept: a killed bench continues. Reported per run
and seed: the test metrics, training seconds, tokens/s and peak memory; the tables give mean ± std.
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
RUNS = {
    "squad": ("squad_qa.yaml", ["f1", "exact_match"], ["squad_shifts_wiki", "squad_shifts_nyt", "squad_shifts_reddit",
                                                       "squad_shifts_amazon"]),
    "vitaminc": ("vitaminc_pairs.yaml", ["accuracy", "macro_f1"], []),
    "xsum": ("xsum_smollm_lora.yaml", ["rougeL", "bleu", "chrf", "loss"], []),
    "ecommerce": ("ecommerce_pairs_gemma.yaml", ["accuracy", "macro_f1", "r10_at_1"], []),
}
NO_TEST_IN_RUN = {"ecommerce"}  # tested once afterwards, with predictions kept (R10@1)

TRAIN_WITHOUT_TEST = """
import sys
from tunelab.config import load_config
from tunelab.train import train
train(load_config(sys.argv[1], sys.argv[2:]), overwrite=True, test=False)
"""


def r10_at_1(predictions: Path) -> float:
    """Blocks of 10 candidates in test order, the true reply first: how often it has the highest P(match)."""
    probs = [json.loads(line)["probabilities"]["match"] for line in predictions.read_text().splitlines()]
    blocks = [probs[k:k + 10] for k in range(0, len(probs), 10)]
    return sum(max(range(10), key=b.__getitem__) == 0 for b in blocks) / len(blocks)


def run_one(name: str, seed: int, args, work: Path, env: dict) -> dict:
    recipe, keys, shifts = RUNS[name]
    out = work / f"{name}-{seed}"
    overrides = [f"output_dir={out}", f"train.seed={seed}", f"train.threads={args.threads}", *args.overrides]
    t0 = time.perf_counter()
    if name in NO_TEST_IN_RUN:
        subprocess.run([sys.executable, "-c", TRAIN_WITHOUT_TEST, str(ROOT / "recipes" / recipe), *overrides],
                       cwd=ROOT, env=env, check=True)
    else:
        subprocess.run([sys.executable, "-m", "tunelab", "train", str(ROOT / "recipes" / recipe), *overrides,
                        "--overwrite"], cwd=ROOT, env=env, check=True)
    wall = time.perf_counter() - t0
    r = json.loads((out / "report.json").read_text())
    if name in NO_TEST_IN_RUN:
        metrics, predictions = work / f"{name}-{seed}-test.json", work / f"{name}-{seed}-test.jsonl"
        subprocess.run([sys.executable, "-m", "tunelab", "eval", str(out), "--data", f"{r['data']['name']}:test",
                        "--bf16", "--output", str(metrics), "--predictions", str(predictions)], cwd=ROOT, env=env,
                       check=True)
        r["test"] = json.loads(metrics.read_text()) | {"r10_at_1": r10_at_1(predictions)}
    row = {"run": name, "seed": seed, "test": {k: r["test"][k] for k in keys}, "sizes": r["sizes"],
           "steps": r["steps"], "best_step": r["best_step"], "train_seconds": r["train_seconds"],
           "tokens_per_second": r["tokens_per_second"], "peak_memory_mb": r["peak_memory_mb"],
           "wall_seconds": wall, "overrides": args.overrides}
    for data in shifts if args.shifts else []:
        path = work / f"{name}-{seed}-{data}.json"
        subprocess.run([sys.executable, "-m", "tunelab", "eval", str(out), "--data", data, "--bf16", "--output",
                        str(path)], cwd=ROOT, env=env, check=True)
        m = json.loads(path.read_text())
        row.setdefault("shifts", {})[data] = {k: m[k] for k in keys} | {"questions": m["questions"]}
    return row


def _ms(values, scale=100.0) -> str:
    m = statistics.mean(values) * scale
    return f"{m:.2f} ± {statistics.stdev(values) * scale:.2f}" if len(values) > 1 else f"{m:.2f}"


def table(rows: list[dict]) -> str:
    lines = []
    for name in RUNS:
        mine = [r for r in rows if r["run"] == name]
        if not mine:
            continue
        keys = RUNS[name][1]
        scale = {k: (1.0 if name == "xsum" else 100.0) for k in keys}  # (sacreBLEU & co. are 0-100 already)
        lines += [f"\n{name} ({len(mine)} seed(s): {', '.join(str(r['seed']) for r in mine)}; "
                  f"train/dev/test {mine[0]['sizes']})", "",
                  "| " + " | ".join(["split"] + keys + ["train s", "tokens/s", "peak MB"]) + " |",
                  "|---" * (len(keys) + 4) + "|",
                  "| test | " + " | ".join(_ms([r["test"][k] for r in mine], scale[k]) for k in keys) +
                  f" | {statistics.mean(r['train_seconds'] for r in mine):.0f}"
                  f" | {statistics.mean(r['tokens_per_second'] for r in mine):.0f}"
                  f" | {statistics.mean(r['peak_memory_mb'] for r in mine):.0f} |"]
        for data in RUNS[name][2]:
            got = [r["shifts"][data] for r in mine if data in r.get("shifts", {})]
            if got:
                lines.append(f"| {data} ({got[0]['questions']:,} q) | " +
                             " | ".join(_ms([g[k] for g in got], scale[k]) for k in keys) + " | | | |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default="squad,vitaminc,xsum,ecommerce")
    p.add_argument("--seeds", default="1")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-shifts", dest="shifts", action="store_false", help="skip the SQuADShifts evaluations")
    p.add_argument("--out", help="JSON results file (kept runs are not run again)")
    p.add_argument("overrides", nargs="*", help="key=value overrides for every run (after --)")
    args = p.parse_args()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    rows = json.loads(Path(args.out).read_text()) if args.out and Path(args.out).is_file() else []
    with tempfile.TemporaryDirectory(prefix="tunelab-bench-") as tmp:
        for name in args.runs.split(","):
            for seed in map(int, args.seeds.split(",")):
                if any(r["run"] == name and r["seed"] == seed and r["overrides"] == args.overrides for r in rows):
                    continue
                rows.append(run_one(name, seed, args, Path(tmp), env))
                if args.out:
                    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                    Path(args.out).write_text(json.dumps(rows, indent=1))
    print(table([r for r in rows if r["overrides"] == args.overrides]))


if __name__ == "__main__":
    main()
