"""Continual learning as one readable loop over experiences.

experiences (in order; each: a task, its data, the head it trains) -> for each experience: the model after
the previous one (a multi-task folder: one backbone, a head per head name) -> its head added, or widened for
new labels -> this experience's data (+ the replay buffer's past examples) -> the shared training step with
the strategy's loss terms (EWC, LwF) -> dev selection on this experience -> the folder after it, published ->
every experience seen so far scored on its own evaluation data (a row of the accuracy matrix) -> Fisher,
buffer and matrix saved -> the next. `joint` trains on every experience at once instead (the upper bound);
`continual.reference` also trains each experience alone (forward transfer's baseline).

Output: OUTPUT_DIR/experiences/NN-NAME/ is the model after experience NN (a multi-task folder: `tunelab
eval/predict --task HEAD`, `tunelab export`), OUTPUT_DIR itself the final one, with report.json/report.md
and matrix.png. continual.json (done experiences, matrix, buffer) and ewc.safetensors (Fisher, anchor) are
written atomically after each experience; with a step checkpoint inside the current experience's folder, a
killed run resumes (--resume) to the same result.
"""

import json
import math
import shutil
import time
from pathlib import Path

import torch

from tunelab import config as config_mod
from tunelab import distributed, progress, track
from tunelab import peft as tuning
from tunelab.continual.metrics import transfer
from tunelab.continual.strategies import EWC, Distill, Reservoir, accumulate_fisher, fisher_diagonal
from tunelab.data import check_labels, load_splits
from tunelab.data.batching import collate
from tunelab.errors import TunelabError
from tunelab.io import atomic_write_bytes, atomic_write_json
from tunelab.models import check_coverage, head_labels, load_model, load_tokenizer, resolve_model_path, widen_head
from tunelab.multitask import model as mtm
from tunelab.multitask.sampling import TaskStream, pick_task, task_probabilities
from tunelab.tasks import task_type
from tunelab.train import checkpoint, run
from tunelab.train.optim import build_optimizer, step as optimizer_step
from tunelab.train.run import log
from tunelab.train.step import Step, mean_logs, micro_batch

STATE = "continual.json"
EWC_FILE = "ewc.safetensors"
REPLAY_FILE = "replay.jsonl"


