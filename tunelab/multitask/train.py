"""Multi-task fine-tuning ("strategy network") as one readable loop.

tasks (each: data -> task features) -> one shared backbone with a head per task -> each step, batches drawn
from the tasks by the sampler -> task losses weighted (fixed / uncertainty) or their gradients surgered
(PCGrad) -> AdamW step -> every task evaluated on its own dev set, the aggregate selects the checkpoint and
drives early stopping -> atomic checkpoints -> test once per task on the selected weights -> one folder with
the backbone and every head (`tunelab export` writes any one task as a plain transformers model).
"""

import math
import random
import shutil
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
from tunelab.models import load_tokenizer, resolve_model_path
from tunelab.multitask import model as mtm
from tunelab.multitask.sampling import TaskStream, pick_task, task_probabilities
from tunelab.multitask.weighting import UncertaintyWeights, pcgrad
from tunelab.predict import autocast, evaluate
from tunelab.tasks import make_task
from tunelab.train import checkpoint
from tunelab.train.optim import build_optimizer, step as optimizer_step
from tunelab.train.supervised import check_coverage, log, prepare_output, publish, sample_outputs


def task_score(kind: str, metrics: dict) -> float:
    """A task's dev result on a 0-1 scale, so that tasks can be averaged: entity micro-F1 or macro-F1 as
    they are; for generation 1/perplexity (= exp(-loss per token))."""
    return math.exp(metrics["main"]) if kind == "generate" else metrics["main"]


