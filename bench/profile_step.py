"""Where a training step's time and memory go: tunelab's step and the Hugging Face Trainer's step on the same
CoNLL-2003 batches (same sentences in each batch, same order, same padding), one side per process.

Per optimizer step it records the wall seconds, the resident set (RSS, from /proc/self/statm) and the minor page
faults (getrusage): a step that faults in fresh pages pays for the kernel zeroing them, which is how allocator
behaviour shows up in step time on a CPU. With --profile A:B it also prints torch.profiler's operator table for
steps A..B-1.

    python bench/profile_step.py --side tunelab --order tunelab --steps 200 --out bench/results/prof_t.json
    python bench/profile_step.py --side trainer --order tunelab --steps 200 --out bench/results/prof_hf.json
    python bench/profile_step.py --compare bench/results/prof_t.json bench/results/prof_hf.json

--order: whose batch order both sides follow: "tunelab" (tunelab.data.batching.epoch_batches: length-grouped
mega-batches, batches shuffled, the longest batch first), "tunelab-random-first" (the same without moving the
longest batch first: tunelab before 2026-12-02) or "trainer" (transformers' LengthGroupedSampler: mega-batches
of 50 batches, each sorted longest first, the longest batch of all first). --pad-multiple N pads each batch's
length up to a multiple of N on both sides (the collators' pad_to_multiple_of).
"""

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def batches_for(order: str, lengths: list[int], batch_size: int, seed: int) -> list[list[int]]:
    if order in ("tunelab", "tunelab-random-first"):
        from tunelab.data.batching import epoch_batches

        return epoch_batches(lengths, batch_size, seed, 0, True, longest_first=order == "tunelab")
    import torch
    from transformers.trainer_pt_utils import get_length_grouped_indices

    g = torch.Generator()
    g.manual_seed(seed)
    idx = get_length_grouped_indices(lengths, batch_size, generator=g)
    return [idx[k:k + batch_size] for k in range(0, len(idx), batch_size)]


class Recorder:
    def __init__(self, profile: tuple[int, int] | None):
        self.rows, self.profile, self.prof = [], profile, None

    def begin(self, step: int) -> None:
        if self.profile and step == self.profile[0]:
            import torch

            self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=False,
                                               profile_memory=True)
            self.prof.__enter__()
        self.t0, self.f0 = time.perf_counter(), faults()

    def end(self, step: int, tokens: int, shape) -> None:
        self.rows.append({"step": step, "seconds": time.perf_counter() - self.t0, "minflt": faults() - self.f0,
                          "rss_mib": rss_mib(), "tokens": tokens, "shape": list(shape)})
        if self.prof is not None and step == self.profile[1] - 1:
            self.prof.__exit__(None, None, None)
            print(self.prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), file=sys.stderr)
            self.prof = None


def run_tunelab(args, sentences, batches, rec: Recorder) -> None:
    import torch

    from tunelab.data.batching import collate
    from tunelab.models import load_model, load_tokenizer, resolve_model_path
    from tunelab.tasks import task_type
    from tunelab.train.optim import build_optimizer, step as optimizer_step
    from tunelab.train.step import micro_batch

    torch.manual_seed(args.seed)
    path = resolve_model_path("all-MiniLM-L6-v2")
    labels = sorted({t for s in sentences for t in s.tags})
    tok = load_tokenizer(path)
    model = load_model(path, "ner", labels)
    task = task_type("ner").build(tok, labels, args.max_length, {})
    feats = task.encode(sentences, training=True)
    total = len(batches)
    opt, sched = build_optimizer(model, 1e-4, 0.01, None, "linear", round(0.1 * total), total)
    if args.recompute:
        from tunelab.models import recompute_activations

        recompute_activations(model)
    model.train()
    forward = torch.compile(model, dynamic=True) if args.compile else model
    for s, b in enumerate(batches):
        rec.begin(s)
        batch = collate([feats[i] for i in b], task.pad, args.pad_multiple)
        micro_batch(forward, model, batch, device=torch.device("cpu"), bf16=args.bf16)
        optimizer_step(model, opt, sched, 1.0)
        rec.end(s, sum(len(feats[i]["input_ids"]) for i in b), batch["input_ids"].shape)


