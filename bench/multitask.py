"""Multi-task against single-task fine-tuning, same encoder and budget, over several seeds.

The tasks, data and training settings come from one multi-task recipe (recipes/multitask_en.yaml: CoNLL-2003
NER, BBC News topics, Rotten Tomatoes sentiment on all-MiniLM-L6-v2). For every seed:

  single_<task>   tunelab.train on that task alone: the same settings (lr, batch, epochs, max_length, bf16)
  multi           tunelab.multitask.train on all tasks; the same epochs over all tasks' batches together
  low_single      the low-resource task alone, with only --low-fraction of its training data
  low_single_long the same, trained for as many optimizer steps as low_multi takes (more epochs over the small
                  set): separates "more updates" from "other tasks' data"
  low_multi       all tasks, the low-resource task cut the same way (the others complete)

Every run is its own subprocess (peak RSS per run) with the same torch threads. Selection is on each run's dev
split(s) (single: that task's dev metric; multi: the mean of the task scores); each test split is evaluated
once, on the selected weights. Results are appended to --out as they finish, so an interrupted bench resumes.

    .venv/bin/python bench/multitask.py --seeds 1 2 3 --out bench/results/multitask.json

Smoke test: --seeds 1 --max-train 300 --max-eval 100 train.epochs=1
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ner_vs_trainer import fmt  # noqa: E402
from peft_conll import child_main, host_info, spawn  # noqa: E402

RECIPE = ROOT / "recipes" / "multitask_en.yaml"
GOAL = ("multi-task matches the single-task average and beats single-task in the low-resource setting, at "
        "less total training time than training the tasks separately")


def multitask_config(args, low: bool):
    from tunelab.config import load_config

    over = [f"train.seed={args.seed}", f"train.threads={args.threads}", f"train.device={args.device}",
            *args.overrides]
    cfg = load_config(args.recipe, over)
    for spec in cfg.tasks.values():
        if args.max_train:
            spec.data.max_train_examples = args.max_train
        if args.max_eval:
            spec.data.max_eval_examples = args.max_eval
    if low:
        spec = cfg.tasks[args.low]
        spec.data.max_train_examples = low_size(spec, args.low_fraction)
    return cfg


def low_size(spec, fraction: float) -> int:
    """The first `fraction` of the task's training examples (CoNLL: whole documents from the start of the
    file; the other sets are shuffled once by their seeded split, so their first N are a fair sample)."""
    return max(1, round(train_size(spec) * fraction))


def train_size(spec) -> int:
    """Training examples the task's run uses (data.max_train_examples applied)."""
    from tunelab.data import load_splits

    n = len(load_splits(spec.data, spec.task).train)
    return min(n, spec.data.max_train_examples or n)


def single_config(mt, name: str, out: str):
    """The single-task run of task `name` with the multi-task recipe's settings."""
    from tunelab.config import load_config, to_dict

    spec = mt.tasks[name]
    d = to_dict(mt)
    model = dict(d["model"], max_length=spec.max_length or mt.model.max_length)
    return load_config(None, base={"task": spec.task, "output_dir": out, "model": model,
                                   "data": d["tasks"][name]["data"], "train": d["train"], "tune": d["tune"]})


def run_one(args) -> dict:
    import tempfile

    from tunelab.multitask import train as train_multi
    from tunelab.train import train as train_single

    kind = args.child
    out = tempfile.mkdtemp(prefix=f"bench_mt_{kind}_")
    mt = multitask_config(args, low=kind.startswith("low_"))
    mt.output_dir = out
    t0, c0 = time.perf_counter(), time.process_time()
    result = {"seed": args.seed, "tasks": {}}
    if kind in ("multi", "low_multi"):
        rep = train_multi(mt, overwrite=True)
        for n, e in rep["tasks"].items():
            result["tasks"][n] = {"dev": e["dev"]["main"], "test": e["test"]["main"], "train_size": e["sizes"]["train"],
                                  "batch_share": e["batch_share"]}
        result["dev_aggregate"] = rep["dev"]
    else:
        name = args.low if kind.startswith("low_single") else kind[len("single_"):]
        cfg = single_config(mt, name, out)
        if kind == "low_single_long":
            from tunelab.multitask.train import step_budget

            sizes = {n: train_size(spec) for n, spec in mt.tasks.items()}
            _, multi_steps = step_budget(sizes.values(), mt.train.batch_size, mt.train.epochs)
            per_epoch, _ = step_budget([sizes[name]], mt.train.batch_size, 1)
            cfg.train.epochs = multi_steps / per_epoch
        rep = train_single(cfg, overwrite=True)
        result["tasks"][name] = {"dev": rep["dev"]["main"], "test": rep["test"]["main"],
                                 "train_size": rep["sizes"]["train"]}
    total = time.perf_counter() - t0
    # CPU-seconds per wall-second of the whole call: well below the thread count means the machine was busy
    # with other work and the run's seconds are not comparable.
    result.update(total_seconds=total, cpu_per_wall=(time.process_time() - c0) / total,
                  train_seconds=rep["train_seconds"], steps=rep["steps"],
                  best_step=rep["best_step"], train_tokens=rep["train_tokens"])
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    return result


