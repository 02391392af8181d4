"""Scaling: the CoNLL-2003 MiniLM recipe (recipes/conll2003_ner.yaml) on 1 and 2 processes (DDP over gloo).

Every run is `tunelab train` with the same recipe, global batch, data and step budget (the first --train
sentences, one epoch: --train / 32 optimizer steps), in a fresh process group:

  1 proc x 2 threads   the ordinary run on this machine: one process using both cores
  1 proc x 1 thread    what one core does alone (the per-process baseline of the 2-process run)
  2 procs x 1 thread   accelerate launch --multi_gpu --num_processes 2 (gloo): each process on its own core,
                       16 rows of each global batch of 32, gradients all-reduced every step

Samples/s and tokens/s are training only (report.json: the history's samples and tokens over train_seconds,
which leave out evaluation and checkpoints); wall is the whole command (start-up, model load, dev and test
evaluation, saving). The machine has 2 cores, so the 2-process run cannot beat 1 process x 2 threads by
more than what one process fails to get out of its second thread; it shows the cost of DDP (all-reduce of
22.7M fp32 gradients over gloo, duplicated Python work) rather than a speed-up. The load average and the
CPU-time / wall ratio of each run are recorded beside it, since other work on the machine skews timings.

    .venv/bin/python bench/scaling.py --out bench/results/scaling.json        # about 4 minutes on 2 cores
"""

import argparse
import json
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "conll2003_ner.yaml"
CONFIGS = {  # name -> (processes, threads per process)
    "1 proc x 2 threads": (1, 2),
    "1 proc x 1 thread": (1, 1),
    "2 procs x 1 thread": (2, 1),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(procs: int, threads: int, out: Path, args) -> list[str]:
    overrides = [f"output_dir={out}", f"train.threads={threads}", "train.epochs=1", "train.patience=null",
                 f"data.max_train_examples={args.train}", f"data.max_eval_examples={args.dev}",
                 f"train.seed={args.seed}", "train.device=cpu"]
    tail = ["-m", "tunelab", "train", str(RECIPE), *overrides]
    if procs == 1:
        return [sys.executable, *tail]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(procs),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), *tail]


def run_one(name: str, procs: int, threads: int, args, work: Path) -> dict:
    out = work / name.replace(" ", "_")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS=str(threads))
    load_before = os.getloadavg()
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(command(procs, threads, out, args), cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    row = {"run": name, "processes": procs, "threads": threads, "wall_s": round(wall, 1),
           "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in os.getloadavg()],
           "cpu_s": round((cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime), 1)}
    row["cpu_per_wall"] = round(row["cpu_s"] / wall, 2)
    if proc.returncode != 0:
        row["error"] = proc.stderr[-3000:]
        return row
    report = json.loads((out / "report.json").read_text())
    hist = report["history"]
    samples, tokens = sum(h["samples"] for h in hist), sum(h["tokens"] for h in hist)
    row.update(steps=report["steps"], global_batch=report["global_batch"], train_s=report["train_seconds"],
               samples_per_s=round(samples / report["train_seconds"], 2),
               tokens_per_s=round(tokens / report["train_seconds"], 1),
               first_loss=hist[0]["loss"], last_loss=hist[-1]["loss"],
               mean_loss_last10=sum(h["loss"] for h in hist[-10:]) / len(hist[-10:]),
               dev_f1=report["dev"]["main"] if report.get("dev") else None, test_f1=report["test"]["main"],
               peak_memory_mb_main=report["peak_memory_mb"])
    shutil.rmtree(out, ignore_errors=True)
    return row


def table(rows: list[dict], base: dict | None) -> str:
    lines = ["| run | steps | train s | samples/s | tokens/s | vs 1x2 | wall s | CPU s / wall | load (1 min) | "
             "last-10 loss | test F1 |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['run']} | failed | | | | | {r['wall_s']} | | | | |")
            continue
        ratio = f"{r['samples_per_s'] / base['samples_per_s']:.2f}x" if base and "error" not in base else "-"
        lines.append(f"| {r['run']} | {r['steps']} | {r['train_s']:.1f} | {r['samples_per_s']:.1f} | "
                     f"{r['tokens_per_s']:.0f} | {ratio} | {r['wall_s']:.0f} | {r['cpu_per_wall']:.2f} | "
                     f"{r['load_before'][0]:.2f} -> {r['load_after'][0]:.2f} | {r['mean_loss_last10']:.4f} | "
                     f"{r['test_f1'] * 100:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", type=int, default=1920, help="training sentences (one epoch; /32 = steps)")
    p.add_argument("--dev", type=int, default=200, help="dev sentences")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--runs", default=",".join(CONFIGS), help="comma-separated subset of: " + ", ".join(CONFIGS))
    p.add_argument("--out", type=Path, help="write the results (JSON) here")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.runs.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="tunelab-scaling-") as tmp:
        for name in names:
            procs, threads = CONFIGS[name]
            print(f"[scaling] {name} ...", file=sys.stderr, flush=True)
            rows.append(run_one(name, procs, threads, args, Path(tmp)))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    base = next((r for r in rows if r["run"] == "1 proc x 2 threads"), None)
    print(table(rows, base))
    if args.out:
        doc = {"recipe": str(RECIPE.relative_to(ROOT)), "args": {k: str(v) for k, v in vars(args).items()},
               "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
               "runs": rows, "table": table(rows, base)}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=2) + "\n")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
