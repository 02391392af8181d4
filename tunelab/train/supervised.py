"""Supervised fine-tuning (NER or text classification) as one readable loop.

data -> features -> length-grouped batches -> AdamW steps with warmup/decay, clipping and accumulation ->
dev evaluation -> best weights kept, early stopping -> atomic checkpoints -> test once on the selected
weights -> model folder that plain transformers loads, with report.
"""

import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from tunelab import config as config_mod
from tunelab import distributed
from tunelab import peft as tuning
from tunelab import progress, track
from tunelab.data import Splits, check_labels, load_splits
from tunelab.data.batching import collate, epoch_batches
from tunelab.errors import TunelabError
from tunelab.io import atomic_write_text
from tunelab.models import load_model, load_tokenizer, resolve_model_path
from tunelab.predict import META_FILE, autocast, evaluate, predict
from tunelab.tasks import make_task
from tunelab.train import checkpoint
from tunelab.train.optim import build_optimizer, step as optimizer_step


SAMPLES = 8  # generation: test outputs shown in the report beside their references


def log(msg: str) -> None:
    if distributed.is_main():  # one log for a distributed run, not one per process
        tqdm.write(f"[tunelab] {msg}", file=sys.stderr)


def prepare_output(out: Path, cfg, resume: bool, overwrite: bool, write: bool = True) -> None:
    """Check that output_dir may take this run; with `write` also clear it (--overwrite) and save the
    resolved config."""
    saved = out / "config.yaml"
    if out.exists() and any(out.iterdir()):
        if overwrite:
            if write:
                shutil.rmtree(out)
        elif resume:
            if (out / "report.json").is_file() and checkpoint.find(out) is None:
                raise TunelabError(f"--resume: the run in {out} has already finished (report.json is there); "
                                   "pass --overwrite to train it again")
            if saved.is_file():
                old = yaml.safe_load(saved.read_text(encoding="utf-8"))
                new = config_mod.to_dict(cfg)
                # tracking settings do not change the training: a resumed run may log elsewhere
                diff = [k for k in _flat(new) if _flat(old).get(k) != _flat(new)[k] and not k.startswith("track.")]
                if diff:
                    raise TunelabError(f"--resume: the config differs from the one {out} was started with "
                                       f"({', '.join(diff)}); resume with the same recipe and overrides")
        else:
            raise TunelabError(f"output_dir {out} already holds files; pass --resume to continue that run or "
                               "--overwrite to start again (or set output_dir=...)")
    if write:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(saved, config_mod.to_yaml(cfg))


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def train(cfg, splits: Splits | None = None, resume: bool = False, overwrite: bool = False) -> dict:
    """Run one fine-tuning job; returns the report (also written to cfg.output_dir). Under `accelerate
    launch` / `torchrun` every process runs this same function (tunelab.distributed says how they share)."""
    out = Path(cfg.output_dir)
    tc = cfg.train
    if tc.threads:
        torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)
    dist = distributed.start(tc.device)
    distributed.check_batch(tc.batch_size, dist)
    device = dist.device

    # Data and labels: a dev/test label never seen in training is an error, not a silent zero.
    splits = splits if splits is not None else load_splits(cfg.data, cfg.task)
    labels = check_labels(splits.train, {"dev": splits.dev, "test": splits.test})

    # Model: pretrained backbone + fresh head whose id2label is our label list.
    path = resolve_model_path(cfg.model.name)
    tokenizer = load_tokenizer(path, cfg.model.trust_remote_code)
    model = load_model(path, cfg.task, labels, cfg.model.dropout, cfg.model.trust_remote_code)
    heads = tuning.head_names(model, cfg.task)
    model = tuning.apply(model, cfg.tune, cfg.task, path).to(device)
    max_length = min(cfg.model.max_length, getattr(model.config, "max_position_embeddings", None) or 10**9)
    generation = {}
    if cfg.task == "generate":
        generation = {"encoder_decoder": bool(tuning.base_of(model).config.is_encoder_decoder),
                      "prompt_suffix": cfg.data.prompt_suffix, "max_target_length": cfg.data.max_target_length}
    task = make_task(cfg.task, tokenizer, labels, max_length, cfg.data.context_sentences, **generation)

    features = task.encode(splits.train, training=True)
    check_coverage(features, tokenizer, cfg.model.name, cfg.model.max_unk_share)
    # Only now touch output_dir: a run stopped by a mistake in its data, model path or model choice leaves
    # nothing there that would block the corrected rerun.
    prepare_output(out, cfg, resume, overwrite, write=False)  # every process checks, so that all stop alike,
    dist.barrier()                                            # before the main process clears and writes
    if dist.main:
        prepare_output(out, cfg, resume, overwrite)
    dist.barrier()
    lengths = [len(f["input_ids"]) for f in features]
    trainable, n_params = tuning.count(model)
    log(f"{cfg.task}: {len(splits.train)} train / {len(splits.dev)} dev / {len(splits.test)} test examples, "
        f"{len(labels)} labels; {len(features)} training sequences, {sum(lengths):,} tokens; "
        f"model {path} ({n_params / 1e6:.1f}M params) on {device}")
    log(f"tune.method={cfg.tune.method}: {tuning.describe(trainable, n_params)}")
    log(distributed.describe_batch(tc.batch_size, tc.grad_accum, dist))
    if getattr(task, "truncated", 0):
        log(f"{task.truncated} of {len(features)} training texts are longer than {max_length} tokens and keep "
            "their beginning (raise model.max_length to keep more)")

    batches_per_epoch = math.ceil(len(features) / tc.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / tc.grad_accum)
    total_steps = max(1, math.ceil(tc.epochs * steps_per_epoch))
    optimizer, scheduler = build_optimizer(model, tc.lr, tc.weight_decay, tc.head_lr, tc.scheduler,
                                           round(tc.warmup_ratio * total_steps), total_steps, heads)
    eval_every = tc.eval_every or steps_per_epoch

    state = {"step": 0, "epoch": 0, "batch": 0, "history": [], "evals": [], "best": None, "best_step": None,
             "bad_evals": 0, "stopped_early": False, "train_seconds": 0.0, "tokens": 0, "padded_tokens": 0}
    distributed.seed_ranks(tc.seed, dist)
    found = checkpoint.find(out) if resume else None
    dist.require_shared(found is not None, out)
    if found:
        state = checkpoint.load(found, model, optimizer, scheduler, device, dist.rank)
        log(f"resuming from {found} at step {state['step']}/{total_steps}")
    tracker = track.open(out, config_mod.to_dict(cfg), cfg.track, dist.main, state["step"] if found else None)
    ddp = dist.wrap(model)  # the training forward/backward; evaluation and saving use `model`

    model.train()
    last_save = time.perf_counter()
    bar = progress.bar(total=total_steps, initial=state["step"], desc="train", unit="step")
    while state["step"] < total_steps and not state["stopped_early"]:
        batches = epoch_batches(lengths, tc.batch_size, tc.seed, state["epoch"], tc.group_by_length)
        t0, step_loss, micro, step_tokens, step_rows = time.perf_counter(), 0.0, 0, 0, 0
        step_start = t0
        for b in range(state["batch"], len(batches)):
            # This rank's rows of the global batch (all of them on one process); a rank left without a row
            # (a last batch smaller than the world) runs one row at weight 0.
            mine = dist.shard(batches[b])
            weight = distributed.loss_weight(features, batches[b], mine, dist)
            rows = [features[i] for i in (mine or batches[b][:1])]
            batch = {k: v.to(device) for k, v in collate(rows, task.pad).items()}
            end_of_step = not ((b + 1) % tc.grad_accum and b + 1 < len(batches))
            with dist.no_sync(ddp, sync=end_of_step):  # all-reduce in the step's last backward only
                with autocast(device, tc.bf16):
                    output = ddp(**batch)
                # weight 0 (no labelled token on this rank): a zero gradient, not the NaN of an empty mean
                loss = output.loss if weight else output.logits.float().sum() * 0.0
                ((loss * weight if dist.world > 1 else loss) / tc.grad_accum).backward()
            step_loss += loss.item() * weight / dist.world
            micro += 1
            real = sum(lengths[i] for i in batches[b])
            step_tokens += real
            step_rows += len(batches[b])
            state["tokens"] += real
            state["padded_tokens"] += sum(len(s) * max(lengths[i] for i in s) for s in dist.shards(batches[b]) if s)
            if not end_of_step:
                continue

            # One optimizer step (gradients were all-reduced over the ranks in the last backward).
            grad_norm, lr = optimizer_step(model, optimizer, scheduler, tc.max_grad_norm)
            state["step"] += 1
            state["batch"] = b + 1
            now = time.perf_counter()
            if dist.world > 1:  # every rank's share of the global batch mean
                (step_loss,) = dist.sum([step_loss])
            seconds = now - step_start
            record = {"step": state["step"], "loss": step_loss / micro, "lr": lr, "grad_norm": grad_norm,
                      "seconds": seconds, "tokens": step_tokens, "samples": step_rows,
                      "tokens_per_second": step_tokens / max(1e-9, seconds),
                      "samples_per_second": step_rows / max(1e-9, seconds),
                      "peak_memory_mb": track.peak_memory_mb(device)}
            state["history"].append(record)
            tracker.log(state["step"], {"train/loss": record["loss"], "train/lr": lr, "train/grad_norm": grad_norm,
                                        "train/tokens_per_second": record["tokens_per_second"],
                                        "train/samples_per_second": record["samples_per_second"],
                                        "train/peak_memory_mb": record["peak_memory_mb"]})
            step_loss, micro, step_tokens, step_rows, step_start = 0.0, 0, 0, 0, now
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", refresh=False)

            end_of_epoch = b + 1 == len(batches)
            finished = state["step"] >= total_steps
            evaluated = False
            if splits.dev and (state["step"] % eval_every == 0 or end_of_epoch or finished):
                state["train_seconds"] += time.perf_counter() - t0
                evaluate_dev(task, model, splits.dev, device, tc, state, out, dist, tracker)
                t0 = time.perf_counter()
                evaluated = True
            due = state["step"] % tc.save_every == 0 if tc.save_every else \
                dist.agree(time.perf_counter() - last_save > tc.save_minutes * 60)  # the clock is rank 0's
            if evaluated or due or finished:
                state["train_seconds"] += time.perf_counter() - t0
                rng = distributed.rng_states(dist)
                if dist.main:
                    checkpoint.save(out, model, optimizer, scheduler, state, rng)
                t0 = last_save = time.perf_counter()
            step_start = time.perf_counter()  # a step's seconds leave out evaluation and checkpointing
            if finished or state["stopped_early"]:
                break
        else:
            state["epoch"] += 1
            state["batch"] = 0
        state["train_seconds"] += time.perf_counter() - t0
    bar.close()

    # Model selection on dev; the test split is evaluated once, on the selected weights.
    dist.barrier()  # the main process's last writes are on disk before any rank reads them
    restored = bool(splits.dev) and checkpoint.load_best(out, model, device)
    dist.require_shared(restored, out)
    if restored:
        log(f"restored the best dev weights (step {state['best_step']}, dev {state['best']:.4f})")
    report = {
        "task": cfg.task, "model": str(cfg.model.name), "labels": labels, "data": splits.about,
        "sizes": {"train": len(splits.train), "dev": len(splits.dev), "test": len(splits.test)},
        "steps": state["step"], "total_steps": total_steps, "stopped_early": state["stopped_early"],
        "best_step": state["best_step"], "train_seconds": round(state["train_seconds"], 2),
        "train_tokens": state["tokens"],
        "padding_share": 1 - state["tokens"] / max(1, state["padded_tokens"]),
        "tokens_per_second": state["tokens"] / max(1e-9, state["train_seconds"]),
        "processes": dist.world, "global_batch": tc.batch_size * tc.grad_accum,
        "peak_memory_mb": track.peak_memory_mb(device),
        "tune": {"method": cfg.tune.method, "trainable_params": trainable, "total_params": n_params},
        "seed": tc.seed, "history": state["history"], "evals": state["evals"],
        "dev": next((e["metrics"] for e in state["evals"] if e["step"] == state["best_step"]), None),
        "test": None,
    }
    if splits.test:
        report["test"] = evaluate(task, model, splits.test, device, tc.bf16, desc="test", dist=dist)
        tracker.log(state["step"], track.metric_scalars("test", report["test"]))
    tracker.close()
    if cfg.task == "generate" and (splits.test or splits.dev) and dist.main:
        report["samples"] = sample_outputs(task, model, splits.test or splits.dev, device, tc.bf16)
    if dist.main:
        save_model_folder(out, model, tokenizer, cfg, labels, max_length, generation)
        from tunelab.report import write_report

        write_report(out, report)
        shutil.rmtree(out / checkpoint.NAME, ignore_errors=True)
        (out / checkpoint.BEST).unlink(missing_ok=True)
    dist.barrier()  # no rank returns before the model folder is complete
    return report


