"""Policy-gradient fine-tuning of a generator with sequence-level rewards, as one readable loop.

(optional supervised warm start) -> held-out evaluation "before" -> for each step: sample k completions per
prompt (one generate call) -> log-probs under the policy and the reference, once per rollout -> rewards ->
KL penalty -> advantages (moving average, leave-one-out, greedy self-critical) -> one policy-gradient update,
or ppo_epochs clipped-ratio updates -> adaptive KL coefficient -> log; held-out evaluation and atomic
checkpoints on schedule -> evaluation "after" -> a model folder `tunelab predict` and plain transformers/peft
load, with a report of rewards, KL, perplexity, diversity and samples before and after.

The reference is the starting policy: with LoRA the same weights with the adapter switched off (one copy in
memory), with full tuning a frozen copy. Dropout stays off throughout, so that the policy scored at rollout
time, the policy being updated and the reference are the same functions of their weights.
"""

import copy
import dataclasses
import math
import random
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from tunelab import peft as tuning
from tunelab import progress, track
from tunelab.data import load_splits
from tunelab.errors import TunelabError
from tunelab.models import load_model, load_tokenizer, resolve_model_path
from tunelab.runtime import pick_device, world_size
from tunelab.rl import estimators as est
from tunelab.rl import rewards as rw
from tunelab.rl.rollout import sample, token_logprobs
from tunelab.tasks import GenerateTask
from tunelab.train import checkpoint, run
from tunelab.train.optim import build_optimizer, step as optimizer_step
from tunelab.train.run import log

EVAL_SEED = 1234  # held-out sampling draws from its own seeded stream: before/after compare the same draw
SHOWN = 8  # held-out prompts whose outputs before and after go in the report