def run_trainer(args, sentences, batches, rec: Recorder) -> None:
    import torch
    import transformers
    from transformers import (AutoConfig, AutoModelForTokenClassification, AutoTokenizer,
                              DataCollatorForTokenClassification, Trainer, TrainerCallback, TrainingArguments)

    sys.path.insert(0, str(ROOT / "bench"))
    from ner_vs_trainer import encode_run_ner

    from tunelab.data.batching import padded_length
    from tunelab.models import resolve_model_path

    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(args.seed)
    path = str(resolve_model_path("all-MiniLM-L6-v2"))
    labels = sorted({t for s in sentences for t in s.tags})
    config = AutoConfig.from_pretrained(path, num_labels=len(labels))
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForTokenClassification.from_pretrained(path, config=config)
    feats, _, _ = encode_run_ner(tok, sentences, {x: i for i, x in enumerate(labels)}, args.max_length)
    ordered = [feats[i] for b in batches for i in b]  # sequential sampling then yields exactly these batches
    lengths = [len(feats[i]["input_ids"]) for b in batches for i in b]
    out = f"/tmp/profile_step_trainer_{os.getpid()}"
    targs = TrainingArguments(output_dir=out, per_device_train_batch_size=args.batch_size, learning_rate=1e-4,
                              num_train_epochs=1, weight_decay=0.01, lr_scheduler_type="linear", warmup_steps=0.1,
                              max_grad_norm=1.0, seed=args.seed, use_cpu=True, report_to="none", save_strategy="no",
                              eval_strategy="no", dataloader_num_workers=0, bf16=args.bf16,
                              train_sampling_strategy="sequential", disable_tqdm=True)
    collator = DataCollatorForTokenClassification(tok, pad_to_multiple_of=args.pad_multiple if args.pad_multiple > 1
                                                  else None)
    state = {"step": 0}

    class Timing(TrainerCallback):
        def on_step_begin(self, a, s, c, **kw):
            rec.begin(state["step"])

        def on_step_end(self, a, s, c, **kw):
            k = state["step"]
            b = lengths[k * args.batch_size:(k + 1) * args.batch_size]
            rec.end(k, sum(b), (len(b), padded_length(b, args.pad_multiple)))
            state["step"] += 1

    trainer = Trainer(model=model, args=targs, train_dataset=ordered, processing_class=tok, data_collator=collator,
                      callbacks=[Timing()])
    trainer.train()


def summary(rows: list[dict], skip: int) -> dict:
    rest = rows[skip:]
    return {"steps": len(rows), "skipped": skip, "seconds_total": sum(r["seconds"] for r in rest),
            "seconds_median": statistics.median(r["seconds"] for r in rest),
            "tokens_per_second": sum(r["tokens"] for r in rest) / sum(r["seconds"] for r in rest),
            "minflt_per_step": statistics.fmean(r["minflt"] for r in rest),
            "rss_peak_mib": max(r["rss_mib"] for r in rows), "rss_last_mib": rows[-1]["rss_mib"],
            "distinct_shapes": len({tuple(r["shape"]) for r in rows})}


def compare(paths: list[str]) -> None:
    docs = [json.loads(Path(p).read_text()) for p in paths]
    print("| run | steps | s/step median | tokens/s | minor faults/step | RSS peak MiB | RSS last MiB | shapes |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for d in docs:
        s = d["summary"]
        print(f"| {d['label']} | {s['steps']} | {s['seconds_median']:.4f} | {s['tokens_per_second']:,.0f} | "
              f"{s['minflt_per_step']:,.0f} | {s['rss_peak_mib']:,.0f} | {s['rss_last_mib']:,.0f} | "
              f"{s['distinct_shapes']} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--side", choices=("tunelab", "trainer"))
    p.add_argument("--order", choices=("tunelab", "tunelab-random-first", "trainer"), default="tunelab")
    p.add_argument("--pad-multiple", type=int, default=1)
    p.add_argument("--steps", type=int, default=200, help="optimizer steps (batches) to run")
    p.add_argument("--skip", type=int, default=5, help="warm-up steps left out of the summary")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--fp32", dest="bf16", action="store_false", help="no bf16 autocast (default: bf16)")
    p.add_argument("--compile", action="store_true", help="tunelab side: torch.compile(model, dynamic=True)")
    p.add_argument("--recompute", action="store_true", help="tunelab side: train.gradient_checkpointing")
    p.add_argument("--profile", help="A:B, print torch.profiler's operator table for steps A..B-1")
    p.add_argument("--label", help="the run's name in --compare tables")
    p.add_argument("--out")
    p.add_argument("--compare", nargs="+", help="JSON files of earlier runs: print one table")
    args = p.parse_args(argv)
    if args.compare:
        compare(args.compare)
        return 0
    if not args.side:
        p.error("--side is required (or --compare)")
    import torch

    torch.set_num_threads(args.threads)
    from tunelab.data.packaged import conll2003
    from tunelab.models import load_tokenizer, resolve_model_path
    from tunelab.tasks import task_type

    sentences = conll2003().train
    tok = load_tokenizer(resolve_model_path("all-MiniLM-L6-v2"))
    labels = sorted({t for s in sentences for t in s.tags})
    lengths = [len(f["input_ids"]) for f in task_type("ner").build(tok, labels, args.max_length, {}).encode(
        sentences, training=True)]
    batches = batches_for(args.order, lengths, args.batch_size, args.seed)[: args.steps]
    rec = Recorder(tuple(int(x) for x in args.profile.split(":")) if args.profile else None)
    (run_tunelab if args.side == "tunelab" else run_trainer)(args, sentences, batches, rec)
    label = args.label or f"{args.side} order={args.order} pad={args.pad_multiple}"
    doc = {"label": label, "settings": vars(args), "summary": summary(rec.rows, args.skip), "steps": rec.rows}
    print(json.dumps({"label": label, **doc["summary"]}))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
