"""Multi-task fine-tuning ("strategy network") as one readable loop.

tasks (each: data -> task features, per epoch) -> one shared backbone with a head per task -> each step,
batches drawn from the tasks by the sampler -> the shared step (tunelab.train.step) per batch, task losses
weighted (fixed / uncertainty) or their gradients surgered (PCGrad) -> AdamW step -> every task evaluated on
its own dev set, the aggregate selects the checkpoint and drives early stopping -> atomic checkpoints -> test
once per task on the selected weights -> one folder with the backbone and every head (`tunelab export`
writes any one task as a plain transformers model). The run's life is tunelab.train.run's.
"""

import math
import random
import time
from pathlib import Path

import torch

from tunelab import config as config_mod
from tunelab import distributed
from tunelab import peft as tuning
from tunelab import progress, track
from tunelab.data import check_labels, load_splits
from tunelab.data.batching import collate
from tunelab.errors import TunelabError
from tunelab.models import check_coverage, load_tokenizer, resolve_model_path
from tunelab.multitask import model as mtm
from tunelab.multitask.sampling import TaskStream, pick_task, task_probabilities
from tunelab.multitask.weighting import UncertaintyWeights, pcgrad
from tunelab.robust import augmenter_from_config, step_from_config
from tunelab.tasks import task_type
from tunelab.train import checkpoint, run
from tunelab.train.optim import build_optimizer, step as optimizer_step
from tunelab.train.run import log
from tunelab.train.step import Step, mean_logs, micro_batch


