"""Continued pre-training on the user's own raw text: masked language modelling for encoders (BERT-style:
the MLM head is added, initialised as transformers does, when the packaged model lacks one) or causal
language modelling for decoders. The output folder is the same backbone, better read on the domain, and
feeds any fine-tuning recipe as its model.name.

Documents are packed: tokenised without padding, joined with the tokenizer's separator (BERT's [SEP], a
decoder's end-of-text) so that a document never runs into the next unmarked, and cut into blocks of
model.max_length tokens (an encoder's block starts with [CLS]); nothing is thrown away, and almost no compute
goes to padding. MLM masks anew every epoch (dynamic masking, RoBERTa), as a pure function of (seed, epoch,
block) so that a resumed run masks the same: of the maskable tokens (never a special token) exactly
round(mask_prob * n) are chosen, whole words together with data.pretrain.whole_word (words as the
tokenizer's pre-tokenizer splits them: BERT reads each CJK character as a word); of those, 80 % become
[MASK], 10 % a random token, 10 % stay, and only they carry a label (BERT's rule).

Dev selection is on the loss per predicted token (main = -loss); the report shows perplexity beside it, and
for MLM the accuracy of the masked-token predictions (the dev masks are fixed: seed 0).
"""

import math

from tunelab.data.examples import RawText
from tunelab.tasks.common import (all_examples, masked_encoder, model_loss, no_decision_to_settle, no_labels,
                                  no_samples, nothing_to_fill, predictions_as_given, refuse_only_labels,
                                  special_tokens)

DEFAULTS = {"objective": "auto", "mask_prob": 0.15, "whole_word": False}


