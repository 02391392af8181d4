"""Supervised generation: prompt -> reference text, for causal LMs (decoder-only) and encoder-decoders.

Causal LM: one sequence `prompt + prompt_suffix + target + eos`; the loss is on the target and eos only (the
prompt is context, not something to learn to write). Encoder-decoder: the prompt is the encoder input and the
target + eos the decoder labels; the model shifts them into its decoder input itself.

Over-long prompts lose their end, never the suffix or the target (the start of an article carries its point);
targets keep their first `max_target_length` tokens. Model selection uses the dev loss per target token
(`main` = -loss, so that higher is better like every other task); perplexity is reported beside it.
Prediction decodes greedily (deterministic), `max_target_length` new tokens at most unless the call asks
for fewer (`max_new_tokens`, e.g. per request in the server).
"""

import math

import torch

from tunelab.data.batching import collate
from tunelab.data.examples import GenExample
from tunelab.predict import autocast, eval_mode, inference_batches
from tunelab.tasks.ner import special_tokens


class GenerateTask:
    kind = "generate"
    labels: list[str] = []

    def __init__(self, tokenizer, max_length: int, encoder_decoder: bool, prompt_suffix: str = "\n",
                 max_target_length: int = 64):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.encoder_decoder = encoder_decoder
        self.max_target_length = max_target_length
        self.eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        if self.eos is None:
            raise ValueError("the tokenizer has neither an eos nor a sep token to end a generated text")
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos
        self.suffix = [] if encoder_decoder else tokenizer(prompt_suffix, add_special_tokens=False)["input_ids"]
        self.closing = special_tokens(tokenizer)[1]  # e.g. [SEP] or </s> after an encoder input
        self.truncated = 0

    def _target(self, text: str) -> list[int]:
        # A leading space makes the first word the same token it is inside running text (BPE vocabularies).
        lead = "" if self.encoder_decoder else " "
        ids = self.tokenizer(lead + text.strip(), add_special_tokens=False)["input_ids"]
        return ids[: self.max_target_length - 1] + [self.eos]

    def encode(self, examples: list[GenExample], training: bool) -> list[dict]:
        """input_ids and labels (-100 where no loss); without a target (prediction) only the prompt."""
        prompts = self.tokenizer([e.prompt for e in examples])["input_ids"]
        self.truncated = 0
        out = []
        for i, (ids, ex) in enumerate(zip(prompts, examples)):
            target = self._target(ex.target) if ex.target is not None else []
            if self.encoder_decoder:
                if len(ids) > self.max_length:
                    ids, self.truncated = ids[: self.max_length - len(self.closing)] + self.closing, self.truncated + 1
                out.append({"input_ids": ids, "labels": target or [-100], "example": i})
                continue
            room = self.max_length - len(self.suffix) - len(target)
            if len(ids) > room:
                ids, self.truncated = ids[:max(1, room)], self.truncated + 1
            ids = ids + self.suffix
            out.append({"input_ids": ids + target, "labels": [-100] * len(ids) + target, "example": i})
        return out

    @torch.inference_mode()
    def evaluate(self, model, examples, device, bf16=False, batch_size=16, desc=None, dist=None) -> dict:
        """Mean loss per reference token (and perplexity) under teacher forcing. dist: a distributed run's
        ranks share the batches; the sums are taken in batch order, as on one process."""
        features = self.encode(examples, training=True)
        parts = {}
        with eval_mode(model):
            for pos, idx in inference_batches(features, batch_size, desc, dist):
                batch = {k: v.to(device) for k, v in collate([features[i] for i in idx], self.pad).items()}
                with autocast(device, bf16):
                    loss = model(**batch).loss.float().item()
                labels = batch["labels"] if self.encoder_decoder else batch["labels"][:, 1:]  # causal: shifted
                parts[pos] = (loss, int((labels != -100).sum()))
        if dist is not None:
            parts = dist.gather(parts)
        total, count = 0.0, 0
        for pos in sorted(parts):
            loss, n = parts[pos]
            total, count = total + loss * n, count + n
        loss = total / max(1, count)
        return {"main": -loss, "loss": loss, "perplexity": math.exp(min(loss, 50)), "target_tokens": count}

    def pad_prompts(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt ids and attention mask for `generate`: a decoder continues from the last position, so its
        prompts are padded on the left; an encoder's on the right."""
        longest = max(map(len, rows))
        ids = torch.full((len(rows), longest), self.pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, row in enumerate(rows):
            sl = slice(0, len(row)) if self.encoder_decoder else slice(longest - len(row), longest)
            ids[r, sl], mask[r, sl] = torch.tensor(row), 1
        return ids, mask

    @torch.inference_mode()
    def generate(self, model, examples, device, bf16=False, batch_size=16, desc=None,
                 max_new_tokens: int | None = None) -> list[str]:
        """Greedy outputs, one string per example, of at most `max_new_tokens` tokens (None: the task's
        max_target_length; a larger value is an error, as the model never learned to write that far)."""
        bound = self.max_target_length if max_new_tokens is None else max_new_tokens
        if not 1 <= bound <= self.max_target_length:
            raise ValueError(f"max_new_tokens is {max_new_tokens}; it must be between 1 and the model's "
                             f"max_target_length ({self.max_target_length})")
        prompts = [GenExample(e.prompt, None, e.source, e.line) for e in examples]
        features = self.encode(prompts, training=False)
        out = [None] * len(examples)
        with eval_mode(model):
            for _, idx in inference_batches(features, batch_size, desc):
                ids, mask = self.pad_prompts([features[i]["input_ids"] for i in idx])
                longest = ids.shape[1]
                with autocast(device, bf16):
                    gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                         max_new_tokens=bound, pad_token_id=self.pad,
                                         eos_token_id=self.eos)
                new = gen if self.encoder_decoder else gen[:, longest:]
                for r, i in enumerate(idx):
                    out[i] = self.tokenizer.decode(new[r], skip_special_tokens=True).strip()
        return out