def train(cfg, resume: bool = False, overwrite: bool = False, *, step: Step | None = None,
          epoch_data: dict | None = None, on_eval=None, test: bool = True) -> dict:
    """step: components that change how each batch's gradient is computed (tunelab.train.step).
    epoch_data: task name -> f(seed, epoch) -> that epoch's training features for the task (default: its
    training set encoded once); pure functions, each epoch of a task the same number of features.
    on_eval(step, score) and test: as in the supervised recipe (score: the selection score, the mean of the
    tasks' dev scores or multitask.select's)."""
    out = Path(cfg.output_dir)
    tc, mc = cfg.train, cfg.multitask
    if tc.threads:
        torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)
    # Distributed (tunelab.distributed): train.batch_size is the global batch; every rank draws the same
    # tasks and batches and runs its slice. Heads of tasks not in a step take no part: DDP must allow that.
    dist = distributed.start(tc.device, find_unused=True)
    distributed.check_batch(tc.batch_size, dist)
    device = dist.device
    names = list(cfg.tasks)
    step = step or step_from_config(cfg.robust, tc.seed)  # the robust: section's components, if any

    # Data and labels per task.
    splits, labels = {}, {}
    for name, spec in cfg.tasks.items():
        try:
            splits[name] = load_splits(spec.data, spec.task)
            labels[name] = check_labels(splits[name].train, {"dev": splits[name].dev, "test": splits[name].test})
        except TunelabError as e:
            raise TunelabError(f"tasks.{name}: {e}") from None

    if mc.select != "mean" and not splits[mc.select].dev:
        raise TunelabError(f"multitask.select={mc.select}: task {mc.select} has no dev set to select on; give it "
                           "data.dev or select on the mean")

    path = resolve_model_path(cfg.model.name)
    tokenizer = load_tokenizer(path, cfg.model.trust_remote_code)
    model = build_model(cfg, path, tokenizer, labels).to(device)
    tasks, features = {}, {}
    limit = getattr(model.backbone.config, "max_position_embeddings", None) or 10**9
    for name, spec in cfg.tasks.items():
        kind = task_type(spec.task)
        tasks[name] = kind.build(tokenizer, labels[name], min(spec.max_length or cfg.model.max_length, limit),
                                 kind.options(spec.data, model.backbone.config))
        features[name] = tasks[name].encode(splits[name].train, training=True)
        check_coverage(features[name], tokenizer, cfg.model.name, cfg.model.max_unk_share, warn=log)
    run.claim_output(out, cfg, resume, overwrite, dist)

    trainable, n_params = tuning.count(model)
    log(f"multitask on {path} ({n_params / 1e6:.1f}M params) on {device}; tune.method={cfg.tune.method}: "
        f"{tuning.describe(trainable, n_params)}")
    sizes = {n: len(features[n]) for n in names}
    for n in names:
        log(f"  task {n} ({cfg.tasks[n].task}): {len(splits[n].train)} train / {len(splits[n].dev)} dev / "
            f"{len(splits[n].test)} test, {len(labels[n])} labels, {sizes[n]} training sequences")

    # The budget: train.epochs passes over all tasks' batches, whichever way they are drawn.
    per_step = tc.grad_accum * (len(names) if mc.mix == "all" else 1)
    steps_per_epoch, total_steps = step_budget(sizes.values(), tc.batch_size, tc.epochs, per_step)
    total_steps = run.step_limit(total_steps, tc.max_steps)
    heads = mtm.head_modules(model) | {"uncertainty"}
    optimizer, scheduler = build_optimizer(model, tc.lr, tc.weight_decay, tc.head_lr, tc.scheduler,
                                           round(tc.warmup_ratio * total_steps), total_steps, heads)
    eval_every = tc.eval_every or steps_per_epoch
    epoch_data = {n: (epoch_data or {}).get(n) or
                  augmenter_from_config(cfg.robust, splits[n].train, tasks[n], model.heads[n], same_count=True) or
                  (lambda seed, epoch, encoded=features[n]: encoded) for n in names}
    streams = {n: TaskStream(epoch_data[n], sizes[n], tc.batch_size, tc.seed + i, tc.group_by_length, n,
                             tc.length_pool)
               for i, n in enumerate(names)}
    shared = [p for p in model.backbone.parameters() if p.requires_grad]
    weigh = model.uncertainty if mc.weighting == "uncertainty" else lambda name, loss: cfg.tasks[name].weight * loss
    start = task_probabilities(sizes, mc.sampling, mc.temperature, 0.0, mc.anneal_min)
    log("sampling " + mc.sampling + ": " + ", ".join(f"{n} {p:.1%}" for n, p in start.items()) +
        (" at the start" if mc.sampling == "annealed" else "") + f"; {total_steps} steps of "
        f"{per_step} batch(es) of {tc.batch_size}; weighting {mc.weighting}")
    log(distributed.describe_batch(tc.batch_size, tc.grad_accum, dist))

    state = {"step": 0, "draws": 0, "drawn": {n: 0 for n in names}, "history": [], "evals": [],
             "train_seconds": 0.0, "tokens": 0}
    distributed.seed_ranks(tc.seed, dist)
    found = checkpoint.find(out) if resume else None
    dist.require_shared(found is not None, out)
    if found:
        state = checkpoint.load(found, model, optimizer, scheduler, device, dist.rank, step.stateful())
        log(f"resuming from {found} at step {state['step']}/{total_steps}")
    select = run.KeepBest(state, tc.patience)
    clock = run.SaveClock(tc.save_every, tc.save_minutes, dist)
    tracker = track.open(out, config_mod.to_dict(cfg), cfg.track, dist.main, state["step"] if found else None)
    ddp = dist.wrap(model, outside_forward=("uncertainty.",))  # training; evaluation and saving use `model`

    model.train()
    pace = run.Pace(device, torch.get_num_threads())
    bar = progress.bar(total=total_steps, initial=state["step"], desc="train", unit="step")
    while state["step"] < total_steps and not state["stopped_early"]:
        t0 = time.perf_counter()
        probs = task_probabilities(sizes, mc.sampling, mc.temperature, state["step"] / total_steps, mc.anneal_min)
        if mc.mix == "all":
            picks = [names] * tc.grad_accum
        else:
            picks = [[pick_task(names, probs, mc.sampling, tc.seed, state["draws"] + k)] for k in range(tc.grad_accum)]
            state["draws"] += tc.grad_accum
        work, shares, tokens, rows = [], [], 0, 0
        for name in (name for micro in picks for name in micro):
            idx = streams[name].batch(state["drawn"][name])  # the global batch; this rank's slice of it
            state["drawn"][name] += 1
            feats, mine = streams[name].features, dist.shard(idx)
            shares.append(distributed.loss_weight(feats, idx, mine, dist))
            batch = collate([feats[i] for i in (mine or idx[:1])], tasks[name].pad, tc.pad_to_multiple_of)
            work.append((name, {k: v.to(device) for k, v in batch.items()}))
            tokens += sum(streams[name].lengths[i] for i in idx)
            rows += len(idx)
        surgery = random.Random(tc.seed * 7919 + state["step"]) if mc.weighting == "pcgrad" else None
        total, losses, extra = backward(ddp, work, weigh, tc.grad_accum, device, tc.bf16, shared, surgery, shares,
                                        step=step, plain=model, logs=True)
        if mc.weighting == "uncertainty":
            dist.average_grads(model.uncertainty.parameters())
        if dist.world > 1:  # each rank holds its share of the global means
            summed = dist.sum([total / dist.world] + [losses[n] / dist.world for n in losses])
            total, losses = summed[0], dict(zip(losses, summed[1:]))

        grad_norm, lr = optimizer_step(model, optimizer, scheduler, tc.max_grad_norm)
        state["step"] += 1
        state["tokens"] += tokens
        extra = {"tasks": losses, **extra}
        if mc.weighting == "uncertainty":
            extra["weights"] = model.uncertainty.weights()
        record = run.step_record(state["step"], total, lr, grad_norm, time.perf_counter() - t0, tokens, rows,
                                 device, extra)
        state["history"].append(record)
        tracker.log(state["step"], run.step_scalars(record))
        pace.watch(record)
        bar.update(1)
        bar.set_postfix(loss=f"{total:.4f}", lr=f"{lr:.2e}", refresh=False)

        finished = state["step"] >= total_steps
        state["train_seconds"] += time.perf_counter() - t0
        evaluated = state["step"] % eval_every == 0 or finished
        if evaluated:
            evaluate_dev(cfg, model, tasks, splits, device, state, select, out, dist, tracker)
            if state["evals"] and state["evals"][-1]["step"] == state["step"]:
                run.ask_to_stop(on_eval, state, state["evals"][-1]["dev"])
        if clock.due(state["step"]) or evaluated:
            rng = distributed.rng_states(dist)
            if dist.main:
                checkpoint.save(out, model, optimizer, scheduler, state, rng, step.stateful())
            clock.saved()
    bar.close()

    run.restore_best(out, model, device, dist, state)
    report = {
        "task": "multitask", "model": str(cfg.model.name), "seed": tc.seed, "steps": state["step"],
        "total_steps": total_steps, "stopped_early": state["stopped_early"], "best_step": state["best_step"],
        "stopped_by": state.get("stopped_by"),
        "select": mc.select, "sampling": mc.sampling, "weighting": mc.weighting, "mix": mc.mix,
        "train_seconds": round(state["train_seconds"], 2), "train_tokens": state["tokens"],
        "tokens_per_second": state["tokens"] / max(1e-9, state["train_seconds"]),
        "processes": dist.world, "global_batch": tc.batch_size * tc.grad_accum,
        "peak_memory_mb": track.peak_memory_mb(device),
        "tune": {"method": cfg.tune.method, "trainable_params": trainable, "total_params": n_params},
        "robust": config_mod.to_dict(cfg.robust),  # the robust: section, so that runs compare by method
        "history": state["history"], "evals": state["evals"], "dev": state["best"], "tasks": {},
    }
    best = next((e for e in state["evals"] if e["step"] == state["best_step"]), None)
    drawn = sum(state["drawn"].values())
    for n in names:
        entry = {"task": cfg.tasks[n].task, "labels": labels[n], "data": splits[n].about,
                 "weight": cfg.tasks[n].weight,
                 "sizes": {"train": len(splits[n].train), "dev": len(splits[n].dev), "test": len(splits[n].test)},
                 "batches": state["drawn"][n], "batch_share": state["drawn"][n] / max(1, drawn),
                 "dev": best["tasks"][n] if best else None, "test": None}
        head = model.use(n)
        if best:
            tasks[n].settle(best["tasks"][n])  # decision settings from the selected dev evaluation
        if splits[n].test and test:
            entry["test"] = tasks[n].evaluate(head, splits[n].test, device, tc.bf16, desc=f"test {n}", dist=dist)
            tracker.log(state["step"], track.metric_scalars(f"test/{n}", entry["test"]))
        shown = splits[n].test or splits[n].dev
        samples = tasks[n].samples(head, shown, device, tc.bf16) if shown and dist.main else None
        if samples is not None:
            entry["samples"] = samples
        report["tasks"][n] = entry
    if mc.weighting == "uncertainty":
        report["final_weights"] = model.uncertainty.weights()
    tracker.close()
    if dist.main:
        save_folder(out, model, tokenizer, cfg, tasks)
        from tunelab.report.multitask import write_report

        write_report(out, report)
        run.clean_up(out)
    dist.barrier()  # no rank returns before the folder is complete
    return report


