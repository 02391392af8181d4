"""Supervised fine-tuning (NER, text classification, generation) as one readable loop.

data -> features (per epoch) -> length-grouped batches -> the shared step (tunelab.train.step) -> AdamW
steps with warmup/decay, clipping and accumulation -> dev evaluation -> best weights kept, early stopping ->
atomic checkpoints -> test once on the selected weights -> model folder that plain transformers loads, with
report. The run's life (output_dir, save cadence, selection, publishing) is tunelab.train.run's.
"""

import math
import time
from pathlib import Path

import torch

from tunelab import config as config_mod
from tunelab import distributed
from tunelab import peft as tuning
from tunelab import progress, track
from tunelab.data import Splits, check_labels, load_splits
from tunelab.data.batching import collate, epoch_batches, padded_length
from tunelab.errors import TunelabError
from tunelab.models import crf
from tunelab.models import (check_coverage, continue_adapter, head_labels, load_model, load_tokenizer,
                            recompute_activations, resolve_model_path)
from tunelab.models.trim import trim_vocab
from tunelab.robust import augmenter_from_config, step_from_config
from tunelab.tasks import task_type
from tunelab.train import checkpoint, run
from tunelab.train.optim import build_optimizer, step as optimizer_step
from tunelab.train.run import log
from tunelab.train.step import Step, mean_logs, micro_batch