def sample_outputs(task, model, examples, device, bf16) -> list[dict]:
    """Generation: the first SAMPLES examples' greedy outputs beside their prompts and references (report)."""
    shown = examples[:SAMPLES]
    outputs = predict(task, model, shown, device, bf16)
    return [{"prompt": e.prompt, "reference": e.target, "output": o} for e, o in zip(shown, outputs)]


def check_coverage(features, tokenizer, model_name, max_share) -> None:
    """A tokenizer whose vocabulary lacks the data's script turns it into [UNK]: training would 'work' and
    learn next to nothing. Say so before spending the compute."""
    unk = tokenizer.unk_token_id
    if unk is None:
        return
    total = sum(len(f["input_ids"]) for f in features)
    share = sum(t == unk for f in features for t in f["input_ids"]) / max(1, total)
    if share > max_share:
        raise TunelabError(f"model {model_name}: its tokenizer reads {share:.0%} of the training tokens as "
                           f"{tokenizer.unk_token} (limit model.max_unk_share={max_share}); it cannot read this "
                           "data. Use a model whose vocabulary covers the text's script (model.name=FOLDER), or "
                           "set model.max_unk_share=1 to train anyway")
    if share > 0.05:
        log(f"warning: {share:.1%} of the training tokens are {tokenizer.unk_token} for this tokenizer")