def build_model(cfg, path, tokenizer, labels: dict):
    """One backbone with a head per task (and per-task LoRA adapters, or BitFit / head-only training, and
    frozen layers as tune.* says; uncertainty weights under multitask.weighting=uncertainty)."""
    names, mc = list(cfg.tasks), cfg.multitask
    model = mtm.build(path, {n: (cfg.tasks[n].task, labels[n]) for n in names}, cfg.model.dropout,
                      trust_remote_code=cfg.model.trust_remote_code, pad_id=tokenizer.pad_token_id)
    if cfg.tune.method == "lora":
        mtm.add_adapters(model, names, cfg.tune.lora_r, cfg.tune.lora_alpha, cfg.tune.lora_dropout,
                         cfg.tune.target_modules)
        if mc.train_backbone:
            for p in model.backbone.parameters():
                p.requires_grad = True
    elif cfg.tune.method in ("bitfit", "head"):
        for n, p in model.backbone.named_parameters():
            p.requires_grad = cfg.tune.method == "bitfit" and n.endswith(".bias")
    tuning.freeze(model.backbone, cfg.tune.freeze_embeddings, cfg.tune.freeze_layers)
    if mc.weighting == "uncertainty":
        model.uncertainty = UncertaintyWeights(names)
    return model


def step_budget(sizes, batch_size: int, epochs: float, per_step: int = 1) -> tuple[int, int]:
    """(steps per epoch, total steps): an epoch is one pass over every task's batches, `per_step` batches an
    optimizer step (grad_accum, times the number of tasks under mix=all)."""
    per_epoch = math.ceil(sum(math.ceil(s / batch_size) for s in sizes) / per_step)
    return per_epoch, max(1, math.ceil(epochs * per_epoch))


