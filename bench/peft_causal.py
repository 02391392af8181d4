"""LoRA (and other PEFT methods) against full fine-tuning of a causal LM on CPU: the packaged
SmolLM2-135M-Instruct learning BBC News headline generation (article opening -> real title, bbc_headlines).

Every run is tunelab.train.train with the same data, steps, batch, max length, seed and bf16 autocast, in its
own fresh subprocess (peak RSS per run). Measured: seconds per optimizer step (median over the steps after the
first two), real tokens/s, peak RSS, trainable parameters, saved weights size, and the reference loss /
perplexity on held-out dev and test prompts before (the pretrained model: run `base`) and after training.

    .venv/bin/python bench/peft_causal.py --steps 16 --out bench/results/peft_causal.json

Runs: base (no training: the pretrained model's loss), full (lr 5e-5), lora (r=8 on q_proj/v_proj, lr 1e-3),
lora_all (r=8 on every linear layer, lr 5e-4), prompt (20 virtual tokens, lr 3e-2).
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ner_vs_trainer import failed_row, fmt, strip_option  # noqa: E402
from peft_conll import child_main, host_info, spawn  # noqa: E402

RUNS = {
    "base": (None, []),
    "full": (5e-5, ["tune.method=full"]),
    "lora": (1e-3, ["tune.method=lora", "tune.lora_r=8", "tune.lora_alpha=16"]),
    "lora_all": (5e-4, ["tune.method=lora", "tune.lora_r=8", "tune.lora_alpha=16", "tune.target_modules=[all-linear]"]),
    "prompt": (3e-2, ["tune.method=prompt", "tune.virtual_tokens=20"]),
}
MODEL = "SmolLM2-135M-Instruct"


def config(args, run: str, out: str):
    from tunelab.config import load_config

    lr, extra = RUNS[run]
    return load_config(None, [
        "task=generate", f"model.name={MODEL}", "data.dataset=bbc_headlines", "data.prompt_suffix=\nHeadline:",
        f"data.max_target_length={args.max_target}", f"model.max_length={args.max_length}",
        f"data.max_train_examples={args.steps * args.batch_size}", f"data.max_eval_examples={args.dev}",
        "train.epochs=1", f"train.batch_size={args.batch_size}", f"train.lr={lr or 1e-4}", "train.warmup_ratio=0.1",
        "train.bf16=true", f"train.threads={args.threads}", "train.device=cpu", f"train.seed={args.seed}",
        f"output_dir={out}", *extra])


def run_child(args) -> dict:
    from tunelab.data import load_splits
    from tunelab.train import train

    out = tempfile.mkdtemp(prefix=f"bench_causal_{args.child}_")
    cfg = config(args, args.child, out)
    splits = load_splits(cfg.data, cfg.task)
    splits.test = splits.test[: args.test]
    if args.child == "base":
        return base_losses(cfg, splits)
    report = train(cfg, splits=splits, overwrite=True)
    steps = [h["seconds"] for h in report["history"]][2:] or [h["seconds"] for h in report["history"]]
    weights = Path(out) / ("adapter_model.safetensors" if (Path(out) / "adapter_config.json").is_file()
                           else "model.safetensors")
    return {"lr": cfg.train.lr, "trainable_params": report["tune"]["trainable_params"],
            "total_params": report["tune"]["total_params"], "steps": report["steps"],
            "seconds_per_step": statistics.median(steps), "tokens_per_second": report["tokens_per_second"],
            "train_seconds": report["train_seconds"], "dev_loss": report["dev"]["loss"],
            "test_loss": report["test"]["loss"], "test_perplexity": report["test"]["perplexity"],
            "checkpoint_bytes": weights.stat().st_size, "samples": report["samples"][:3],
            "first_loss": report["history"][0]["loss"], "last_loss": report["history"][-1]["loss"]}


def base_losses(cfg, splits) -> dict:
    """The pretrained model, untouched: where every run starts."""
    from tunelab.models import load_model, load_tokenizer, resolve_model_path
    from tunelab.predict import evaluate
    from tunelab.tasks import make_task

    import torch

    torch.set_num_threads(cfg.train.threads)
    path = resolve_model_path(cfg.model.name)
    model = load_model(path, "generate", [])
    task = make_task("generate", load_tokenizer(path), [], cfg.model.max_length, prompt_suffix=cfg.data.prompt_suffix,
                     max_target_length=cfg.data.max_target_length)
    dev = evaluate(task, model, splits.dev, torch.device("cpu"), True)
    test = evaluate(task, model, splits.test, torch.device("cpu"), True)
    return {"dev_loss": dev["loss"], "test_loss": test["loss"], "test_perplexity": test["perplexity"]}


def table(results) -> str:
    full = next((r for r in results if r["run"] == "full" and "error" not in r), None)
    rows = ["| run | lr | trainable params | trainable % | s / step | × full | tokens/s | peak RSS MiB | × full "
            "| weights file MiB | dev loss | test loss | test ppl |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if "error" in r:
            rows.append(failed_row(r, 13))
            continue
        share = r["trainable_params"] / r["total_params"] if "trainable_params" in r else None
        rel = (lambda k: fmt(r[k] / full[k], ".2f") + "×" if full and k in r else "—")
        rows.append(
            f"| {r['run']} | {fmt(r.get('lr'), 'g')} | {fmt(r.get('trainable_params'), ',')} "
            f"| {fmt(share and 100 * share, '.3f')} | {fmt(r.get('seconds_per_step'), '.2f')} "
            f"| {rel('seconds_per_step')} | {fmt(r.get('tokens_per_second'), ',.0f')} "
            f"| {fmt(r['peak_rss_mib'], ',.0f')} | {rel('peak_rss_mib')} "
            f"| {fmt(r.get('checkpoint_bytes') and r['checkpoint_bytes'] / 2**20, ',.2f')} "
            f"| {r['dev_loss']:.3f} | {r['test_loss']:.3f} | {r['test_perplexity']:.1f} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=16, help="optimizer steps per run (one pass over steps×batch)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=192)
    p.add_argument("--max-target", type=int, default=24)
    p.add_argument("--dev", type=int, default=48, help="dev prompts (model selection and the loss shown)")
    p.add_argument("--test", type=int, default=64, help="test prompts, evaluated once")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", default=",".join(RUNS))
    p.add_argument("--out", default="bench/results/peft_causal.json")
    p.add_argument("--child", choices=list(RUNS), help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        child_main(args, run_child)
        return 0

    runs = [r for r in args.runs.split(",") if r]
    args.device = "cpu"  # child_env reads it
    child_argv = strip_option(strip_option(list(argv if argv is not None else sys.argv[1:]), "--runs"), "--out")
    results = [spawn(run, args, child_argv, script=__file__) for run in runs]
    from tunelab.io import atomic_write_json

    doc = {"benchmark": f"PEFT vs full fine-tuning, {MODEL}, bbc_headlines (tunelab)",
           "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv),
           "args": {k: v for k, v in vars(args).items() if not k.startswith("child")}, "host": host_info(),
           "runs": results}
    atomic_write_json(Path(args.out), doc)
    print(f"\n{MODEL}, bbc_headlines: {args.steps} steps × batch {args.batch_size}, max length {args.max_length}, "
          f"bf16 autocast, {args.threads} threads, seed {args.seed}; dev {args.dev} / test {args.test} prompts\n")
    print(table(results))
    print(f"\nwrote {args.out}")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