def train(cfg, resume: bool = False, overwrite: bool = False) -> dict:
    out, tc, cc = Path(cfg.output_dir), cfg.train, cfg.continual
    parts = config_mod.strategies(cc.strategy)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    dist = distributed.start(tc.device)
    if dist.world > 1:
        raise TunelabError("task: continual runs on one process; launch it without accelerate/torchrun")
    device = dist.device
    names = list(cfg.experiences)
    head_of = {n: s.head or n for n, s in cfg.experiences.items()}
    kind_of = {n: s.task for n, s in cfg.experiences.items()}

    # Data per experience. A head's labels grow with the experiences that share it (old ones keep their places).
    path = resolve_model_path(cfg.model.name)
    start_meta = run.read_meta(path) if (path / run.META_FILE).is_file() else {}
    if start_meta.get("task") == "multitask" or start_meta.get("adapter"):
        raise TunelabError(f"model.name={cfg.model.name}: a continual run starts from a backbone or a full "
                           "single-task folder (whose head serves the first experience), not a multi-task or "
                           "adapter folder")
    splits, own, labels_at, current = {}, {}, [], {}
    for i, n in enumerate(names):
        spec = cfg.experiences[n]
        try:
            splits[n] = load_splits(spec.data, spec.task)
            own[n] = check_labels(splits[n].train, {"dev": splits[n].dev, "test": splits[n].test})
            first = head_labels(path, spec.task) if i == 0 and cfg.model.head == "keep" else None
            current[head_of[n]] = check_labels(splits[n].train, {"dev": splits[n].dev, "test": splits[n].test},
                                               start=current.get(head_of[n]) or first)
        except TunelabError as e:
            raise TunelabError(f"experiences.{n}: {e}") from None
        labels_at.append(dict(current))
    tokenizer = load_tokenizer(path, cfg.model.trust_remote_code)
    backbone_kind = min(kind_of.values(), key=lambda k: task_type(k).donor_rank)
    backbone_config = _config(path)
    limit = getattr(backbone_config, "max_position_embeddings", None) or 10**9
    options = {n: task_type(kind_of[n]).options(cfg.experiences[n].data, backbone_config) for n in names}

    def make_task(n: str, labels: list[str]):
        return task_type(kind_of[n]).build(tokenizer, labels, min(cfg.experiences[n].max_length or
                                                                  cfg.model.max_length, limit), options[n])

    for n in names:
        check_coverage(make_task(n, own[n]).encode(splits[n].train[:200], training=True), tokenizer,
                       cfg.model.name, cfg.model.max_unk_share, warn=log)
    run.claim_output(out, cfg, resume, overwrite, dist)
    saved = json.loads((out / STATE).read_text()) if resume and (out / STATE).is_file() else {}
    state = {"done": 0, "matrix": [], "metrics": [], "phases": [], "reference": [None] * len(names),
             "buffer": None, **saved}
    buffer = Reservoir(cc.replay_size, tc.seed)
    if state["buffer"]:
        buffer.load_state_dict(state["buffer"])
    log(f"continual: {len(names)} experiences (" + ", ".join(f"{n}: {kind_of[n]} -> head {head_of[n]}" for n in names)
        + f"); strategy {cc.strategy}" + (f"; resuming after {state['done']}" if state["done"] else ""))
    t_start = time.perf_counter()

    def phase_dir(i: int, name: str, kind: str = "experiences") -> Path:
        return out / kind / f"{i:02d}-{name}"

    def build_fresh(heads: dict, seed: int):
        torch.manual_seed(seed)
        return mtm.build(path, {h: (kind, labels) for h, (kind, labels) in heads.items()}, cfg.model.dropout,
                         trust_remote_code=cfg.model.trust_remote_code, pad_id=tokenizer.pad_token_id,
                         backbone_kind=backbone_kind)

    def evaluate(model, i_labels: dict, j: int) -> dict:
        n = names[j]
        examples = (splits[n].test if cc.eval_split == "test" else []) or splits[n].dev
        return score(model, head_of[n], make_task(n, i_labels[head_of[n]]), make_task(n, own[n]), examples,
                     device, tc.bf16, dist, f"eval {n}")

    def save(folder: Path, model, heads_labels: dict, after: str) -> None:
        save_folder(folder, model, tokenizer, cfg, {h: make_task(first_with[h], lab) for h, lab in heads_labels.items()},
                    backbone_kind, after)

    first_with = {}
    for n in names:
        first_with.setdefault(head_of[n], n)

    # The reference: each experience alone from the start model (forward transfer's baseline).
    if cc.reference and "joint" not in parts:
        for j in range(1, len(names)):
            if state["reference"][j] is not None:
                continue
            n = names[j]
            where = phase_dir(j, n, "reference")
            model = build_fresh({head_of[n]: (kind_of[n], own[n])}, tc.seed * 1000 + j).to(device)
            task = make_task(n, own[n])
            learn(model, {n: (head_of[n], task, task.encode(splits[n].train, training=True))},
                  _dev({n: (head_of[n], task, task, splits[n].dev)}), Step(), cfg, where, resume, dist,
                  f"reference {n}")
            state["reference"][j] = evaluate(model, {head_of[n]: own[n]}, j)["score"]
            shutil.rmtree(where, ignore_errors=True)
            if not any(where.parent.iterdir()):
                where.parent.rmdir()
            atomic_write_json(out / STATE, state)

    if parts == ["joint"]:
        final, where, model = labels_at[-1], phase_dir(0, "joint"), None
        if state["done"] < len(names):
            if (where / run.META_FILE).is_file() and checkpoint.find(where) is None:  # trained before a kill
                model = mtm.load(where, run.read_meta(where)).to(device)
            else:
                model = build_fresh({h: (kind_of[first_with[h]], lab) for h, lab in final.items()}, tc.seed).to(device)
                streams, dev = {}, {}
                for n in names:
                    task = make_task(n, final[head_of[n]])
                    streams[n] = (head_of[n], task, task.encode(splits[n].train, training=True))
                    dev[n] = (head_of[n], task, make_task(n, own[n]), splits[n].dev)
                phase = learn(model, streams, _dev(dev), Step(), cfg, where, resume, dist, "joint")
                save(where, model, final, "joint")
                run.clean_up(where)
                state["phases"] = [phase_summary(phase, "joint")]
                atomic_write_json(out / STATE, state)
            row = [evaluate(model, final, j) for j in range(len(names))]
            state["matrix"], state["metrics"] = [[r["score"] for r in row]], [[r["metrics"] for r in row]]
            state["done"] = len(names)
            atomic_write_json(out / STATE, state)
    else:
        model = None
        for i in range(state["done"], len(names)):
            n, h = names[i], head_of[names[i]]
            where = phase_dir(i, n)
            # The model after the previous experience, as its folder holds it (a resumed run reads the same).
            if i == 0:
                model = build_fresh({h: (kind_of[n], labels_at[0][h])}, tc.seed)
            else:
                prev = phase_dir(i - 1, names[i - 1])
                model = mtm.load(prev, run.read_meta(prev))
            torch.manual_seed(tc.seed * 1000 + i)  # a new head's or new rows' initial weights
            if h not in model.heads:
                add_head(model, h, kind_of[n], labels_at[i][h], path, cfg, tokenizer.pad_token_id)
            elif len(labels_at[i][h]) > model.heads[h].config.num_labels:
                widen_head(model.heads[h], kind_of[n], labels_at[i][h])
                log(f"{n}: head {h} widened to {len(labels_at[i][h])} labels")
            if "adapters" in parts and h not in _adapters(model):
                mtm.add_adapters(model, [h], cfg.tune.lora_r, cfg.tune.lora_alpha, cfg.tune.lora_dropout,
                                 cfg.tune.target_modules)
            model.to(device)
            published = (where / run.META_FILE).is_file() and checkpoint.find(where) is None
            if published:  # trained before a kill; what followed it is redone below (each step is idempotent)
                model = mtm.load(where, run.read_meta(where)).to(device)
            else:
                terms = []
                if "ewc" in parts and i > 0:
                    fisher, anchor, _ = load_ewc(out / EWC_FILE)
                    terms.append(EWC(model, fisher, anchor, cc.ewc_lambda))
                previous = None
                if i > 0 and ("lwf" in parts or "pseudo" in parts):  # the model after the previous experience
                    prev = phase_dir(i - 1, names[i - 1])
                    previous = mtm.load(prev, run.read_meta(prev)).to(device)
                if "lwf" in parts and previous is not None:
                    kinds = {k: task_type(kind_of[first_with[k]]) for k in previous.heads}
                    distilled = {k: (m.config.num_labels if kinds[k].new_head else None, kinds[k].token_level)
                                 for k, m in previous.heads.items()}  # (None: every column, a generator's vocabulary)
                    terms.append(Distill(model, previous, distilled, cc.lwf_weight, cc.lwf_temperature, device,
                                         tc.bf16))
                task = make_task(n, labels_at[i][h])
                examples = splits[n].train
                if "pseudo" in parts and i > 0 and h in labels_at[i - 1]:
                    examples = pseudo_labelled(examples, previous, h, make_task(n, labels_at[i - 1][h]), device,
                                               tc.bf16, n)
                streams = {n: (h, task, task.encode(examples, training=True))}
                if "replay" in parts:
                    for j in range(i):
                        kept = buffer.of(names[j])
                        if kept:
                            past = make_task(names[j], labels_at[i][head_of[names[j]]])
                            streams[names[j]] = (head_of[names[j]], past,
                                                 past.encode([splits[names[j]].train[k] for k in kept], training=True))
                    log(f"{n}: replaying " + (", ".join(f"{k} {len(v[2])}" for k, v in streams.items() if k != n)
                                              or "nothing yet"))
                phase = learn(model, streams, _dev({n: (h, task, make_task(n, own[n]), splits[n].dev)}),
                              Step(terms=terms), cfg, where, resume, dist, f"{i + 1}/{len(names)} {n}")
                save(where, model, labels_at[i], n)
                run.clean_up(where)
                state["phases"] = state["phases"][:i] + [phase_summary(phase, n)]
                atomic_write_json(out / STATE, state)
            # Score every experience seen so far; then what the next experience needs of this one.
            row = [evaluate(model, labels_at[i], j) for j in range(i + 1)]
            state["matrix"] = state["matrix"][:i] + [[r["score"] for r in row] + [None] * (len(names) - i - 1)]
            state["metrics"] = state["metrics"][:i] + [[r["metrics"] for r in row]]
            log(f"after {n}: " + ", ".join(f"{names[j]} {r['score']:.4f}" for j, r in enumerate(row)))
            if "ewc" in parts and i + 1 < len(names):
                fisher, _, through = load_ewc(out / EWC_FILE) if (out / EWC_FILE).is_file() else ({}, {}, -1)
                if through < i:  # (a resumed run may have written it before it was killed)
                    task = make_task(n, labels_at[i][h])
                    new = fisher_diagonal(model, lambda h=h, **b: model(h, **b),
                                          task.encode(splits[n].train, training=True), task.pad, device, tc.bf16,
                                          cc.fisher_samples, tc.seed + i)
                    fisher = accumulate_fisher(fisher, new, cc.ewc_decay)
                    params = dict(model.named_parameters())
                    save_ewc(out / EWC_FILE, fisher, {k: params[k].detach() for k in fisher}, i)
            if "replay" in parts and buffer.seen == sum(len(splits[names[j]].train) for j in range(i)):
                buffer.add(n, len(splits[n].train))
            if "replay" in parts:  # the buffer's examples themselves, beside the model that they protect
                write_buffer(where / REPLAY_FILE, buffer, {m: splits[m].train for m in names[:i + 1]}, head_of, kind_of)
            state["buffer"], state["done"] = buffer.state_dict(), i + 1
            atomic_write_json(out / STATE, state)

    # The final model in OUTPUT_DIR itself, and the report.
    last = phase_dir(0, "joint") if parts == ["joint"] else phase_dir(len(names) - 1, names[-1])
    if model is None:
        model = mtm.load(last, run.read_meta(last))
    meta = run.read_meta(last)
    run.publish(out, lambda folder: _copy_model(last, folder), {k: v for k, v in meta.items()})
    trainable, n_params = tuning.count(model)
    report = {
        "task": "continual", "model": str(cfg.model.name), "strategy": cc.strategy, "seed": tc.seed,
        "settings": config_mod.to_dict(cfg)["continual"],
        "experiences": [{"name": n, "task": kind_of[n], "head": head_of[n], "labels": own[n],
                         "data": splits[n].about, "eval_split": "test" if cc.eval_split == "test" and splits[n].test else "dev",
                         "sizes": {"train": len(splits[n].train), "dev": len(splits[n].dev),
                                   "test": len(splits[n].test)}} for n in names],
        "matrix": state["matrix"], "metrics": state["metrics"], "reference": state["reference"],
        "phases": state["phases"], "buffer_size": len(buffer.items) if "replay" in parts else 0,
        "train_seconds": round(sum(p["train_seconds"] for p in state["phases"]), 2),
        "wall_seconds": round(time.perf_counter() - t_start, 2),
        "peak_memory_mb": max([p["peak_memory_mb"] or 0 for p in state["phases"]] or [0]) or None,
        "tune": {"method": cfg.tune.method, "trainable_params": trainable, "total_params": n_params},
    }
    if parts == ["joint"]:
        row = state["matrix"][0]
        report["summary"] = {"average": sum(row) / len(row), "newest": row[-1], "backward_transfer": None,
                             "forgetting": None, "forward_transfer": None}
    else:
        report["summary"] = transfer(state["matrix"], state["reference"] if cc.reference else None)
    from tunelab.report.continual import write_report

    write_report(out, report)
    return report


