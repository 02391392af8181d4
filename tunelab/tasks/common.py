"""Pieces several task types share: the tokenizer's special tokens and pad id, and prediction through
per-feature logits (encode -> batched forward -> decode) for the task types that classify."""

from tunelab.inference import feature_logits


def special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a sequence ([CLS] / [SEP] for BERT, <s> / </s> ...)."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for i in range(len(full) - len(bare) + 1):
        if full[i:i + len(bare)] == bare:
            return full[:i], full[i + len(bare):]
    return [], []


def pad_id(tokenizer, fallback: int = 0) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else fallback


def predict_by_logits(task, model, examples: list, device, bf16=False, batch_size=64, desc=None,
                      max_new_tokens=None, dist=None) -> list:
    """encode -> logits per feature -> the task's decode; one prediction per example."""
    if max_new_tokens is not None:
        raise ValueError(f"max_new_tokens is for generation; this task is {task.kind}")
    features = task.encode(examples, training=False)
    logits = feature_logits(model, features, task.pad, device, bf16, batch_size, desc, dist)
    return task.decode(features, logits, len(examples))


def evaluate_by_predictions(task, model, examples: list, device, bf16=False, batch_size=64, desc=None, dist=None,
                            predictions=None) -> dict:
    """Metrics of the task's predictions (made here unless given) against the examples' gold labels."""
    if predictions is None:
        predictions = predict_by_logits(task, model, examples, device, bf16, batch_size, desc, dist=dist)
    return task.metrics(examples, predictions)


def set_labels(config, labels: list[str]) -> None:
    """A classification head's size and label names (id2label is what plain transformers shows)."""
    config.num_labels = len(labels)
    config.id2label = dict(enumerate(labels))
    config.label2id = {label: i for i, label in enumerate(labels)}