def train(cfg, splits: Splits | None = None, resume: bool = False, overwrite: bool = False, *,
          step: Step | None = None, epoch_data=None, on_eval=None, test: bool = True) -> dict:
    """Run one fine-tuning job; returns the report (also written to cfg.output_dir). Under `accelerate
    launch` / `torchrun` every process runs this same function (tunelab.distributed says how they share).

    step: the components that change how a step's gradient is computed (loss terms, a perturbation);
    default none. epoch_data(seed, epoch) -> that epoch's training features (default: the training set
    encoded once, the same every epoch); it must be a pure function of its arguments, so that a resumed run
    sees the same data. on_eval(step, score) after each dev evaluation (score: the task's 0-1 score of the
    dev metrics) -> a reason to stop now (e.g. a search's pruner), or None; a stopped run ends as an early
    stop does (best weights restored, folder and report written). test: False leaves the test split alone
    (a search selects on dev and evaluates the test split once, at its end)."""
    out, tc = Path(cfg.output_dir), cfg.train
    if tc.threads:
        torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)
    dist = distributed.start(tc.device)
    distributed.check_batch(tc.batch_size, dist)
    device = dist.device
    step = step or step_from_config(cfg.robust, tc.seed)  # the robust: section's components, if any

    # Data and labels: a dev/test label never seen in training is an error, not a silent zero.
    splits = splits if splits is not None else load_splits(cfg.data, cfg.task)
    path = resolve_model_path(cfg.model.name)
    saved = run.read_meta(path) if (path / run.META_FILE).is_file() else None
    # A fine-tuned folder (continued training on new data) keeps its head's labels, new ones after them.
    start = (saved.get("labels") if saved and saved.get("adapter") else head_labels(path, cfg.task)) \
        if cfg.model.head == "keep" and not (saved and saved.get("task") not in (None, cfg.task)) else None
    labels = check_labels(splits.train, {"dev": splits.dev, "test": splits.test}, start=start or None)
    if start:
        added = [x for x in labels if x not in start]
        log(f"model {cfg.model.name}: continuing its trained head ({len(start)} labels" +
            (f"; widened for {len(added)} new: {', '.join(added[:8])}{' ...' if len(added) > 8 else ''})"
             if added else ")"))

    # Model: pretrained backbone + fresh head whose id2label is our label list; the task that feeds it.
    tokenizer = load_tokenizer(path, cfg.model.trust_remote_code)
    if saved and saved.get("adapter"):  # an adapter folder: its base with the adapter, trained on (or merged)
        model, tuned = continue_adapter(path, saved, cfg.task, labels, cfg.tune, cfg.model.dropout)
    else:
        model, tuned = load_model(path, cfg.task, labels, cfg.model.dropout, cfg.model.trust_remote_code), False
    max_length = min(cfg.model.max_length, getattr(model.config, "max_position_embeddings", None) or 10**9)
    kind = task_type(cfg.task)
    options = {**kind.options(cfg.data, tuning.base_of(model).config), **({"crf": True} if cfg.model.crf else {})}
    if cfg.model.trim_vocab:  # (before tuning and the task: both see only the trimmed vocabulary)
        if saved and saved.get("adapter"):
            raise TunelabError("model.trim_vocab: an adapter's base model cannot be trimmed; leave the key out")
        probe = kind.build(tokenizer, labels, max_length, options)
        tokenizer, trim = trim_vocab(model, tokenizer, probe.encode(splits.train + splits.dev, training=True),
                                     cfg.model.trim_reserve)
        log(f"model.trim_vocab: {trim['pieces_before']:,} -> {trim['pieces_after']:,} pieces ({trim['used']:,} "
            f"used by the training and dev data, {trim['reserve']:,} in reserve)")
    heads = tuning.head_names(tuning.base_of(model), cfg.task)
    model = (model if tuned else tuning.apply(model, cfg.tune, cfg.task, path)).to(device)
    if cfg.model.crf:  # (after tuning: every method trains the CRF)
        crf.attach(model, labels)
    if tc.gradient_checkpointing:
        recompute_activations(model)
    task = kind.build(tokenizer, labels, max_length, options)

    features = task.encode(splits.train, training=True)
    check_coverage(features, tokenizer, cfg.model.name, cfg.model.max_unk_share, warn=log)
    epoch_data = epoch_data or augmenter_from_config(cfg.robust, splits.train, task, model) or \
        (lambda seed, epoch, encoded=features: task.epoch_features(encoded, seed, epoch))
    run.claim_output(out, cfg, resume, overwrite, dist)
    lengths = [len(f["input_ids"]) for f in features]
    trainable, n_params = tuning.count(model)
    log(f"{cfg.task}: {len(splits.train)} train / {len(splits.dev)} dev / {len(splits.test)} test examples, "
        f"{len(labels)} labels; {len(features)} training sequences, {sum(lengths):,} tokens; "
        f"model {path} ({n_params / 1e6:.1f}M params) on {device}")
    log(f"tune.method={cfg.tune.method}: {tuning.describe(trainable, n_params)}")
    log(distributed.describe_batch(tc.batch_size, tc.grad_accum, dist))
    if not splits.dev:
        log("no dev split: no model selection or early stopping; the weights of the last step are saved (give "
            "data.dev to select the best checkpoint)")
    if getattr(task, "truncated", 0):
        log(f"{task.truncated} of {len(features)} training texts are longer than {max_length} tokens and keep "
            "their beginning (raise model.max_length to keep more)")

    steps_per_epoch = math.ceil(math.ceil(len(features) / tc.batch_size) / tc.grad_accum)
    # train.epochs=0: no step at all; the model is evaluated as it is (zero-shot prompting, a baseline)
    total_steps = run.step_limit(max(1, math.ceil(tc.epochs * steps_per_epoch)), tc.max_steps) if tc.epochs else 0
    optimizer, scheduler = build_optimizer(model, tc.lr, tc.weight_decay, tc.head_lr, tc.scheduler,
                                           round(tc.warmup_ratio * total_steps), max(1, total_steps), heads,
                                           {"crf": cfg.model.crf_lr} if cfg.model.crf else None)
    eval_every = tc.eval_every or steps_per_epoch

    state = {"step": 0, "epoch": 0, "batch": 0, "history": [], "evals": [], "train_seconds": 0.0, "tokens": 0,
             "padded_tokens": 0}
    distributed.seed_ranks(tc.seed, dist)
    found = checkpoint.find(out) if resume else None
    dist.require_shared(found is not None, out)
    if found:
        state = checkpoint.load(found, model, optimizer, scheduler, device, dist.rank, step.stateful())
        log(f"resuming from {found} at step {state['step']}/{total_steps}")
    select = run.KeepBest(state, tc.patience)
    clock = run.SaveClock(tc.save_every, tc.save_minutes, dist)
    tracker = track.open(out, config_mod.to_dict(cfg), cfg.track, dist.main, state["step"] if found else None)
    ddp = dist.wrap(model)  # the training forward/backward; evaluation and saving use `model`
    forward = task.objective(ddp)  # (the model's own loss, or one the task forms from its outputs)

    model.train()
    pace = run.Pace(device, torch.get_num_threads())
    bar = progress.bar(total=total_steps, initial=state["step"], desc="train", unit="step")
    while state["step"] < total_steps and not state["stopped_early"]:
        features = epoch_data(tc.seed, state["epoch"])
        lengths = [len(f["input_ids"]) for f in features]
        batches = epoch_batches(lengths, tc.batch_size, tc.seed, state["epoch"], tc.group_by_length, tc.length_pool,
                                step_batches=tc.grad_accum)
        weights = distributed.batch_weights(features, batches) if tc.loss_weighting == "tokens" else None
        t0 = step_start = time.perf_counter()
        results, step_tokens, step_rows = [], 0, 0
        for b in range(state["batch"], len(batches)):
            # This rank's rows of the global batch (all of them on one process); a rank left without a row
            # (a last batch smaller than the world) runs one row at weight 0.
            mine = dist.shard(batches[b])
            share = distributed.loss_weight(features, batches[b], mine, dist)
            batch = {k: v.to(device) for k, v in collate([features[i] for i in (mine or batches[b][:1])],
                                                          task.pad, tc.pad_to_multiple_of).items()}
            end_of_step = not ((b + 1) % tc.grad_accum and b + 1 < len(batches))
            with dist.no_sync(ddp, sync=end_of_step):  # all-reduce in the step's last backward only
                results.append(micro_batch(forward, model, batch, device=device, bf16=tc.bf16, step=step, share=share,
                                           accum=tc.grad_accum, weight=weights[b] if weights else 1.0))
            real = sum(lengths[i] for i in batches[b])
            step_tokens, step_rows, state["tokens"] = step_tokens + real, step_rows + len(batches[b]), \
                state["tokens"] + real
            state["padded_tokens"] += sum(len(s) * padded_length([lengths[i] for i in s], tc.pad_to_multiple_of)
                                          for s in dist.shards(batches[b]) if s)
            if not end_of_step:
                continue

            # One optimizer step (gradients were all-reduced over the ranks in the last backward).
            grad_norm, lr = optimizer_step(model, optimizer, scheduler, tc.max_grad_norm)
            state["step"], state["batch"] = state["step"] + 1, b + 1
            (step_loss,) = dist.sum([sum(r.loss / dist.world for r in results)])  # every rank's share of the mean
            record = run.step_record(state["step"], step_loss / len(results), lr, grad_norm,
                                     time.perf_counter() - step_start, step_tokens, step_rows, device,
                                     mean_logs(results))
            state["history"].append(record)
            tracker.log(state["step"], run.step_scalars(record))
            pace.watch(record)
            results, step_tokens, step_rows = [], 0, 0
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", refresh=False)

            end_of_epoch = b + 1 == len(batches)
            finished = state["step"] >= total_steps
            evaluated = bool(splits.dev) and (state["step"] % eval_every == 0 or end_of_epoch or finished)
            if evaluated:
                state["train_seconds"] += time.perf_counter() - t0
                evaluate_dev(task, model, splits.dev, device, tc.bf16, state, select, out, dist, tracker)
                run.ask_to_stop(on_eval, state, task.score(state["evals"][-1]["metrics"]))
                t0 = time.perf_counter()
            due = clock.due(state["step"])  # (every rank asks: the clock's answer is a collective one)
            if evaluated or due or finished:
                state["train_seconds"] += time.perf_counter() - t0
                rng = distributed.rng_states(dist)
                if dist.main:
                    checkpoint.save(out, model, optimizer, scheduler, state, rng, step.stateful())
                clock.saved()
                t0 = time.perf_counter()
            step_start = time.perf_counter()  # a step's seconds leave out evaluation and checkpointing
            if finished or state["stopped_early"]:
                break
        else:
            state["epoch"], state["batch"] = state["epoch"] + 1, 0
        state["train_seconds"] += time.perf_counter() - t0
    bar.close()
    if not total_steps and splits.dev:  # (no weights to keep aside: the model is the one it started as)
        log("train.epochs=0: no training; the model is evaluated as it is")
        metrics = task.evaluate(model, splits.dev, device, tc.bf16, desc="dev", dist=dist)
        state["evals"].append({"step": 0, "epoch": 0, "dev": metrics["main"], "metrics": metrics})
        select.update(metrics["main"], 0)
        tracker.log(0, track.metric_scalars("dev", metrics))

    # Model selection on dev; the test split is evaluated once, on the selected weights.
    if state["evals"] and not any(task.score(e["metrics"]) for e in state["evals"]):
        log(f"dev {kind.main_name} stayed at 0 over {len(state['evals'])} evaluation(s): the model has not learned "
            f"the task yet ({state['step']} steps). Train longer (train.epochs), or take more steps with a smaller "
            "train.batch_size, or a larger train.lr")
    if splits.dev and total_steps:
        run.restore_best(out, model, device, dist, state)
    else:
        dist.barrier()
    report = {
        "task": cfg.task, "model": str(cfg.model.name), "labels": labels, "data": splits.about,
        "sizes": {"train": len(splits.train), "dev": len(splits.dev), "test": len(splits.test)},
        "steps": state["step"], "total_steps": total_steps, "stopped_early": state["stopped_early"],
        "stopped_by": state.get("stopped_by"),
        "best_step": state["best_step"], "train_seconds": round(state["train_seconds"], 2),
        "train_tokens": state["tokens"],
        "padding_share": 1 - state["tokens"] / max(1, state["padded_tokens"]),
        "tokens_per_second": state["tokens"] / max(1e-9, state["train_seconds"]),
        "processes": dist.world, "global_batch": tc.batch_size * tc.grad_accum,
        "peak_memory_mb": track.peak_memory_mb(device),
        "tune": {"method": cfg.tune.method, "trainable_params": trainable, "total_params": n_params},
        "robust": config_mod.to_dict(cfg.robust),  # the robust: section, so that runs compare by method
        "seed": tc.seed, "history": state["history"], "evals": state["evals"],
        "dev": next((e["metrics"] for e in state["evals"] if e["step"] == state["best_step"]), None),
        "test": None,
    }
    if report["dev"]:
        task.settle(report["dev"])  # decision settings from the selected dev evaluation (multi-label threshold)
    if splits.test and test:
        report["test"] = task.evaluate(model, splits.test, device, tc.bf16, desc="test", dist=dist)
        tracker.log(state["step"], track.metric_scalars("test", report["test"]))
    tracker.close()
    shown = splits.test or splits.dev
    samples = task.samples(model, shown, device, tc.bf16) if shown and dist.main else None
    if samples is not None:
        report["samples"] = samples
    if dist.main:
        run.save_model_folder(out, model, tokenizer, cfg, task)
        from tunelab.report import write_report

        write_report(out, report)
        run.clean_up(out)
    dist.barrier()  # no rank returns before the model folder is complete
    return report


def evaluate_dev(task, model, dev, device, bf16, state, select, out, dist, tracker) -> None:
    """Every rank evaluates its share and gets the same metrics, so all agree on best step and stopping."""
    metrics = task.evaluate(model, dev, device, bf16, desc="dev", dist=dist)
    state["evals"].append({"step": state["step"], "epoch": state["epoch"], "dev": metrics["main"],
                           "metrics": metrics})
    tracker.log(state["step"], track.metric_scalars("dev", metrics))
    improved = select.update(metrics["main"], state["step"])
    if improved and dist.main:
        checkpoint.save_best(out, model)
    log(f"step {state['step']}: dev {metrics['main']:.4f}" + select.note(improved))