def _config(path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(path))


def _dev(dev: dict) -> dict:
    return {k: v for k, v in dev.items() if v[3]}


def _adapters(model) -> set:
    from peft.tuners.tuners_utils import BaseTunerLayer

    for m in model.backbone.modules():
        if isinstance(m, BaseTunerLayer):
            return set(m.lora_A.keys()) if hasattr(m, "lora_A") else set()
    return set()


def add_head(model, head: str, kind: str, labels: list[str], path, cfg, pad_id) -> None:
    """A new task head on the shared backbone: the task's transformers model whose backbone is the shared one
    (its own freshly loaded backbone is dropped)."""
    m = load_model(path, kind, labels, cfg.model.dropout, cfg.model.trust_remote_code)
    if m.config.pad_token_id is None and pad_id is not None:
        m.config.pad_token_id = pad_id
    own = getattr(m, m.base_model_prefix)
    if type(own) is not type(model.backbone):
        raise TunelabError(f"head {head}: its {type(m).__name__} expects a {type(own).__name__} backbone, not the "
                           f"shared {type(model.backbone).__name__}")
    setattr(m, m.base_model_prefix, model.backbone)
    m.tie_weights()
    model.heads[head] = m


def pseudo_labelled(examples: list, previous, head: str, old_task, device, bf16: bool, name: str) -> list:
    """The experience's training examples with the labels they leave out filled in by `previous`, the model
    after the previous experience (head `head`, which knew the old labels): new data annotated for new entity
    types only marks the old types as O, and training on that teaches the tagger to unlearn them (the task
    type merges: Task.merge_predictions)."""
    from tunelab.data.examples import unlabelled

    predictions = old_task.predict(previous.use(head), [unlabelled(e) for e in examples], device, bf16,
                                   desc=f"pseudo-labels {name}")
    merged = type(old_task).merge_predictions(examples, predictions)
    changed = sum(a != b for a, b in zip(examples, merged))
    log(f"{name}: the previous model's labels filled in {changed} of {len(examples)} training examples")
    return merged