def train(cfg, splits=None, resume: bool = False, overwrite: bool = False) -> dict:
    """Run one RL fine-tuning job (task: rl); returns the report (also written to cfg.output_dir)."""
    out, rl, tc = Path(cfg.output_dir), cfg.rl, cfg.train
    if world_size() > 1:
        raise TunelabError(f"task: rl runs in one process (WORLD_SIZE is {world_size()}); start it with `tunelab "
                           "train` rather than accelerate launch / torchrun, on one GPU or the CPU")
    if tc.threads:
        torch.set_num_threads(tc.threads)
    device = pick_device(tc.device)
    splits = splits if splits is not None else load_splits(cfg.data, "generate")
    held = splits.dev[: rl.eval_prompts]
    if not splits.train or not held:
        raise TunelabError(f"task: rl needs training prompts and held-out (dev) prompts; got {len(splits.train)} "
                           f"train and {len(splits.dev)} dev (set data.dev or use a built-in set)")
    run.prepare_output(out, cfg, resume, overwrite)
    torch.manual_seed(tc.seed)

    start = warm_start(cfg, splits, out, resume) if rl.sft else cfg.model.name
    path = resolve_model_path(start)
    tokenizer = load_tokenizer(path, cfg.model.trust_remote_code)
    model = load_model(path, "generate", [], cfg.model.dropout, cfg.model.trust_remote_code)
    encoder_decoder = bool(model.config.is_encoder_decoder)
    lora = cfg.tune.method == "lora"
    # The reference: with LoRA the adapter switched off; with full tuning a frozen copy of the start.
    ref = None if lora else copy.deepcopy(model).requires_grad_(False).to(device).eval()
    model = tuning.apply(model, cfg.tune, "generate", path).to(device).eval()
    max_length = min(cfg.model.max_length, getattr(model.config, "max_position_embeddings", None) or 10**9)
    # The policy is a generation model: its prompts are encoded (and the saved folder predicts) as one.
    task = GenerateTask(tokenizer, max_length, encoder_decoder, cfg.data.prompt_suffix,
                        max(cfg.data.max_target_length, rl.max_new_tokens))
    reward = rw.build(rl, tc.device, tc.bf16)
    policy = Policy(model, ref, rl.temperature, tc.bf16, rl.micro_batch)

    updates = rl.ppo_epochs if rl.estimator == "ppo" else 1
    optimizer, scheduler = build_optimizer(model, rl.lr, tc.weight_decay, None, "constant",
                                           rl.warmup_steps * updates, rl.steps * updates)
    trainable, n_params = tuning.count(model)
    k, n_prompts = rl.samples_per_prompt, rl.prompts_per_step
    log(f"rl: {rl.estimator}, {rl.steps} steps of {n_prompts} prompts x {k} samples, {len(splits.train)} train / "
        f"{len(held)} held-out prompts; model {path} on {device}; tune.method={cfg.tune.method}: "
        f"{tuning.describe(trainable, n_params)}; rewards {rl.rewards}")

    state = {"step": 0, "history": [], "evals": [], "baseline": None, "kl_coef": rl.kl_coef,
             "train_seconds": 0.0, "rollout_seconds": 0.0, "rollout_tokens": 0}
    found = checkpoint.find(out) if resume else None
    if found:
        state = checkpoint.load(found, model, optimizer, scheduler, device)
        log(f"resuming from {found} at step {state['step']}/{rl.steps}")
    tracker = track.open(out, dataclasses.asdict(cfg), cfg.track, resume_step=state["step"] if found else None)
    if not state["evals"]:
        state["evals"].append(evaluate(policy, task, reward, held, rl, device, 0))
        _log_eval(tracker, state["evals"][-1])
        # REINFORCE's moving baseline starts at the start policy's held-out mean reward, not at 0.
        state["baseline"] = state["evals"][0]["shaped_reward"]

    order = PromptOrder(len(splits.train), tc.seed)
    bar = progress.bar(total=rl.steps, initial=state["step"], desc="rl", unit="step")
    while state["step"] < rl.steps:
        t0 = time.perf_counter()
        batch = [splits.train[i] for i in order.take(state["step"] * n_prompts, n_prompts)]
        prompts, refs = [e.prompt for e in batch], [e.target for e in batch]

        # Rollout: k samples per prompt in one generate call; log-probs under policy and reference once.
        roll = sample(model, task, prompts, k, rl.max_new_tokens, rl.temperature, rl.top_p, device=device, bf16=tc.bf16)
        rollout_seconds = time.perf_counter() - t0
        old_logp, ref_logp = policy.score(roll)
        rows_p, rows_r = [p for p in prompts for _ in range(k)], [r for r in refs for _ in range(k)]
        task_r = torch.tensor(reward(rows_p, roll.texts, rows_r, completion_ids=_ids(roll)), device=device)
        parts = reward.part_means()
        kl = est.sequence_kl(old_logp, ref_logp, roll.mask)
        shaped = est.shaped_rewards(task_r, kl, state["kl_coef"])

        greedy_r = None
        if rl.estimator == "self_critical":
            greedy = sample(model, task, prompts, 1, rl.max_new_tokens, greedy=True, device=device, bf16=tc.bf16)
            greedy_r = torch.tensor(reward(prompts, greedy.texts, refs, completion_ids=_ids(greedy)), device=device)
        adv = est.advantages(shaped, rl.estimator, k, state["baseline"], greedy_r)
        if rl.whiten:
            adv = est.whiten(adv)

        # Update: one pass (REINFORCE family) or ppo_epochs passes of the clipped surrogate over the rollout.
        for _ in range(updates):
            stats = policy.backward(roll, adv, old_logp if rl.estimator == "ppo" else None, rl.clip,
                                    rl.max_new_tokens, rl.entropy_coef)
            grad_norm, lr = optimizer_step(model, optimizer, scheduler, tc.max_grad_norm)

        mean_kl = float(kl.mean())
        if rl.kl_target is not None:
            state["kl_coef"] = est.adaptive_kl(state["kl_coef"], mean_kl, rl.kl_target, rl.kl_horizon, len(prompts) * k)
        if rl.estimator in ("reinforce", "ppo"):
            base = est.MovingBaseline(rl.baseline_decay, state["baseline"])
            base.update(shaped)
            state["baseline"] = base.value
        state["step"] += 1
        seconds = time.perf_counter() - t0
        state["train_seconds"] += seconds
        state["rollout_seconds"] += rollout_seconds
        state["rollout_tokens"] += roll.n_tokens
        entry = {"step": state["step"], "reward": float(task_r.mean()), "reward_std": float(task_r.std()),
                 "parts": parts, "kl": mean_kl, "shaped_reward": float(shaped.mean()), "kl_coef": state["kl_coef"],
                 "loss": stats["loss"], "entropy": stats["entropy"], "clip_fraction": stats["clip_fraction"],
                 "lr": lr, "grad_norm": grad_norm, "length": roll.n_tokens / len(roll.texts),
                 "baseline": state["baseline"], "seconds": seconds, "rollout_seconds": rollout_seconds,
                 "rollout_tokens_per_second": roll.n_tokens / max(1e-9, rollout_seconds),
                 "samples_per_second": len(roll.texts) / seconds, "peak_memory_mb": track.peak_memory_mb(device)}
        if greedy_r is not None:
            entry["greedy_reward"] = float(greedy_r.mean())
        state["history"].append(entry)
        tracker.log(state["step"], {f"rl/{k_}": v for k_, v in entry.items() if isinstance(v, (int, float))}
                    | {f"rl/reward_{n}": v for n, v in parts.items()})
        bar.update(1)
        bar.set_postfix(reward=f"{entry['reward']:.3f}", kl=f"{mean_kl:.3f}", refresh=False)

        finished = state["step"] >= rl.steps
        if rl.eval_every and state["step"] % rl.eval_every == 0 and not finished:
            state["evals"].append(evaluate(policy, task, reward, held, rl, device, state["step"]))
            _log_eval(tracker, state["evals"][-1])
        if state["step"] % rl.save_every == 0 or finished:
            checkpoint.save(out, model, optimizer, scheduler, state)
    bar.close()

    after = evaluate(policy, task, reward, held, rl, device, state["step"])
    state["evals"].append(after)
    _log_eval(tracker, after)
    tracker.close()
    before = state["evals"][0]
    report = {
        "task": "rl", "model": str(cfg.model.name), "start": str(start), "data": splits.about,
        "sizes": {"train": len(splits.train), "held_out": len(held)}, "estimator": rl.estimator,
        "rewards": rl.rewards, "steps": state["step"], "seed": tc.seed,
        "settings": {k_: getattr(rl, k_) for k_ in ("prompts_per_step", "samples_per_prompt", "temperature",
                                                    "top_p", "max_new_tokens", "lr", "kl_coef", "kl_target",
                                                    "entropy_coef", "whiten", "ppo_epochs", "clip")},
        "tune": {"method": cfg.tune.method, "trainable_params": trainable, "total_params": n_params},
        "train_seconds": round(state["train_seconds"], 2), "rollout_seconds": round(state["rollout_seconds"], 2),
        "rollout_tokens_per_second": state["rollout_tokens"] / max(1e-9, state["rollout_seconds"]),
        "before": _summary(before), "after": _summary(after), "history": state["history"],
        "evals": [_summary(e) for e in state["evals"]],
        "samples": [{"prompt": p, "reference": r, "before": b, "after": a} for p, r, b, a in
                    zip(before["prompts"], before["references"], before["greedy"], after["greedy"])],
    }
    save_cfg = dataclasses.replace(cfg, task="generate", model=dataclasses.replace(cfg.model, name=str(start)))
    run.save_model_folder(out, model, tokenizer, save_cfg, task)
    from tunelab.report.rl import write_rl_report

    write_rl_report(out, report)
    run.clean_up(out)
    return report


