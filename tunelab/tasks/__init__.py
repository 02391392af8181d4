"""Task types. Each turns examples into features, model outputs into predictions, and predictions into
metrics. The training recipe, `tunelab eval`, `tunelab predict` and the server all go through these."""

from typing import Protocol


class Task(Protocol):
    labels: list[str]

    def encode(self, examples: list, training: bool) -> list[dict]:
        """Features: dicts with input_ids (list[int]), labels (list[int] or int), example (int)."""

    def decode(self, features: list[dict], logits: list, n_examples: int) -> list:
        """Per-example predictions from per-feature logits (numpy, (seq, labels) or (labels,))."""

    def metrics(self, examples: list, predictions: list) -> dict:
        """Metrics against the examples' gold labels; the key `main` is what model selection maximises."""


def make_task(kind: str, tokenizer, labels, max_length: int, context_sentences: int = 0):
    from tunelab.tasks.classify import ClassifyTask
    from tunelab.tasks.ner import NerTask

    if kind == "ner":
        return NerTask(tokenizer, labels, max_length, context_sentences)
    return ClassifyTask(tokenizer, labels, max_length)