def evaluate_dev(task, model, dev, device, tc, state, out, dist, tracker) -> None:
    """Every rank evaluates its share and gets the same metrics, so all agree on best step and stopping."""
    metrics = evaluate(task, model, dev, device, tc.bf16, desc="dev", dist=dist)
    state["evals"].append({"step": state["step"], "epoch": state["epoch"], "dev": metrics["main"],
                           "metrics": metrics})
    tracker.log(state["step"], track.metric_scalars("dev", metrics))
    improved = state["best"] is None or metrics["main"] > state["best"]
    if improved:
        state["best"], state["best_step"], state["bad_evals"] = metrics["main"], state["step"], 0
        if dist.main:
            checkpoint.save_best(out, model)
    else:
        state["bad_evals"] += 1
        if tc.patience is not None and state["bad_evals"] >= tc.patience:
            state["stopped_early"] = True
    log(f"step {state['step']}: dev {metrics['main']:.4f}" + (" (best)" if improved else
        f" (best {state['best']:.4f} at step {state['best_step']})") +
        (" -> early stop" if state["stopped_early"] else ""))


def save_model_folder(out: Path, model, tokenizer, cfg, labels, max_length, generation=None) -> None:
    """The model folder. Full, BitFit and head-only runs: weights (safetensors), config with id2label and the
    tokenizer, which plain transformers loads. Adapter runs: the peft adapter (adapter_config.json +
    adapter_model.safetensors, the task head included) with the base config carrying id2label, which plain peft
    loads onto the base model; with tune.merge also the merged full model in OUTPUT_DIR/merged. Both get
    tunelab.json, tunelab's own metadata."""
    from tunelab.models import PACKAGED

    base = cfg.model.name if cfg.model.name in PACKAGED else str(Path(cfg.model.name).resolve())
    meta = {"task": cfg.task, "labels": labels, "max_length": max_length,
            "context_sentences": cfg.data.context_sentences, "base_model": base, "tune": cfg.tune.method,
            "tunelab_format": 1}
    if generation:
        meta["generation"] = generation
    adapter = cfg.tune.method in tuning.ADAPTERS
    if adapter:
        meta.update(adapter=True, virtual_tokens=cfg.tune.virtual_tokens)

    def write(folder: Path, m) -> None:
        m.save_pretrained(str(folder))
        if adapter and m is model:
            tuning.base_of(model).config.save_pretrained(str(folder))
        tokenizer.save_pretrained(str(folder))

    publish(out, lambda folder: write(folder, model), meta)
    if cfg.tune.merge:
        merged = model.merge_and_unload()  # folds the adapter into the weights, in place
        publish(out / "merged", lambda folder: write(folder, merged), {**meta, "adapter": False, "merged": True})


def publish(out: Path, write, meta: dict) -> None:
    """Files are written to a temporary folder and then moved into place, so that a kill never leaves a
    half-written file in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False))
    for f in tmp.iterdir():
        f.replace(out / f.name)
    tmp.rmdir()