class Policy:
    """The policy model and its reference, scored in micro-batches of completions."""

    def __init__(self, model, ref, temperature: float, bf16: bool, micro_batch: int):
        self.model, self.ref = model, ref
        self.temperature, self.bf16, self.micro = temperature, bf16, micro_batch

    def _chunks(self, n: int):
        return [torch.arange(i, min(n, i + self.micro)) for i in range(0, n, self.micro)]

    def reference(self):
        """(model, context) that computes the reference: the adapter switched off, or the frozen copy."""
        if self.ref is not None:
            return self.ref, nullcontext()
        return self.model, self.model.disable_adapter()

    @torch.no_grad()
    def score(self, roll, temperature: float | None = None, policy: bool = True):
        """Per-token log-probs of the rollout under the policy (None with policy=False) and the reference,
        without gradients."""
        t = self.temperature if temperature is None else temperature
        n = roll.tokens.shape[0]
        logp = None
        if policy:
            logp = torch.cat([token_logprobs(self.model, roll.rows(i), t, self.bf16)[0] for i in self._chunks(n)])
        ref_model, ctx = self.reference()
        with ctx:
            ref = torch.cat([token_logprobs(ref_model, roll.rows(i), t, self.bf16)[0] for i in self._chunks(n)])
        return logp, ref

    def backward(self, roll, adv, old_logp, clip, max_tokens, entropy_coef) -> dict:
        """Accumulates the gradient of the estimator's loss over the rollout, micro-batch by micro-batch.
        Returns the loss, the mean entropy and (ppo) the share of tokens whose ratio was clipped."""
        n = roll.tokens.shape[0]
        loss_sum = ent_sum = clipped = 0.0
        for idx in self._chunks(n):
            sub = roll.rows(idx)
            logp, ent = token_logprobs(self.model, sub, self.temperature, self.bf16, entropy=True)
            old = None if old_logp is None else old_logp[idx]
            share = len(idx) / n  # each micro-batch's loss is a mean over its rows: weight it by its share
            loss = est.policy_loss(logp, sub.mask, adv[idx], max_tokens, old, clip) * share
            entropy = est.entropy_bonus(ent, sub.mask)
            (loss - entropy_coef * entropy * share).backward()
            loss_sum += float(loss.detach())
            ent_sum += float(entropy.detach()) * float(sub.mask.sum())
            if old is not None:
                ratio = torch.exp(logp.detach() - old)
                clipped += float((((ratio - 1).abs() > clip).float() * sub.mask).sum())
        tokens = float(roll.mask.sum())
        return {"loss": loss_sum, "entropy": ent_sum / max(1.0, tokens),
                "clip_fraction": clipped / max(1.0, tokens) if old_logp is not None else None}


