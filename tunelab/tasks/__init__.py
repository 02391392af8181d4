"""Task types. Each turns examples into features, model outputs into predictions, and predictions into
metrics. The training recipe, `tunelab eval`, `tunelab predict` and the server all go through these."""

from typing import Protocol


class Task(Protocol):
    labels: list[str]
    pad: int  # the input id that pads a batch (collate)

    def encode(self, examples: list, training: bool) -> list[dict]:
        """Features: dicts with input_ids (list[int]), labels (list[int] or int), example (int)."""

    def decode(self, features: list[dict], logits: list, n_examples: int) -> list:
        """Per-example predictions from per-feature logits (numpy, (seq, labels) or (labels,))."""

    def metrics(self, examples: list, predictions: list) -> dict:
        """Metrics against the examples' gold labels; the key `main` is what model selection maximises."""


class GenerationTask(Protocol):
    """Generation tasks have no logits to decode: they score teacher-forced loss and write text."""

    def encode(self, examples: list, training: bool) -> list[dict]: ...

    def evaluate(self, model, examples, device, bf16, batch_size, desc) -> dict:
        """Metrics with `main` (higher is better)."""

    def generate(self, model, examples, device, bf16, batch_size, desc, max_new_tokens=None) -> list[str]:
        """Greedy outputs; `max_new_tokens` (None: the task's own bound) caps their length."""


def make_task(kind: str, tokenizer, labels, max_length: int, context_sentences: int = 0, *,
              encoder_decoder: bool = False, prompt_suffix: str = "\n", max_target_length: int = 64):
    from tunelab.tasks.classify import ClassifyTask
    from tunelab.tasks.generate import GenerateTask
    from tunelab.tasks.ner import NerTask

    if kind == "generate":
        return GenerateTask(tokenizer, max_length, encoder_decoder, prompt_suffix, max_target_length)
    if kind == "ner":
        return NerTask(tokenizer, labels, max_length, context_sentences)
    return ClassifyTask(tokenizer, labels, max_length)