def backward(model, work, weigh, accum: int, device, bf16, shared=(), surgery=None, shares=None, *,
             step: Step | None = None, plain=None, logs: bool = False):
    """Forward and backward every (task name, batch) of one optimizer step through the shared step
    (tunelab.train.step.micro_batch), gradients left in .grad.

    model: the multi-task model (DDP-wrapped in a distributed run; `plain` is then the model itself).
    shares: per batch, the factor on this process's loss in a distributed run (tunelab.distributed.loss_weight;
    None: 1, one process), so that the gradients DDP averages are those of the global batch. Each backward is
    all-reduced (no no_sync): PCGrad needs every task's global gradient apart, and an average of sums is the
    sum of averages anyway. The returned losses are this process's shares (summed over processes by the recipe).

    weigh(name, loss) -> the loss to differentiate. With `surgery` (a random.Random: PCGrad), each task's
    gradient on the `shared` parameters is kept apart, and their PCGrad combination is what is left in .grad;
    other parameters (heads, adapters, loss weights) belong to one task and just accumulate.
    Returns (the step's weighted loss, each task's mean unweighted loss), and with `logs` also the step's
    loss-term and perturbation scalars."""
    plain = plain if plain is not None else model
    losses, total, apart, results = {}, 0.0, {}, []
    for (name, batch), share in zip(work, shares or [1.0] * len(work)):
        r = micro_batch(lambda **inputs: model(name, **inputs), plain.heads[name], batch, device=device, bf16=bf16,
                        step=step, share=share, accum=accum, weigh=lambda loss: weigh(name, loss))
        if surgery is not None:
            g = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in shared])
            apart[name] = apart[name] + g if name in apart else g
            for p in shared:
                p.grad = None
        losses.setdefault(name, []).append(r.loss)
        total += r.objective
        results.append(r)
    if surgery is not None:
        flat = pcgrad(list(apart.values()), surgery)
        offset = 0
        for p in shared:
            p.grad = flat[offset:offset + p.numel()].view_as(p).to(p.dtype)
            offset += p.numel()
    means = {n: sum(v) / len(v) for n, v in losses.items()}
    return (total, means, mean_logs(results)) if logs else (total, means)


