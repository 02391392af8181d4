"""Supervised generation: prompt -> reference text, for causal LMs (decoder-only) and encoder-decoders.

Causal LM: one sequence `prompt + prompt_suffix + target + eos`; the loss is on the target and eos only (the
prompt is context, not something to learn to write). Encoder-decoder: the prompt is the encoder input and the
target + eos the decoder labels; the model shifts them into its decoder input itself.

Over-long prompts lose their end, never the suffix or the target (the start of an article carries its point);
targets keep their first `max_target_length` tokens. Model selection uses the dev loss per target token
(`main` = -loss, so that higher is better like every other task), or with data.select_by a score of the
decoded dev outputs (`main` = BLEU, chrF or ROUGE-L / 100). Perplexity is reported beside the loss; the
test split and `tunelab eval` also decode and score the outputs (sacreBLEU, chrF, ROUGE-L: settle() turns
that on after selection, so that a loss-selected run decodes only once, at the end).
Prediction decodes greedily (deterministic), or by beam search with data.num_beams, `max_target_length` new
tokens at most unless the call asks for fewer (`max_new_tokens`, e.g. per request in the server).
"""

import math

from tunelab.data.examples import GenExample, TextExample
from tunelab.tasks.common import (all_examples, model_loss, no_labels, nothing_to_fill, predictions_as_given,
                                  refuse_only_labels, same_every_epoch, special_tokens)

# torch (and what imports it) is imported where it is used: the task registry, and so config validation,
# loads without it.

SAMPLES = 8  # test outputs shown in the report beside their references


