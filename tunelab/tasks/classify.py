"""Sequence classification: one label per text, read from the head on the first ([CLS]) token.

Texts longer than model.max_length keep their beginning (title and lead, where topic and sentiment are
usually plain); how many were cut is reported, never hidden.
"""

import numpy as np

from tunelab.data.examples import TextExample
from tunelab.tasks.ner import special_tokens


class ClassifyTask:
    kind = "classify"

    def __init__(self, tokenizer, labels: list[str], max_length: int):
        self.tokenizer = tokenizer
        self.labels = labels
        self.label2id = {label: i for i, label in enumerate(labels)}
        self.max_length = max_length
        self.truncated = 0  # of the last encode() call
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.suffix = special_tokens(tokenizer)[1]

    def encode(self, examples: list[TextExample], training: bool) -> list[dict]:
        full = self.tokenizer([e.text for e in examples])["input_ids"]
        self.truncated = sum(len(ids) > self.max_length for ids in full)
        keep = self.max_length - len(self.suffix)
        return [{"input_ids": ids if len(ids) <= self.max_length else ids[:keep] + self.suffix,
                 "labels": self.label2id[e.label] if e.label is not None else -100, "example": i}
                for i, (ids, e) in enumerate(zip(full, examples))]

    def decode(self, features, logits, n_examples):
        """Per example: (label, probabilities over self.labels)."""
        out = [None] * n_examples
        for feat, lg in zip(features, logits):
            lg = np.asarray(lg, dtype=np.float32)
            p = np.exp(lg - lg.max())
            p /= p.sum()
            out[feat["example"]] = (self.labels[int(p.argmax())], p.tolist())
        return out

    def metrics(self, examples, predictions) -> dict:
        from tunelab.metrics import classification_metrics

        return classification_metrics([e.label for e in examples], [p[0] for p in predictions], self.labels)