def train(cfg, resume: bool = False, overwrite: bool = False) -> dict:
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

    # One backbone, a head per task.
    path = resolve_model_path(cfg.model.name)
    tokenizer = load_tokenizer(path, cfg.model.trust_remote_code)
    model = mtm.build(path, {n: (cfg.tasks[n].task, labels[n]) for n in names}, cfg.model.dropout,
                      trust_remote_code=cfg.model.trust_remote_code, pad_id=tokenizer.pad_token_id)
    if cfg.tune.method == "lora":
        mtm.add_adapters(model, names, cfg.tune.lora_r, cfg.tune.lora_alpha, cfg.tune.lora_dropout,
                         cfg.tune.target_modules)
        if mc.train_backbone:
            for n, p in model.backbone.named_parameters():
                p.requires_grad = True
    elif cfg.tune.method in ("bitfit", "head"):
        for n, p in model.backbone.named_parameters():
            p.requires_grad = cfg.tune.method == "bitfit" and n.endswith(".bias")
    tuning.freeze(model.backbone, cfg.tune.freeze_embeddings, cfg.tune.freeze_layers)
    if mc.weighting == "uncertainty":
        model.uncertainty = UncertaintyWeights(names)
    model.to(device)

    tasks, features, lengths = {}, {}, {}
    limit = getattr(model.backbone.config, "max_position_embeddings", None) or 10**9
    for name, spec in cfg.tasks.items():
        max_length = min(spec.max_length or cfg.model.max_length, limit)
        gen = {}
        if spec.task == "generate":
            gen = {"encoder_decoder": False, "prompt_suffix": spec.data.prompt_suffix,
                   "max_target_length": spec.data.max_target_length}
        tasks[name] = make_task(spec.task, tokenizer, labels[name], max_length, spec.data.context_sentences, **gen)
        features[name] = tasks[name].encode(splits[name].train, training=True)
        check_coverage(features[name], tokenizer, cfg.model.name, cfg.model.max_unk_share)
        lengths[name] = [len(f["input_ids"]) for f in features[name]]
    prepare_output(out, cfg, resume, overwrite, write=False)  # every process checks before the main one writes
    dist.barrier()
    if dist.main:
        prepare_output(out, cfg, resume, overwrite)
    dist.barrier()

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
    heads = mtm.head_modules(model) | {"uncertainty"}
    optimizer, scheduler = build_optimizer(model, tc.lr, tc.weight_decay, tc.head_lr, tc.scheduler,
                                           round(tc.warmup_ratio * total_steps), total_steps, heads)
    eval_every = tc.eval_every or steps_per_epoch
    streams = {n: TaskStream(lengths[n], tc.batch_size, tc.seed + i, tc.group_by_length)
               for i, n in enumerate(names)}
    shared = [p for p in model.backbone.parameters() if p.requires_grad]
    if mc.weighting == "uncertainty":
        weigh = model.uncertainty
    else:
        weigh = lambda name, loss: cfg.tasks[name].weight * loss  # noqa: E731
    start = task_probabilities(sizes, mc.sampling, mc.temperature, 0.0, mc.anneal_min)
    log("sampling " + mc.sampling + ": " + ", ".join(f"{n} {p:.1%}" for n, p in start.items()) +
        (" at the start" if mc.sampling == "annealed" else "") + f"; {total_steps} steps of "
        f"{per_step} batch(es) of {tc.batch_size}; weighting {mc.weighting}")
    log(distributed.describe_batch(tc.batch_size, tc.grad_accum, dist))

    state = {"step": 0, "draws": 0, "drawn": {n: 0 for n in names}, "history": [], "evals": [], "best": None,
             "best_step": None, "bad_evals": 0, "stopped_early": False, "train_seconds": 0.0, "tokens": 0}
    distributed.seed_ranks(tc.seed, dist)
    found = checkpoint.find(out) if resume else None
    dist.require_shared(found is not None, out)
    if found:
        state = checkpoint.load(found, model, optimizer, scheduler, device, dist.rank)
        log(f"resuming from {found} at step {state['step']}/{total_steps}")
    tracker = track.open(out, config_mod.to_dict(cfg), cfg.track, dist.main, state["step"] if found else None)
    ddp = dist.wrap(model, outside_forward=("uncertainty.",))  # training; evaluation and saving use `model`

    model.train()
    last_save = time.perf_counter()
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
        for micro in picks:
            for name in micro:
                idx = streams[name].batch(state["drawn"][name])  # the global batch; this rank's slice of it
                state["drawn"][name] += 1
                mine = dist.shard(idx)
                share = distributed.loss_weight(features[name], idx, mine, dist)
                batch = collate([features[name][i] for i in (mine or idx[:1])], tasks[name].pad)
                work.append((name, {k: v.to(device) for k, v in batch.items()}))
                shares.append(share)
                tokens += sum(lengths[name][i] for i in idx)
                rows += len(idx)
        surgery = random.Random(tc.seed * 7919 + state["step"]) if mc.weighting == "pcgrad" else None
        total, losses = backward(ddp, work, weigh, tc.grad_accum, device, tc.bf16, shared, surgery, shares)
        if mc.weighting == "uncertainty":
            dist.average_grads(model.uncertainty.parameters())
        if dist.world > 1:  # each rank holds its share of the global means
            summed = dist.sum([total / dist.world] + [losses[n] / dist.world for n in losses])
            total, losses = summed[0], dict(zip(losses, summed[1:]))

        grad_norm, lr = optimizer_step(model, optimizer, scheduler, tc.max_grad_norm)
        state["step"] += 1
        state["tokens"] += tokens
        seconds = time.perf_counter() - t0
        record = {"step": state["step"], "loss": total, "tasks": losses, "lr": lr, "grad_norm": grad_norm,
                  "seconds": seconds, "tokens": tokens, "samples": rows,
                  "tokens_per_second": tokens / max(1e-9, seconds), "samples_per_second": rows / max(1e-9, seconds),
                  "peak_memory_mb": track.peak_memory_mb(device)}
        if mc.weighting == "uncertainty":
            record["weights"] = model.uncertainty.weights()
        state["history"].append(record)
        tracker.log(state["step"], {"train/loss": total, "train/lr": lr, "train/grad_norm": grad_norm,
                                    "train/tokens_per_second": record["tokens_per_second"],
                                    "train/samples_per_second": record["samples_per_second"],
                                    "train/peak_memory_mb": record["peak_memory_mb"]}
                    | {f"train/loss/{n}": v for n, v in losses.items()}
                    | {f"train/weight/{n}": v for n, v in record.get("weights", {}).items()})
        bar.update(1)
        bar.set_postfix(loss=f"{total:.4f}", lr=f"{lr:.2e}", refresh=False)

        finished = state["step"] >= total_steps
        evaluated = False
        state["train_seconds"] += time.perf_counter() - t0
        if state["step"] % eval_every == 0 or finished:
            evaluate_dev(cfg, model, tasks, splits, device, state, out, dist, tracker)
            evaluated = True
        due = state["step"] % tc.save_every == 0 if tc.save_every else \
            dist.agree(time.perf_counter() - last_save > tc.save_minutes * 60)  # the clock is rank 0's
        if evaluated or due or finished:
            rng = distributed.rng_states(dist)
            if dist.main:
                checkpoint.save(out, model, optimizer, scheduler, state, rng)
            last_save = time.perf_counter()
    bar.close()

    dist.barrier()  # the main process's last writes are on disk before any rank reads them
    restored = checkpoint.load_best(out, model, device)
    dist.require_shared(restored, out)
    if restored:
        log(f"restored the best dev weights (step {state['best_step']}, dev {state['best']:.4f})")
    report = {
        "task": "multitask", "model": str(cfg.model.name), "seed": tc.seed, "steps": state["step"],
        "total_steps": total_steps, "stopped_early": state["stopped_early"], "best_step": state["best_step"],
        "select": mc.select, "sampling": mc.sampling, "weighting": mc.weighting, "mix": mc.mix,
        "train_seconds": round(state["train_seconds"], 2), "train_tokens": state["tokens"],
        "tokens_per_second": state["tokens"] / max(1e-9, state["train_seconds"]),
        "processes": dist.world, "global_batch": tc.batch_size * tc.grad_accum,
        "peak_memory_mb": track.peak_memory_mb(device),
        "tune": {"method": cfg.tune.method, "trainable_params": trainable, "total_params": n_params},
        "history": state["history"], "evals": state["evals"], "dev": state["best"], "tasks": {},
    }
    best = next((e for e in state["evals"] if e["step"] == state["best_step"]), None)
    drawn = sum(state["drawn"].values())
    for n in names:
        kind = cfg.tasks[n].task
        entry = {"task": kind, "labels": labels[n], "data": splits[n].about, "weight": cfg.tasks[n].weight,
                 "sizes": {"train": len(splits[n].train), "dev": len(splits[n].dev), "test": len(splits[n].test)},
                 "batches": state["drawn"][n], "batch_share": state["drawn"][n] / max(1, drawn),
                 "dev": best["tasks"][n] if best else None, "test": None}
        head = model.use(n)
        if splits[n].test:
            entry["test"] = evaluate(tasks[n], head, splits[n].test, device, tc.bf16, desc=f"test {n}", dist=dist)
            tracker.log(state["step"], track.metric_scalars(f"test/{n}", entry["test"]))
        if kind == "generate" and (splits[n].test or splits[n].dev) and dist.main:
            entry["samples"] = sample_outputs(tasks[n], head, splits[n].test or splits[n].dev, device, tc.bf16)
        report["tasks"][n] = entry
    if mc.weighting == "uncertainty":
        report["final_weights"] = model.uncertainty.weights()
    tracker.close()
    if dist.main:
        save_folder(out, model, tokenizer, cfg, labels, tasks)
        from tunelab.report.multitask import write_report

        write_report(out, report)
        shutil.rmtree(out / checkpoint.NAME, ignore_errors=True)
        (out / checkpoint.BEST).unlink(missing_ok=True)
    dist.barrier()  # no rank returns before the folder is complete
    return report