def score(model, head: str, task, scorer, examples: list, device, bf16: bool, dist, desc: str) -> dict:
    """An experience's metrics on `examples` from head `head`: `task` carries the head's labels (which may
    have grown since), `scorer` the experience's own; predictions of the other labels are restricted away
    as the experience's data would not show them (NER: other entity types are O)."""
    m = model.use(head)
    was = m.training
    if task.labels == scorer.labels:
        metrics = task.evaluate(m, examples, device, bf16, desc=desc, dist=dist)
    else:
        predictions = task.predict(m, examples, device, bf16, desc=desc, dist=dist)
        metrics = scorer.metrics(examples, type(task).restrict_predictions(predictions, scorer.labels))
    m.train(was)
    return {"score": task.score(metrics), "metrics": metrics}


def learn(model, streams: dict, dev: dict, step: Step, cfg, where: Path, resume: bool, dist, desc: str) -> dict:
    """Train `model` on `streams` (key -> (head, task, features)), batches drawn in proportion to their sizes,
    for train.epochs passes; select on the mean dev score of `dev` (key -> (head, task, scorer, examples));
    step checkpoints in `where`. Returns the phase's state (history, evals, counters)."""
    tc = cfg.train
    device = dist.device
    keys = list(streams)
    sizes = {k: len(streams[k][2]) for k in keys}
    steps_per_epoch = math.ceil(sum(math.ceil(s / tc.batch_size) for s in sizes.values()) / tc.grad_accum)
    total_steps = run.step_limit(max(1, math.ceil(tc.epochs * steps_per_epoch)), tc.max_steps)
    optimizer, scheduler = build_optimizer(model, tc.lr, tc.weight_decay, tc.head_lr, tc.scheduler,
                                           round(tc.warmup_ratio * total_steps), total_steps, mtm.head_modules(model))
    eval_every = tc.eval_every or steps_per_epoch
    batches = {k: TaskStream(lambda seed, epoch, f=streams[k][2]: f, sizes[k], tc.batch_size, tc.seed + i,
                             tc.group_by_length, k, tc.length_pool) for i, k in enumerate(keys)}
    probs = task_probabilities(sizes, "proportional")
    state = {"step": 0, "draws": 0, "drawn": {k: 0 for k in keys}, "history": [], "evals": [],
             "train_seconds": 0.0, "tokens": 0, "total_steps": total_steps}
    torch.manual_seed(tc.seed)
    where.mkdir(parents=True, exist_ok=True)
    found = checkpoint.find(where) if resume else None
    if found:
        state = checkpoint.load(found, model, optimizer, scheduler, device, 0, step.stateful())
        log(f"{desc}: resuming from {found} at step {state['step']}/{total_steps}")
    select = run.KeepBest(state, tc.patience)
    clock = run.SaveClock(tc.save_every, tc.save_minutes, dist)
    model.train()
    pace = run.Pace(device, torch.get_num_threads())
    bar = progress.bar(total=total_steps, initial=state["step"], desc=desc, unit="step")
    while state["step"] < total_steps and not state["stopped_early"]:
        t0 = time.perf_counter()
        results, tokens, rows = [], 0, 0
        for _ in range(tc.grad_accum):
            key = pick_task(keys, probs, "proportional", tc.seed, state["draws"])
            state["draws"] += 1
            head, task, _ = streams[key]
            stream = batches[key]
            idx = stream.batch(state["drawn"][key])
            state["drawn"][key] += 1
            batch = {k: v.to(device) for k, v in collate([stream.features[i] for i in idx], task.pad,
                                                          tc.pad_to_multiple_of).items()}
            results.append(micro_batch(lambda **b: model(head, **b), model.heads[head], batch, device=device,
                                       bf16=tc.bf16, step=step, accum=tc.grad_accum))
            tokens, rows = tokens + sum(stream.lengths[i] for i in idx), rows + len(idx)
        grad_norm, lr = optimizer_step(model, optimizer, scheduler, tc.max_grad_norm)
        state["step"] += 1
        state["tokens"] += tokens
        record = run.step_record(state["step"], sum(r.loss for r in results) / len(results), lr, grad_norm,
                                 time.perf_counter() - t0, tokens, rows, device, mean_logs(results))
        state["history"].append(record)
        pace.watch(record)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
        state["train_seconds"] += time.perf_counter() - t0
        finished = state["step"] >= total_steps
        evaluated = bool(dev) and (state["step"] % eval_every == 0 or finished)
        if evaluated:
            scores = {k: score(model, h, t, s, ex, device, tc.bf16, dist, f"dev {k}")["score"]
                      for k, (h, t, s, ex) in dev.items()}
            value = sum(scores.values()) / len(scores)
            state["evals"].append({"step": state["step"], "dev": value, "scores": scores})
            improved = select.update(value, state["step"])
            if improved:
                checkpoint.save_best(where, model)
            log(f"{desc} step {state['step']}: dev {value:.4f}" + select.note(improved))
        if evaluated or finished or clock.due(state["step"]):
            checkpoint.save(where, model, optimizer, scheduler, state, None, step.stateful())
            clock.saved()
    bar.close()
    if dev and state["evals"]:
        run.restore_best(where, model, device, dist, state)
    state["peak_memory_mb"] = track.peak_memory_mb(device)
    return state