class PretrainTask:
    kind = "pretrain"
    labels: list[str] = []
    example_type = RawText
    head = "language-modelling"
    new_head = False  # an LM head, pretrained where the model has one
    predicts = False  # a backbone to fine-tune: it is evaluated (LM loss), never asked for predictions
    token_level = False
    tag_sequences = False  # (model.crf is for tag sequences: NER)
    outputs = ("jsonl",)
    ranks_labels = False
    main_name = "loss"
    score_name = "1/perplexity"
    curve_title = "dev loss"
    decoder_only = False
    donor_rank = 0
    new_tokens_bound = None

    def __init__(self, tokenizer, max_length: int, lm: str, mask_prob: float = 0.15, whole_word: bool = False):
        from tunelab.errors import TunelabError

        self.tokenizer, self.max_length, self.lm = tokenizer, max_length, lm  # lm: mlm | clm
        self.mask_prob, self.whole_word = mask_prob, whole_word
        self.opening, closing = special_tokens(tokenizer)
        if lm == "mlm":
            if tokenizer.mask_token_id is None:
                raise TunelabError("data.pretrain.objective=mlm: this tokenizer has no mask token; a causal LM "
                                   "continues pre-training with objective=clm")
            self.separator = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else closing[-1]
            self.opening = self.opening or ([tokenizer.cls_token_id] if tokenizer.cls_token_id is not None else [])
        else:
            self.separator = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else (closing or [None])[-1]
        if self.separator is None:
            raise TunelabError("this tokenizer has no token that ends a document (sep or eos) to pack documents by")
        self.special = set(tokenizer.all_special_ids)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.separator
        self.truncated = 0

    def pack(self, examples: list) -> list[dict]:
        """Blocks of at most max_length tokens: the documents' tokens, each document followed by the separator,
        cut in order (an MLM block opens with the tokenizer's opening token, [CLS]). `starts` marks the tokens
        that begin a word (whole-word masking); `special` the ones never masked."""
        enc = self.tokenizer([e.text for e in examples], add_special_tokens=False)
        ids, starts = [], []
        for i in range(len(examples)):
            words = enc.word_ids(i)
            for j, t in enumerate(enc["input_ids"][i]):
                ids.append(t)
                starts.append(j == 0 or words[j] != words[j - 1] or words[j] is None)
            ids.append(self.separator)
            starts.append(True)
        lead = list(self.opening) if self.lm == "mlm" else []
        size = self.max_length - len(lead)
        out = []
        for k in range(0, len(ids), size):
            block = lead + ids[k:k + size]
            out.append({"input_ids": block, "starts": [True] * len(lead) + starts[k:k + size],
                        "labels": list(block) if self.lm == "clm" else [-100] * len(block),
                        "example": len(out)})
        return out

    def encode(self, examples: list, training: bool) -> list[dict]:
        """Packed blocks; for MLM unmasked (labels all -100) until masked for an epoch (epoch_features)."""
        return self.pack(examples)

    def epoch_features(self, features: list[dict], seed: int, epoch: int) -> list[dict]:
        """MLM: every block masked anew for this epoch (a pure function of seed, epoch and the block); CLM:
        the blocks as they are."""
        if self.lm != "mlm":
            return features
        return [f | dict(zip(("input_ids", "labels"), self.mask(f, seed * 1_000_003 + epoch, n)))
                for n, f in enumerate(features)]

    def mask(self, feature: dict, seed: int, block: int) -> tuple[list[int], list[int]]:
        """(input ids, labels) of one block masked by BERT's rule (see the module's docstring)."""
        import numpy as np

        rng = np.random.default_rng([seed, block])
        ids = list(feature["input_ids"])
        maskable = [j for j, t in enumerate(ids) if t not in self.special]
        want = round(self.mask_prob * len(maskable))
        if self.whole_word:
            words, cur = [], []
            for j in maskable:  # a word: a start token and the tokens after it up to the next start
                if feature["starts"][j] and cur:
                    words.append(cur)
                    cur = []
                cur.append(j)
            words += [cur] if cur else []
            chosen = []
            for w in rng.permutation(len(words)):
                if len(chosen) + len(words[w]) <= want or not chosen:
                    chosen += words[w]
                if len(chosen) >= want:
                    break
        else:
            chosen = [maskable[j] for j in rng.permutation(len(maskable))[:want]]
        labels = [-100] * len(ids)
        vocab = len(self.tokenizer)
        for j in sorted(chosen):
            labels[j] = ids[j]
            r = rng.random()
            if r < 0.8:
                ids[j] = self.tokenizer.mask_token_id
            elif r < 0.9:
                t = int(rng.integers(vocab))
                while t in self.special:
                    t = int(rng.integers(vocab))
                ids[j] = t
        return ids, labels

    def evaluate(self, model, examples, device, bf16=False, batch_size=16, desc=None, dist=None,
                 predictions=None) -> dict:
        """Mean loss per predicted token (masked tokens for MLM, with seed 0's fixed masks; every next token for
        CLM), perplexity, and for MLM the accuracy of the masked-token predictions."""
        import torch

        from tunelab.data.batching import collate
        from tunelab.inference import inference_batches
        from tunelab.runtime import autocast, eval_mode

        features = self.epoch_features(self.encode(examples, training=False), 0, 0)
        parts = {}
        with torch.inference_mode(), eval_mode(model):
            for pos, idx in inference_batches(features, min(batch_size, 8), desc, dist):
                batch = {k: v.to(device) for k, v in collate([features[i] for i in idx], self.pad).items()}
                with autocast(device, bf16):
                    out = model(**batch)
                labels = batch["labels"] if self.lm == "mlm" else batch["labels"][:, 1:]
                n = int((labels != -100).sum())
                hit = int((out.logits.argmax(-1)[labels != -100] == labels[labels != -100]).sum()) \
                    if self.lm == "mlm" else 0
                parts[pos] = (out.loss.float().item() if n else 0.0, n, hit)
        if dist is not None:
            parts = dist.gather(parts)
        total = sum(loss * n for loss, n, _ in parts.values())
        count = sum(n for _, n, _ in parts.values())
        loss = total / max(1, count)
        out = {"main": -loss, "loss": loss, "perplexity": math.exp(min(loss, 50)), "predicted_tokens": count,
               "blocks": len(features)}
        if self.lm == "mlm":
            out["masked_accuracy"] = sum(h for _, _, h in parts.values()) / max(1, count)
        return out

    def predict(self, model, examples, device, bf16=False, batch_size=64, desc=None, max_new_tokens=None,
                dist=None) -> list:
        from tunelab.errors import TunelabError

        raise TunelabError("a continued pre-training folder is a backbone, not a predictor: fine-tune it "
                           "(model.name=THIS_FOLDER in any recipe), or evaluate its language modelling with "
                           "`tunelab eval DIR --data TEXT_FILE`")

    # ---- what the task is, outside one tokenizer (see tunelab.tasks.Task) ----

    noun = "a raw-text"

    @staticmethod
    def reader(path, fmt: str, labelled: bool, f):
        """A text file, one document a line (.txt, read as text whatever data.format says of .txt), JSONL
        with a text field, or a folder whose .txt files are one document each."""
        from pathlib import Path

        from tunelab.data.readers import jsonl_texts, text_lines
        from tunelab.errors import TunelabError

        path = Path(path)
        if path.is_dir():
            return _folder_documents(path)
        if fmt == "jsonl":
            items = jsonl_texts(path, f.field("text_field"), None)
        elif fmt in ("text", "conll") and path.suffix.lower() not in (".conll", ".iob", ".bio"):
            items = text_lines(path)
        else:
            raise TunelabError(f"{path}: pre-training reads raw text: a .txt file (one document a line), JSONL with "
                               f"a {f.text_field!r} field, or a folder of .txt files")
        return (RawText(e.text, e.source, e.line) if hasattr(e, "text") else e for e in items)

    @staticmethod
    def from_record(r, i: int) -> RawText:
        from tunelab.errors import TunelabError

        text = r.get("text") if isinstance(r, dict) else r
        if not isinstance(text, str) or not text.strip():
            raise TunelabError(f"record {i}: a document must be a non-empty string (or {{\"text\": ...}})")
        return RawText(text, "<memory>", i)

    @staticmethod
    def hf_records(ds, f) -> list[dict]:
        from tunelab.tasks.common import require_columns

        require_columns(ds, [f.text_field])
        return [{"text": r[f.text_field]} for r in ds]

    label_list = gold = staticmethod(no_labels)
    check_kept_labels = refuse_only_labels("raw text has no labels")
    keep_labels = staticmethod(all_examples)
    merge_predictions = staticmethod(nothing_to_fill)
    restrict_predictions = staticmethod(predictions_as_given)
    objective = staticmethod(model_loss)
    settle = no_decision_to_settle
    samples = no_samples

    @staticmethod
    def model_class(config):
        from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

        return AutoModelForMaskedLM if masked_encoder(config) else AutoModelForCausalLM

    @staticmethod
    def peft_type(config):
        import peft

        if masked_encoder(config):
            from tunelab.errors import TunelabError

            raise TunelabError("peft has no task type for masked language modelling: continue pre-training an "
                               "encoder with tune.method=full (or bitfit, freeze_layers)")
        return peft.TaskType.CAUSAL_LM

    @staticmethod
    def configure(config, labels) -> None:
        """No label head: the output is the vocabulary."""

    @staticmethod
    def options(data, model_config) -> dict:
        from tunelab.errors import TunelabError

        p = data.pretrain
        objective = "mlm" if masked_encoder(model_config) else "clm"
        if p.objective not in ("auto", objective):
            raise TunelabError(f"data.pretrain.objective={p.objective}: a {model_config.model_type} model is trained "
                               f"with {objective} here (objective=auto chooses it)")
        return {"objective": objective, "mask_prob": p.mask_prob, "whole_word": p.whole_word}

    @classmethod
    def build(cls, tokenizer, labels, max_length, options: dict):
        o = DEFAULTS | options
        return cls(tokenizer, max_length, "clm" if o["objective"] == "auto" else o["objective"], o["mask_prob"],
                   o["whole_word"])

    def meta(self) -> dict:
        return {"task": self.kind, "labels": [], "max_length": self.max_length, "context_sentences": 0,
                "options": {"objective": self.lm, "mask_prob": self.mask_prob, "whole_word": self.whole_word}}

    def describe(self) -> dict:
        return {"kind": self.kind, "objective": self.lm}

    @staticmethod
    def format_main(m: dict) -> str:
        return f"{m['loss']:.4f}"

    @staticmethod
    def score(m: dict) -> float:
        return math.exp(m["main"])

    @staticmethod
    def curve_value(main: float) -> float:
        return -main

    @staticmethod
    def text_examples(texts: list) -> tuple[list, None]:
        return [RawText(t.text, t.source, t.line) for t in texts], None

    @staticmethod
    def records(labels, examples, predictions, offsets=None):
        return iter(())


def _folder_documents(folder):
    """Each .txt file under `folder` (sorted, recursively) as one document."""
    from tunelab.data.readers import BadLine

    files = sorted(p for p in folder.rglob("*.txt") if p.is_file())
    if not files:
        yield BadLine(str(folder), 0, "no .txt files in this folder")
        return
    for p in files:
        try:
            text = p.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError as e:
            yield BadLine(str(p), 0, f"not UTF-8 text ({e.reason} at byte {e.start})")
            continue
        if text:
            yield RawText(text, str(p), 1)