def step_budget(sizes, batch_size: int, epochs: float, per_step: int = 1) -> tuple[int, int]:
    """(steps per epoch, total steps): an epoch is one pass over every task's batches, `per_step` batches an
    optimizer step (grad_accum, times the number of tasks under mix=all)."""
    per_epoch = math.ceil(sum(math.ceil(s / batch_size) for s in sizes) / per_step)
    return per_epoch, max(1, math.ceil(epochs * per_epoch))


def backward(model, work, weigh, accum: int, device, bf16, shared=(), surgery=None,
             shares=None) -> tuple[float, dict]:
    """Forward and backward every (task name, batch) of one optimizer step, gradients left in .grad.

    shares: per batch, the factor on this process's loss in a distributed run (tunelab.distributed.loss_weight;
    None: 1, one process), so that the gradients DDP averages are those of the global batch. Each backward is all-reduced
    (no no_sync): PCGrad needs every task's global gradient apart, and an average of sums is the sum of
    averages anyway. The returned losses are this process's shares (summed over processes by the recipe).

    weigh(name, loss) -> the loss to differentiate. With `surgery` (a random.Random: PCGrad), each task's
    gradient on the `shared` parameters is kept apart, and their PCGrad combination is what is left in .grad;
    other parameters (heads, adapters, loss weights) belong to one task and just accumulate.
    Returns (the step's weighted loss, each task's mean unweighted loss)."""
    losses, total, apart = {}, 0.0, {}
    for (name, batch), share in zip(work, shares or [1.0] * len(work)):
        with autocast(device, bf16):
            output = model(name, **batch)
        # share 0 (no labelled token on this process): a zero gradient, not the NaN of an empty mean
        loss = output.loss if share else output.logits.float().sum() * 0.0
        weighted = weigh(name, loss.float())
        ((weighted * share if share != 1 else weighted) / accum).backward()
        if surgery is not None:
            g = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in shared])
            apart[name] = apart[name] + g if name in apart else g
            for p in shared:
                p.grad = None
        losses.setdefault(name, []).append(loss.item() * share)
        total += weighted.item() * share / accum
    if surgery is not None:
        flat = pcgrad(list(apart.values()), surgery)
        offset = 0
        for p in shared:
            p.grad = flat[offset:offset + p.numel()].view_as(p).to(p.dtype)
            offset += p.numel()
    return total, {n: sum(v) / len(v) for n, v in losses.items()}