class PromptOrder:
    """Training prompts in a fresh seeded order each pass: position p of the stream is a pure function of
    (seed, p), so a resumed run draws the same prompts."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.perms = n, seed, {}

    def take(self, start: int, count: int) -> list[int]:
        out = []
        for pos in range(start, start + count):
            epoch = pos // self.n
            if epoch not in self.perms:
                perm = list(range(self.n))
                random.Random(self.seed * 1000003 + epoch).shuffle(perm)
                self.perms = {epoch: perm}
            out.append(self.perms[epoch][pos % self.n])
        return out


@torch.no_grad()
def evaluate(policy: Policy, task, reward, examples, rl, device, step: int) -> dict:
    """Held-out prompts: one sample each (the rollout's temperature and top-p, a fixed seed) scored for mean
    reward, KL to the reference and perplexity under the reference, distinct-1/2 across the outputs; and the
    greedy outputs with their mean reward (the outputs the saved model gives by default)."""
    model, bf16 = policy.model, policy.bf16
    prompts, refs = [e.prompt for e in examples], [e.target for e in examples]
    roll = sample(model, task, prompts, 1, rl.max_new_tokens, rl.temperature, rl.top_p, device=device, bf16=bf16,
                  generator_seed=EVAL_SEED)
    logp, ref_logp = policy.score(roll)
    # Perplexity is the reference model's own, at temperature 1.
    ref_logp_1 = ref_logp if rl.temperature == 1 else policy.score(roll, temperature=1.0, policy=False)[1]
    r = reward(prompts, roll.texts, refs, completion_ids=_ids(roll))
    parts = reward.part_means()
    kl = est.sequence_kl(logp, ref_logp, roll.mask)
    greedy = sample(model, task, prompts, 1, rl.max_new_tokens, greedy=True, device=device, bf16=bf16)
    greedy_r = reward(prompts, greedy.texts, refs, completion_ids=_ids(greedy))
    tokens = roll.mask.sum()
    return {
        "step": step, "reward": sum(r) / len(r), "parts": parts, "kl": float(kl.mean()),
        "shaped_reward": sum(r) / len(r) - rl.kl_coef * float(kl.mean()),
        "ref_perplexity": math.exp(min(50.0, float(-(ref_logp_1 * roll.mask).sum() / tokens))),
        "distinct_1": rw.distinct_n(roll.texts, 1), "distinct_2": rw.distinct_n(roll.texts, 2),
        "length": float(tokens) / len(roll.texts),
        "greedy_reward": sum(greedy_r) / len(greedy_r), "greedy_distinct_2": rw.distinct_n(greedy.texts, 2),
        "prompts": prompts[:SHOWN], "references": refs[:SHOWN], "greedy": greedy.texts[:SHOWN],
        "sampled": roll.texts[:SHOWN],
    }


def _summary(e: dict) -> dict:
    return {k: v for k, v in e.items() if k not in ("prompts", "references", "greedy", "sampled")}


def _log_eval(tracker, e: dict) -> None:
    tracker.log(e["step"], {f"held_out/{k}": v for k, v in e.items() if isinstance(v, (int, float)) and k != "step"}
                | {f"held_out/reward_{n}": v for n, v in e["parts"].items()})


def _ids(roll) -> list[list[int]]:
    return [t[m.bool()].tolist() for t, m in zip(roll.tokens, roll.mask)]


def warm_start(cfg, splits, out: Path, resume: bool) -> str:
    """Supervised fine-tuning on the prompts' references (the train section's settings) into OUT/sft; RL
    starts from its weights (with LoRA: the adapter merged into the base, so that the RL reference is the
    SFT model and a fresh adapter learns the RL change). Selection on the dev prompts' references; the test
    split is left for the user (the RL run's own held-out evaluation is what this recipe reports). A
    finished warm start is reused on resume."""
    from tunelab.data import Splits
    from tunelab.train.supervised import train as supervised

    sft_dir = out / "sft"
    lora = cfg.tune.method == "lora"
    folder = sft_dir / "merged" if lora else sft_dir
    if resume and (sft_dir / "report.json").is_file():
        log(f"warm start: reusing {folder}")
        return str(folder)
    sft_cfg = dataclasses.replace(cfg, task="generate", output_dir=str(sft_dir),
                                  tune=dataclasses.replace(cfg.tune, merge=lora),
                                  rl=type(cfg.rl)())
    log(f"warm start: supervised fine-tuning into {sft_dir}")
    if any(e.target is None for e in splits.train + splits.dev):
        raise TunelabError("rl.sft: the supervised warm start learns the references, but some train/dev prompts "
                           "have no target; give every prompt its reference or set rl.sft=false")
    supervised(sft_cfg, Splits(splits.train, splits.dev, [], splits.about), resume=resume, overwrite=not resume)
    return str(folder)