def evaluate_dev(cfg, model, tasks, splits, device, state, select, out, dist, tracker) -> None:
    """Every task on its own dev set; the aggregate (mean of task scores, or one task's) selects. In a
    distributed run every rank evaluates its share and gets the same metrics."""
    per_task, scores = {}, {}
    for name, task in tasks.items():
        if not splits[name].dev:
            continue
        per_task[name] = task.evaluate(model.use(name), splits[name].dev, device, cfg.train.bf16,
                                       desc=f"dev {name}", dist=dist)
        scores[name] = task.score(per_task[name])  # on a 0-1 scale, so that tasks can be averaged
        tracker.log(state["step"], track.metric_scalars(f"dev/{name}", per_task[name]) | {f"dev/score/{name}": scores[name]})
    if not scores:
        return
    which = cfg.multitask.select
    value = sum(scores.values()) / len(scores) if which == "mean" else scores[which]
    state["evals"].append({"step": state["step"], "dev": value, "scores": scores, "tasks": per_task})
    tracker.log(state["step"], {"dev/main": value})  # what selection maximises, as in single-task runs
    improved = select.update(value, state["step"])
    if improved and dist.main:
        checkpoint.save_best(out, model)
    log(f"step {state['step']}: dev {which} {value:.4f} (" + ", ".join(f"{n} {s:.4f}" for n, s in scores.items())
        + ")" + select.note(improved))


def folder_meta(cfg, tasks) -> dict:
    """tunelab.json of a multi-task folder: enough to rebuild every head and its task."""
    meta = {"task": "multitask", "base_model": run.base_model_name(cfg.model.name), "tune": cfg.tune.method,
            "tunelab_format": 1, "tasks": {name: task.meta() for name, task in tasks.items()}}
    if cfg.tune.method == "lora":
        meta["adapters"] = {"r": cfg.tune.lora_r, "alpha": cfg.tune.lora_alpha,
                            "target_modules": cfg.tune.target_modules}
    return meta


def save_folder(out: Path, model, tokenizer, cfg, tasks) -> None:
    """model.safetensors (backbone once, every head, per-task adapters), the backbone's config.json, the
    tokenizer and tunelab.json."""
    from safetensors.torch import save_file

    weights = {k: v for k, v in mtm.state(model).items() if not k.startswith("uncertainty.")}

    def write(folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
        model.backbone.config.save_pretrained(str(folder))
        tokenizer.save_pretrained(str(folder))

    run.publish(out, write, folder_meta(cfg, tasks))