def phase_summary(state: dict, name: str) -> dict:
    """What the report keeps of one experience's training."""
    return {"name": name, "steps": state["step"], "total_steps": state["total_steps"],
            "best_step": state.get("best_step"), "dev": state.get("best"),
            "stopped_early": state.get("stopped_early", False), "train_seconds": round(state["train_seconds"], 2),
            "tokens": state["tokens"], "tokens_per_second": state["tokens"] / max(1e-9, state["train_seconds"]),
            "peak_memory_mb": state.get("peak_memory_mb"),
            "loss": [[r["step"], r["loss"]] for r in state["history"]],
            "terms": {k: sum(r[k] for r in state["history"] if k in r) / max(1, sum(k in r for r in state["history"]))
                      for k in sorted({k for r in state["history"] for k in r if k.startswith("term/")})}}


def save_folder(folder: Path, model, tokenizer, cfg, tasks: dict, backbone_kind: str, after: str) -> None:
    """The model after an experience as a multi-task folder (tunelab.multitask.model.load reads it)."""
    from safetensors.torch import save_file

    weights = mtm.state(model)

    def write(tmp: Path) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        model.backbone.config.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))

    meta = {"task": "multitask", "base_model": run.base_model_name(cfg.model.name), "tune": cfg.tune.method,
            "tunelab_format": 1, "backbone_kind": backbone_kind, "continual": {"after": after},
            "tasks": {h: t.meta() for h, t in tasks.items()}}
    if cfg.tune.method == "lora":
        meta["adapters"] = {"r": cfg.tune.lora_r, "alpha": cfg.tune.lora_alpha,
                            "target_modules": cfg.tune.target_modules}
    run.publish(folder, write, meta)


