"""Robust fine-tuning methods side by side on CoNLL-2003 NER with the packaged all-MiniLM-L6-v2: plain
fine-tuning vs adversarial training (FGM, PGD, FreeLB), R-Drop and data augmentation, each scored on the
clean test split and on perturbed copies of it (`tunelab eval --perturb`), with the training time against
plain's.

Every run is `tunelab train recipes/conll2003_quick.yaml` with the same budget (epochs, batch size, lr, bf16,
threads) and seed, in its own process, one after the other; only the robust.* settings differ. The test split
is evaluated once per model clean and once per perturbation (each seeded, the same copy for every model):

  noise         char_noise on every sentence, 5 % of the words changed (typos, keyboard slips, case)
  entity_swap   every mention replaced, with probability 0.5, by another of its type from the test set

    .venv/bin/python bench/robust.py --methods plain,fgm,pgd,freelb,rdrop,augment --seeds 1,2,3 \
        --out bench/results/robust.json
    (low-resource: --max-train 1404, the first 10 % of the training sentences, with --epochs 3)

A method is a name from METHODS, optionally with its epsilon (`fgm:0.3`; pgd's alpha follows as 0.3 *
epsilon), and methods combine with `+` (`freelb+augment`). With --out, each finished run is written at once
and runs already in that file (same method and seed) are kept, not rerun: a killed bench continues.

Smoke test (minutes): --methods plain,fgm --max-train 200 --max-test 200 --seeds 1
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
RECIPE = ROOT / "recipes" / "conll2003_quick.yaml"

METHODS = {
    "plain": [],
    "fgm": ["robust.adversarial=fgm", "robust.epsilon=1.0"],
    "pgd": ["robust.adversarial=pgd", "robust.epsilon=1.0", "robust.alpha=0.3", "robust.steps=3"],
    "freelb": ["robust.adversarial=freelb", "robust.epsilon=1.0", "robust.alpha=0.3", "robust.steps=2"],
    "rdrop": ["robust.rdrop=1.0"],
    "augment": ["robust.augment.char_noise=0.3", "robust.augment.mentions=0.3", "robust.augment_intensity=0.1"],
    "noise": ["robust.augment.char_noise=0.6", "robust.augment_intensity=0.1"],  # character noise only, stronger
}
PERTURBATIONS = {"noise": ("char_noise=1", 0.05), "entity_swap": ("mentions=0.5", 1.0)}


def overrides_of(method: str) -> list[str]:
    """The robust.* overrides of a method spec: NAME[:EPSILON] parts joined by '+'."""
    out = []
    for part in method.split("+"):
        name, _, eps = part.partition(":")
        if name not in METHODS:
            sys.exit(f"unknown method {name!r} in {method!r}; choose from {', '.join(METHODS)}")
        out += METHODS[name]
        if eps:
            out += [f"robust.epsilon={float(eps)}"] + ([f"robust.alpha={0.3 * float(eps):g}"] if name == "pgd" else [])
    return out


def tunelab(*argv: str, env: dict) -> None:
    subprocess.run([sys.executable, "-m", "tunelab", *argv], cwd=ROOT, env=env, check=True)


def run_one(method: str, seed: int, args, work: Path, env: dict) -> dict:
    out = work / f"{method}-{seed}"
    overrides = [f"output_dir={out}", f"train.seed={seed}", f"train.epochs={args.epochs}",
                 f"train.threads={args.threads}", "track.tensorboard=false", *overrides_of(method)]
    if args.max_train:
        overrides.append(f"data.max_train_examples={args.max_train}")
    t0 = time.perf_counter()
    tunelab("train", str(RECIPE), *overrides, "--overwrite", env=env)
    wall = time.perf_counter() - t0
    report = json.loads((out / "report.json").read_text())
    test = work / "test.conll"
    row = {"method": method, "seed": seed, "train_seconds": report["train_seconds"], "wall_seconds": wall,
           "steps": report["steps"], "dev": report["dev"]["main"] if report.get("dev") else None}
    if args.timing_only:
        return row
    metrics = work / "m.json"
    tunelab("eval", str(out), "--data", str(test), "--batch-size", "64", "--bf16", "-o", str(metrics), env=env)
    row["clean"] = json.loads(metrics.read_text())["main"]
    for name, (spec, intensity) in PERTURBATIONS.items():
        tunelab("eval", str(out), "--data", str(test), "--batch-size", "64", "--bf16", "--perturb", spec,
                "--perturb-intensity", str(intensity), "--perturb-seed", "7", "-o", str(metrics), env=env)
        row[name] = json.loads(metrics.read_text())["perturbed"]["main"]
    return row


def summary(rows: list[dict]) -> str:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    plain_time = statistics.mean(r["train_seconds"] for r in rows if r["method"] == "plain") \
        if any(r["method"] == "plain" for r in rows) else None

    def cell(values):
        values = [v * 100 for v in values]
        return f"{statistics.mean(values):.2f}" + (f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else "")

    plain = {r["seed"]: r for r in rows if r["method"] == "plain"}
    lines = ["| method | seeds | clean test F1 | vs plain, same seed | F1 under noise | drop | F1 under entity swap | drop "
             "| train time vs plain |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    if not any("clean" in r for r in rows):  # --timing-only
        lines = ["| method | seeds | train seconds | vs plain |", "|---|---:|---:|---:|"]
        for m in methods:
            t = statistics.mean(r["train_seconds"] for r in rows if r["method"] == m)
            lines.append(f"| {m} | {sum(r['method'] == m for r in rows)} | {t:.1f} | "
                         + (f"{t / plain_time:.2f}×" if plain_time else "-") + " |")
        return "\n".join(lines)
    for m in methods:
        rs = [r for r in rows if r["method"] == m]
        clean, noise, swap = ([r[k] for r in rs] for k in ("clean", "noise", "entity_swap"))
        t = statistics.mean(r["train_seconds"] for r in rs)
        paired = [r["clean"] - plain[r["seed"]]["clean"] for r in rs if r["seed"] in plain]
        gain = ("+" if statistics.mean(paired) >= 0 else "") + cell(paired) if paired and m != "plain" else "-"
        lines.append(f"| {m} | {len(rs)} | {cell(clean)} | {gain} | {cell(noise)} | {cell([c - n for c, n in zip(clean, noise)])} "
                     f"| {cell(swap)} | {cell([c - s for c, s in zip(clean, swap)])} | "
                     + (f"{t / plain_time:.2f}×" if plain_time else "-") + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="plain,fgm,pgd,freelb,rdrop,augment")
    p.add_argument("--seeds", default="1")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-train", type=int, default=None, help="the first N training sentences (low-resource)")
    p.add_argument("--max-test", type=int, default=None, help="the first N test sentences (smoke tests)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="write the rows and the table here (JSON)")
    p.add_argument("--timing-only", action="store_true", help="train only (no test evaluations): the cost column "
                                                              "alone, on an otherwise idle machine")
    args = p.parse_args()
    methods = args.methods.split(",")
    for m in methods:
        overrides_of(m)  # unknown names stop here, before any run
    done = []
    if args.out and Path(args.out).exists():
        before = json.loads(Path(args.out).read_text())
        same = ("epochs", "max_train", "max_test", "threads", "timing_only")
        if any(before["args"].get(k, False if k == "timing_only" else None) != getattr(args, k) for k in same):
            sys.exit(f"{args.out} holds runs with other settings ({', '.join(same)}); choose another --out")
        done = before["rows"]

    def save(rows):
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(args.out).with_suffix(".tmp")
            tmp.write_text(json.dumps({"args": vars(args), "rows": rows, "table": summary(rows)}, indent=2) + "\n")
            tmp.replace(args.out)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    with tempfile.TemporaryDirectory(prefix="bench_robust_") as tmp:
        work = Path(tmp)
        sys.path.insert(0, str(ROOT))
        from tunelab.data.conll import write_conll
        from tunelab.data.packaged import conll2003

        test = conll2003().test[: args.max_test] if args.max_test else conll2003().test
        write_conll(work / "test.conll", test, [s.tags for s in test])  # word, gold, gold: read the gold column
        rows = list(done)
        for seed in map(int, args.seeds.split(",")):
            for m in methods:
                if any(r["method"] == m and r["seed"] == seed for r in done):
                    continue
                print(f"\n=== {m}, seed {seed} ===", file=sys.stderr, flush=True)
                rows.append(run_one(m, seed, args, work, env))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
                save(rows)
    print(summary(rows))
    save(rows)


if __name__ == "__main__":
    main()
