"""Rollouts: k sampled completions per prompt from one batched `generate` call (KV cache on), and the
per-token log-probabilities of those completions under a model (the policy, its rollout-time self, or the
reference).

Causal LMs see `prompt + completion`, prompts padded on the left with position ids that skip the padding
(exactly what `generate` used while sampling). Encoder-decoders read the prompt in the encoder and score the
completion in the decoder. Only the completion's logits are formed (`logits_to_keep`): a 50k-word vocabulary
over the whole prompt would cost far more memory than the model.
"""

from dataclasses import dataclass

import torch

from tunelab.data.examples import GenExample
from tunelab.runtime import autocast


@dataclass
class Rollout:
    prompt_ids: torch.Tensor  # (B, P): padded on the left (causal) or the right (encoder-decoder)
    prompt_mask: torch.Tensor  # (B, P)
    tokens: torch.Tensor  # (B*k, T): sampled completions, padded after their end-of-text
    mask: torch.Tensor  # (B*k, T) float: 1 on a completion's tokens, its end-of-text included
    k: int
    texts: list[str]  # decoded completions
    start: torch.Tensor | None = None  # (B*k, 1) encoder-decoder: the decoder's start token

    def rows(self, idx: torch.Tensor) -> "Rollout":
        """The completions `idx` (with their prompts), for a micro-batch."""
        p = idx // self.k
        return Rollout(self.prompt_ids[p], self.prompt_mask[p], self.tokens[idx], self.mask[idx], 1,
                       [self.texts[i] for i in idx.tolist()], None if self.start is None else self.start[idx])

    @property
    def n_tokens(self) -> int:
        return int(self.mask.sum())


def encode_prompts(task, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt ids (the generation task's own encoding: truncation, prompt suffix) padded for generate."""
    feats = task.encode([GenExample(p) for p in prompts], training=False)
    ids, mask = task.pad_prompts([f["input_ids"] for f in feats])
    return ids.to(device), mask.to(device)


def completion_mask(tokens: torch.Tensor, eos: int) -> torch.Tensor:
    """1 up to and including the first end-of-text, 0 after it (generate pads finished rows)."""
    is_eos = (tokens == eos).long()
    before = (is_eos.cumsum(-1) - is_eos) == 0
    return before.float()


@torch.no_grad()
def sample(model, task, prompts: list[str], k: int, max_new_tokens: int, temperature: float = 1.0,
           top_p: float = 1.0, greedy: bool = False, device="cpu", bf16: bool = False,
           generator_seed: int | None = None) -> Rollout:
    """k completions per prompt in one generate call (greedy: one, the argmax path). Rows come grouped by
    prompt. `generator_seed`: sample under that seed and leave the global random state as it was (held-out
    evaluation must neither depend on nor disturb the training stream)."""
    ids, mask = encode_prompts(task, prompts, device)
    if greedy:
        k, how = 1, {"do_sample": False}
    else:
        # top_k=0: transformers' default keeps only the 50 likeliest tokens, which is not the policy.
        how = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0, "num_return_sequences": k}
    was_training = model.training
    model.eval()
    devices = [device] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices, enabled=generator_seed is not None):
        if generator_seed is not None:
            torch.manual_seed(generator_seed)
        with autocast(torch.device(device), bf16):
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 pad_token_id=task.pad, eos_token_id=task.eos, **how)
    model.train(was_training)
    start = None
    if task.encoder_decoder:
        start, tokens = gen[:, :1], gen[:, 1:]
    else:
        tokens = gen[:, ids.shape[1]:]
    if tokens.shape[1] == 0:  # max_new_tokens >= 1, but be safe with an immediately finished batch
        tokens = torch.full((gen.shape[0], 1), task.eos, dtype=torch.long, device=gen.device)
    cmask = completion_mask(tokens, task.eos)
    texts = [task.tokenizer.decode(t[m.bool()], skip_special_tokens=True).strip() for t, m in zip(tokens, cmask)]
    return Rollout(ids, mask, tokens, cmask, k, texts, start)


def token_logprobs(model, roll: Rollout, temperature: float = 1.0, bf16: bool = False,
                   entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(y_t | prompt, y_<t) for every completion token, (N, T) float32; with `entropy` also the
    policy's entropy at each of those positions. Runs with gradients when the caller has them on."""
    k = roll.k
    prompt = roll.prompt_ids.repeat_interleave(k, 0) if k > 1 else roll.prompt_ids
    pmask = roll.prompt_mask.repeat_interleave(k, 0) if k > 1 else roll.prompt_mask
    tokens, cmask = roll.tokens, roll.mask.long()
    with autocast(roll.tokens.device, bf16):
        if roll.start is not None:  # encoder-decoder: the decoder reads start + completion[:-1]
            dec_in = torch.cat([roll.start, tokens[:, :-1]], 1)
            dec_mask = torch.cat([torch.ones_like(roll.start), cmask[:, :-1]], 1)
            logits = model(input_ids=prompt, attention_mask=pmask, decoder_input_ids=dec_in,
                           decoder_attention_mask=dec_mask).logits
        else:
            ids = torch.cat([prompt, tokens], 1)
            attn = torch.cat([pmask, cmask], 1)
            positions = (attn.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=ids, attention_mask=attn, position_ids=positions,
                           logits_to_keep=tokens.shape[1] + 1).logits[:, :-1]
    logits = logits.float() / temperature
    logz = torch.logsumexp(logits, -1)
    logp = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - logz
    ent = None
    if entropy:
        probs = torch.softmax(logits, -1)
        ent = logz - (probs * logits).sum(-1)
    return logp, ent