def _copy_model(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.name != run.META_FILE and not f.name.startswith("checkpoint"):
            shutil.copy2(f, dst / f.name)


def write_buffer(path: Path, buffer: Reservoir, train: dict, head_of: dict, kind_of: dict) -> None:
    """The replay buffer as JSONL records (experience, head, task and the example's fields), atomically."""
    import dataclasses

    from tunelab.io import atomic_write_text

    lines = []
    for name, i in sorted(buffer.items):
        example = {k: v for k, v in dataclasses.asdict(train[name][i]).items() if k not in ("source", "line", "meta")}
        lines.append(json.dumps({"experience": name, "head": head_of[name], "task": kind_of[name], "index": i,
                                 "example": example}, ensure_ascii=False))
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def save_ewc(path: Path, fisher: dict, anchor: dict, through: int) -> None:
    """Fisher and anchor after experience `through` (its index), written atomically."""
    from safetensors.torch import save

    tensors = {f"fisher.{k}": v.contiguous().cpu() for k, v in fisher.items()}
    tensors.update({f"anchor.{k}": v.contiguous().cpu() for k, v in anchor.items()})
    atomic_write_bytes(path, save(tensors, metadata={"through": str(through)}))


def load_ewc(path: Path) -> tuple[dict, dict, int]:
    from safetensors import safe_open

    fisher, anchor = {}, {}
    with safe_open(str(path), "pt") as f:
        through = int(f.metadata()["through"])
        for k in f.keys():
            part, _, name = k.partition(".")
            (fisher if part == "fisher" else anchor)[name] = f.get_tensor(k)
    return fisher, anchor, through