def ms(xs, scale=100.0) -> str:
    xs = [x * scale for x in xs if x is not None]
    if not xs:
        return "—"
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else f"{xs[0]:.2f}"


def summary(doc: dict) -> tuple[str, dict]:
    """Markdown table (mean ± sd over seeds) and the goal checks."""
    runs = [r for r in doc["runs"] if "error" not in r]
    names, low = doc["tasks"], doc["low"]
    seeds = sorted({r["seed"] for r in runs})

    def of(kind):
        return [r for r in runs if r["run"] == kind]

    rows = ["| setting | " + " | ".join(f"{n} test" for n in names) + " | mean | train s (sum) | process s (sum) "
            "| peak RSS MiB (max) | seeds |", "|---" + "|---:" * (len(names) + 5) + "|"]
    per_seed = {}
    for seed in seeds:
        singles = [r for r in runs if r["seed"] == seed and r["run"].startswith("single_")]
        multi = next((r for r in runs if r["seed"] == seed and r["run"] == "multi"), None)
        lows = {k: next((r for r in runs if r["seed"] == seed and r["run"] == k), None) for k in ("low_single", "low_single_long", "low_multi")}
        per_seed[seed] = {
            "single": {n: next((r["tasks"][n]["test"] for r in singles if n in r["tasks"]), None) for n in names},
            "single_train_s": sum(r["train_seconds"] for r in singles) if len(singles) == len(names) else None,
            "single_process_s": sum(r["process_seconds"] for r in singles) if len(singles) == len(names) else None,
            "single_rss": max((r["peak_rss_mib"] for r in singles), default=None),
            "multi": {n: multi["tasks"][n]["test"] for n in names} if multi else None,
            "multi_train_s": multi and multi["train_seconds"], "multi_process_s": multi and multi["process_seconds"],
            "multi_rss": multi and multi["peak_rss_mib"],
            "low_single": lows["low_single"] and lows["low_single"]["tasks"][low]["test"],
            "low_single_long": lows["low_single_long"] and lows["low_single_long"]["tasks"][low]["test"],
            "low_single_long_train_s": lows["low_single_long"] and lows["low_single_long"]["train_seconds"],
            "low_multi": lows["low_multi"] and lows["low_multi"]["tasks"][low]["test"],
            "low_multi_all": lows["low_multi"] and {n: lows["low_multi"]["tasks"][n]["test"] for n in names},
            "low_single_train_s": lows["low_single"] and lows["low_single"]["train_seconds"],
            "low_multi_train_s": lows["low_multi"] and lows["low_multi"]["train_seconds"],
        }
    ps = list(per_seed.values())

    def row(label, scores, mean_of, train_s, proc_s, rss):
        cells = [ms([s.get(n) if s else None for s in scores]) for n in names]
        return (f"| {label} | " + " | ".join(cells) + f" | {ms(mean_of)} | {fmt(_mean(train_s), '.0f')} "
                f"| {fmt(_mean(proc_s), '.0f')} | {fmt(_mean(rss), ',.0f')} | {len([s for s in scores if s])} |")

    complete = [p for p in ps if p["multi"] and all(v is not None for v in p["single"].values())]
    rows.append(row("single-task (each task alone)", [p["single"] for p in ps],
                    [statistics.mean(p["single"].values()) for p in complete],
                    [p["single_train_s"] for p in ps], [p["single_process_s"] for p in ps], [p["single_rss"] for p in ps]))
    rows.append(row("multi-task (all together)", [p["multi"] for p in ps],
                    [statistics.mean(p["multi"].values()) for p in complete],
                    [p["multi_train_s"] for p in ps], [p["multi_process_s"] for p in ps], [p["multi_rss"] for p in ps]))
    frac = f"{doc['low_fraction']:.0%}"
    rows.append(row(f"low-resource: {low} {frac}, alone", [{low: p["low_single"]} if p["low_single"] is not None
                                                          else None for p in ps], [],
                    [p["low_single_train_s"] for p in ps], [None], [None]).replace("| — |", "| — |"))
    rows.append(row(f"low-resource: {low} {frac}, alone, as many steps as multi-task",
                    [{low: p["low_single_long"]} if p["low_single_long"] is not None else None for p in ps], [],
                    [p["low_single_long_train_s"] for p in ps], [None], [None]))
    rows.append(row(f"low-resource: {low} {frac} + other tasks complete", [p["low_multi_all"] for p in ps], [],
                    [p["low_multi_train_s"] for p in ps], [None], [None]))

    checks = {}
    if complete:
        single_avg = statistics.mean(statistics.mean(p["single"].values()) for p in complete)
        multi_avg = statistics.mean(statistics.mean(p["multi"].values()) for p in complete)
        checks["matches_single_average"] = {"met": multi_avg >= single_avg - 0.005, "single_avg": single_avg,
                                            "multi_avg": multi_avg, "tolerance_points": 0.5}
        checks["less_total_time"] = {
            "met": _mean([p["multi_train_s"] for p in complete]) < _mean([p["single_train_s"] for p in complete]),
            "multi_train_s": _mean([p["multi_train_s"] for p in complete]),
            "single_train_s_sum": _mean([p["single_train_s"] for p in complete])}
    for base in ("low_single", "low_single_long"):
        lows = [p for p in ps if p[base] is not None and p["low_multi"] is not None]
        if lows:
            a, b = _mean([p[base] for p in lows]), _mean([p["low_multi"] for p in lows])
            checks[f"beats_{base}"] = {"met": b > a, "single": a, "multi": b,
                                       "wins": sum(p["low_multi"] > p[base] for p in lows), "seeds": len(lows)}
    return "\n".join(rows), checks


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.mean(xs) if xs else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=str(RECIPE))
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--low", default="ner", help="the task cut to --low-fraction of its training data")
    p.add_argument("--low-fraction", type=float, default=0.1)
    p.add_argument("--runs", default="single,multi,low_single,low_single_long,low_multi",
                   help="which settings: single (every task alone), multi, low_single, low_single_long, low_multi")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-train", type=int, default=None, help="first N training examples of every task (smoke)")
    p.add_argument("--max-eval", type=int, default=None, help="first N dev examples of every task (smoke)")
    p.add_argument("--out", default="bench/results/multitask.json")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides for every run")
    p.add_argument("--seed", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        child_main(args, run_one)
        return 0

    from tunelab.config import load_config
    from tunelab.io import atomic_write_json

    mt = load_config(args.recipe, args.overrides)
    if args.low not in mt.tasks:
        p.error(f"--low {args.low}: not a task of {args.recipe} ({', '.join(mt.tasks)})")
    kinds = []
    for k in args.runs.split(","):
        kinds += [f"single_{n}" for n in mt.tasks] if k == "single" else [k]
    out = Path(args.out)
    doc = json.loads(out.read_text()) if out.is_file() else {"runs": []}
    doc.update(benchmark="multi-task vs single-task fine-tuning (tunelab)", recipe=args.recipe,
               tasks=list(mt.tasks), low=args.low, low_fraction=args.low_fraction, goal=GOAL, host=host_info(),
               overrides=args.overrides, smoke=bool(args.max_train or args.max_eval),
               command=" ".join([Path(sys.executable).name, *sys.argv]))
    done = {(r["run"], r["seed"]) for r in doc["runs"] if "error" not in r}
    child_argv = ["--recipe", args.recipe, "--low", args.low, "--low-fraction", str(args.low_fraction),
                  "--threads", str(args.threads), "--device", args.device]
    for flag, value in (("--max-train", args.max_train), ("--max-eval", args.max_eval)):
        if value:
            child_argv += [flag, str(value)]
    for seed in args.seeds:  # seed-major: an interrupted bench still has whole seeds
        for kind in kinds:
            if (kind, seed) in done:
                continue
            args.seed = seed
            result = spawn(kind, args, [*child_argv, "--seed", str(seed), *args.overrides], script=__file__)
            result["run"] = kind
            doc["runs"] = [r for r in doc["runs"] if (r["run"], r.get("seed")) != (kind, seed)] + [result]
            doc["runs"][-1].setdefault("seed", seed)
            atomic_write_json(out, doc)
            brief = {n: round(t["test"] * 100, 2) for n, t in result.get("tasks", {}).items()}
            print(f"seed {seed} {kind}: test {brief} train {result.get('train_seconds', 0):.0f} s "
                  f"peak RSS {result['peak_rss_mib']:.0f} MiB" + (f" ERROR {result['error']}" if "error" in result
                                                                   else ""), file=sys.stderr)
    table, checks = summary(doc)
    doc["summary"], doc["goal_checks"] = table, checks
    atomic_write_json(out, doc)
    print(table)
    print(json.dumps(checks, indent=2))
    return 1 if any("error" in r for r in doc["runs"]) else 0


if __name__ == "__main__":
    sys.exit(main())