class GenerateTask:
    kind = "generate"
    labels: list[str] = []
    example_type = GenExample
    head = "generation"
    new_head = False  # the LM head is pretrained: it trains only when the whole model does
    predicts = True  # it makes predictions (tunelab predict, serve)
    token_level = False
    tag_sequences = False  # (model.crf is for tag sequences: NER)
    outputs = ("jsonl",)
    ranks_labels = False
    main_name = "loss"  # main = -loss (higher is better, like every task); reports show the loss
    score_name = "1/perplexity"
    curve_title = "dev loss"
    decoder_only = True  # in a shared multi-task backbone: a causal LM's
    donor_rank = 0  # its LM head is tied to the embeddings: its backbone is the one the others share

    def __init__(self, tokenizer, max_length: int, encoder_decoder: bool, prompt_suffix: str = "\n",
                 max_target_length: int = 64, select_by: str = "loss", num_beams: int = 1,
                 score_outputs: bool = True):
        self.tokenizer = tokenizer
        self.select_by, self.num_beams = select_by, num_beams
        # decode and score outputs in evaluate(): always when selecting by them; else after settle()
        self.score_outputs = score_outputs or select_by != "loss"
        self.max_length = max_length
        self.encoder_decoder = encoder_decoder
        self.max_target_length = max_target_length
        self.prompt_suffix = prompt_suffix
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

    @property
    def new_tokens_bound(self) -> int:
        """The most new tokens a prediction may ask for (the references' length in training)."""
        return self.max_target_length

    def evaluate(self, model, examples, device, bf16=False, batch_size=16, desc=None, dist=None,
                 predictions=None) -> dict:
        """Mean loss per reference token (and perplexity) under teacher forcing. dist: a distributed run's
        ranks share the batches; the sums are taken in batch order, as on one process. With score_outputs,
        the decoded outputs (`predictions` when given, else decoded here, on every rank: decoding is not
        shared) are also scored against the references: sacreBLEU, chrF, ROUGE-L."""
        import torch

        from tunelab.data.batching import collate
        from tunelab.inference import inference_batches
        from tunelab.runtime import autocast, eval_mode

        batch_size = min(batch_size, 16)
        features = self.encode(examples, training=True)
        parts = {}
        with torch.inference_mode(), eval_mode(model):
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
        out = {"main": -loss, "loss": loss, "perplexity": math.exp(min(loss, 50)), "target_tokens": count}
        if self.score_outputs:
            from tunelab.metrics import generation_metrics

            outputs = predictions if predictions is not None else self.predict(model, examples, device, bf16,
                                                                               batch_size, desc)
            out |= generation_metrics([e.target for e in examples], outputs) | {"outputs": len(outputs)}
            if self.select_by != "loss":
                out |= {"main": out[self.select_by] / 100, "selected_by": self.select_by}
        return out

    def settle(self, dev_metrics: dict) -> None:
        """From now on (the test split, the saved model's evaluations) decode and score the outputs too."""
        self.score_outputs = True

    def pad_prompts(self, rows: list[list[int]]) -> tuple:
        """Prompt ids and attention mask for `generate`, both (rows, longest) tensors: a decoder continues from
        the last position, so its prompts are padded on the left; an encoder's on the right."""
        import torch

        longest = max(map(len, rows))
        ids = torch.full((len(rows), longest), self.pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, row in enumerate(rows):
            sl = slice(0, len(row)) if self.encoder_decoder else slice(longest - len(row), longest)
            ids[r, sl], mask[r, sl] = torch.tensor(row), 1
        return ids, mask

    def predict(self, model, examples, device, bf16=False, batch_size=16, desc=None, max_new_tokens=None,
                dist=None) -> list[str]:
        """Greedy outputs (tunelab.tasks.Task's prediction call); one process generates them all."""
        return self.generate(model, examples, device, bf16, min(batch_size, 16), desc, max_new_tokens)

    def generate(self, model, examples, device, bf16=False, batch_size=16, desc=None,
                 max_new_tokens: int | None = None) -> list[str]:
        """Greedy outputs, one string per example, of at most `max_new_tokens` tokens (None: the task's
        max_target_length; a larger value is an error, as the model never learned to write that far)."""
        bound = self.max_target_length if max_new_tokens is None else max_new_tokens
        if not 1 <= bound <= self.max_target_length:
            raise ValueError(f"max_new_tokens is {max_new_tokens}; it must be between 1 and the model's "
                             f"max_target_length ({self.max_target_length})")
        import torch

        from tunelab.inference import inference_batches
        from tunelab.runtime import autocast, eval_mode

        prompts = [GenExample(e.prompt, None, e.source, e.line) for e in examples]
        features = self.encode(prompts, training=False)
        out = [None] * len(examples)
        with torch.inference_mode(), eval_mode(model):
            for _, idx in inference_batches(features, batch_size, desc):
                ids, mask = self.pad_prompts([features[i]["input_ids"] for i in idx])
                longest = ids.shape[1]
                with autocast(device, bf16):
                    gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                         num_beams=self.num_beams, max_new_tokens=bound, pad_token_id=self.pad,
                                         eos_token_id=self.eos)
                new = gen if self.encoder_decoder else gen[:, longest:]
                for r, i in enumerate(idx):
                    out[i] = self.tokenizer.decode(new[r], skip_special_tokens=True).strip()
        return out

    # ---- what the task is, outside one tokenizer (see tunelab.tasks.Task) ----

    noun = "a generation"

    @staticmethod
    def reader(path, fmt: str, labelled: bool, f):
        """JSONL or CSV with a prompt and target field -> GenExample; unlabelled (prediction input) a prompt
        field, or plain text lines, one prompt each -> raw TextExample."""
        from tunelab.tasks.common import text_reader

        items = text_reader(path, fmt, labelled, f.field("prompt_field"),
                            f.field("target_field") if labelled else None, True, "generation")
        if not labelled:
            return items
        # the readers' TextExample(text, label) holds the prompt and the target
        return (GenExample(e.text, e.label, e.source, e.line) if isinstance(e, TextExample) else e for e in items)

    @staticmethod
    def from_record(r, i: int) -> GenExample:
        """An in-memory record {"prompt": ..., "target": ...} (or a (prompt, target) pair; no target to predict)."""
        from tunelab.errors import TunelabError

        prompt, target = (r.get("prompt"), r.get("target")) if isinstance(r, dict) else r
        for name, value in (("prompt", prompt), ("target", target)):
            if (value is not None or name == "prompt") and (not isinstance(value, str) or not value.strip()):
                raise TunelabError(f"record {i}: {name} must be a non-empty string")
        return GenExample(prompt, target, "<memory>", i)

    @staticmethod
    def hf_records(ds, f) -> list[dict]:
        from tunelab.tasks.common import require_columns

        require_columns(ds, [f.prompt_field, f.target_field])
        return [{"prompt": r[f.prompt_field], "target": r[f.target_field]} for r in ds]

    label_list = gold = staticmethod(no_labels)  # references, not labels
    check_kept_labels = refuse_only_labels("generation data has references")
    keep_labels = staticmethod(all_examples)

    merge_predictions = staticmethod(nothing_to_fill)
    objective = staticmethod(model_loss)
    epoch_features = same_every_epoch
    restrict_predictions = staticmethod(predictions_as_given)

    @staticmethod
    def model_class(config):
        from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

        return AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM

    @staticmethod
    def peft_type(config):
        import peft

        return peft.TaskType.SEQ_2_SEQ_LM if config.is_encoder_decoder else peft.TaskType.CAUSAL_LM

    @staticmethod
    def configure(config, labels) -> None:
        """No label head to size: the output is the vocabulary."""

    @staticmethod
    def options(data, model_config) -> dict:
        return {"encoder_decoder": bool(model_config.is_encoder_decoder), "prompt_suffix": data.prompt_suffix,
                "max_target_length": data.max_target_length, "select_by": data.select_by,
                "num_beams": data.num_beams, "score_outputs": False}  # (training: until settle())

    @classmethod
    def build(cls, tokenizer, labels, max_length, options: dict):
        return cls(tokenizer, max_length, options.get("encoder_decoder", False), options.get("prompt_suffix", "\n"),
                   options.get("max_target_length", 64), options.get("select_by", "loss"),
                   options.get("num_beams", 1), options.get("score_outputs", True))

    def meta(self) -> dict:
        return {"task": self.kind, "labels": [], "max_length": self.max_length, "context_sentences": 0,
                "generation": {"encoder_decoder": self.encoder_decoder, "prompt_suffix": self.prompt_suffix,
                               "max_target_length": self.max_target_length, "select_by": self.select_by,
                               "num_beams": self.num_beams}}

    def describe(self) -> dict:
        return {"kind": self.kind, "max_new_tokens": self.max_target_length}

    @staticmethod
    def format_main(m: dict) -> str:
        # (reports write "loss " before this: main_name)
        selection = f" (selected by {m['selected_by']}: {m[m['selected_by']]:.2f})" if "selected_by" in m else ""
        return f"{m['loss']:.4f}{selection}"

    @staticmethod
    def score(m: dict) -> float:
        """1/perplexity = exp(-loss per token), or the selected output score / 100: on a 0-1 scale, so that it
        averages with other tasks'."""
        return m["main"] if "selected_by" in m else math.exp(m["main"])

    @staticmethod
    def curve_value(main: float) -> float:
        # the loss itself (main = -loss <= 0); an output score (select_by: main = score / 100 > 0) on 0-100
        return -main if main <= 0 else 100 * main

    def samples(self, model, examples, device, bf16) -> list[dict]:
        """The first SAMPLES examples' greedy outputs beside their prompts and references (report)."""
        shown = examples[:SAMPLES]
        outputs = self.predict(model, shown, device, bf16)
        return [{"prompt": e.prompt, "reference": e.target, "output": o} for e, o in zip(shown, outputs)]

    @staticmethod
    def text_examples(texts: list) -> tuple[list, None]:
        return [GenExample(t.text, None, t.source, t.line) for t in texts], None

    @staticmethod
    def records(labels, examples, predictions, offsets=None):
        """One record per example: prompt, output (and the reference when there is one)."""
        for ex, p in zip(examples, predictions):
            yield {"prompt": ex.prompt, "output": p} | ({"reference": ex.target} if ex.target is not None else {})