def evaluate_dev(cfg, model, tasks, splits, device, state, out, dist, tracker) -> None:
    """Every task on its own dev set; the aggregate (mean of task scores, or one task's) selects. In a
    distributed run every rank evaluates its share and gets the same metrics."""
    per_task, scores = {}, {}
    for name, task in tasks.items():
        if not splits[name].dev:
            continue
        per_task[name] = evaluate(task, model.use(name), splits[name].dev, device, cfg.train.bf16,
                                  desc=f"dev {name}", dist=dist)
        scores[name] = task_score(cfg.tasks[name].task, per_task[name])
        tracker.log(state["step"], track.metric_scalars(f"dev/{name}", per_task[name]) | {f"dev/score/{name}": scores[name]})
    if not scores:
        return
    select = cfg.multitask.select
    value = sum(scores.values()) / len(scores) if select == "mean" else scores[select]
    state["evals"].append({"step": state["step"], "dev": value, "scores": scores, "tasks": per_task})
    tracker.log(state["step"], {"dev/main": value})  # what selection maximises, as in single-task runs
    improved = state["best"] is None or value > state["best"]
    if improved:
        state["best"], state["best_step"], state["bad_evals"] = value, state["step"], 0
        if dist.main:
            checkpoint.save_best(out, model)
    else:
        state["bad_evals"] += 1
        if cfg.train.patience is not None and state["bad_evals"] >= cfg.train.patience:
            state["stopped_early"] = True
    log(f"step {state['step']}: dev {select} {value:.4f} (" + ", ".join(f"{n} {s:.4f}" for n, s in scores.items())
        + ")" + (" (best)" if improved else f" (best {state['best']:.4f} at step {state['best_step']})")
        + (" -> early stop" if state["stopped_early"] else ""))


def folder_meta(cfg, labels, tasks) -> dict:
    """tunelab.json of a multi-task folder: enough to rebuild every head and its task."""
    from tunelab.models import PACKAGED

    base = cfg.model.name if cfg.model.name in PACKAGED else str(Path(cfg.model.name).resolve())
    meta = {"task": "multitask", "base_model": base, "tune": cfg.tune.method, "tunelab_format": 1, "tasks": {}}
    for name, spec in cfg.tasks.items():
        entry = {"task": spec.task, "labels": labels[name], "max_length": tasks[name].max_length,
                 "context_sentences": spec.data.context_sentences}
        if spec.task == "generate":
            entry["generation"] = {"encoder_decoder": False, "prompt_suffix": spec.data.prompt_suffix,
                                   "max_target_length": spec.data.max_target_length}
        meta["tasks"][name] = entry
    if cfg.tune.method == "lora":
        meta["adapters"] = {"r": cfg.tune.lora_r, "alpha": cfg.tune.lora_alpha,
                            "target_modules": cfg.tune.target_modules}
    return meta


def save_folder(out: Path, model, tokenizer, cfg, labels, tasks) -> None:
    """model.safetensors (backbone once, every head, per-task adapters), the backbone's config.json, the
    tokenizer and tunelab.json."""
    from safetensors.torch import save_file

    weights = {k: v for k, v in mtm.state(model).items() if not k.startswith("uncertainty.")}

    def write(folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
        model.backbone.config.save_pretrained(str(folder))
        tokenizer.save_pretrained(str(folder))

    publish(out, write, folder_meta(cfg, labels, tasks))
