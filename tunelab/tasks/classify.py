"""Sequence classification: one label per text, or per text pair (NLI, paraphrase, matching:
data.text_pair_field), read from the head on the first ([CLS]) token.

Texts longer than model.max_length keep their beginning (title and lead, where topic and sentiment are
usually plain); pairs are cut as the tokenizer cuts pairs (the longer text first). How many were cut is
reported, never hidden.
"""

import numpy as np

from tunelab.data.examples import TextExample
from tunelab.tasks.common import (as_is, encode_texts, evaluate_by_predictions, main_score, model_loss,
                                  no_decision_to_settle, no_samples, nothing_to_fill, pad_id, pair_option, percent,
                                  predict_by_logits, predictions_as_given, same_every_epoch, sequence_classifier,
                                  sequence_classifier_peft, set_labels)


class ClassifyTask:
    kind = "classify"
    example_type = TextExample
    head = "sequence-classification"
    new_head = True
    predicts = True  # it makes predictions (tunelab predict, serve)
    token_level = False
    tag_sequences = False  # (model.crf is for tag sequences: NER)
    outputs = ("jsonl",)
    ranks_labels = True  # a probability per label: requests may ask for the top k
    main_name = "macro-F1"
    score_name = "macro-F1"
    curve_title = "dev macro-F1"
    new_tokens_bound = None
    donor_rank = 1  # which task model lends the shared backbone in multi-task runs (lowest first)
    decoder_only = False

    def __init__(self, tokenizer, labels: list[str], max_length: int, pairs: bool = False):
        self.tokenizer = tokenizer
        self.labels = labels
        self.label2id = {label: i for i, label in enumerate(labels)}
        self.max_length = max_length
        self.pairs = pairs  # each input is a text pair
        self.truncated = 0  # of the last encode() call
        self.pad = pad_id(tokenizer)

    def encode(self, examples: list[TextExample], training: bool) -> list[dict]:
        inputs, self.truncated = encode_texts(self.tokenizer, examples, self.max_length, self.pairs)
        return [f | {"labels": self.label2id[e.label] if e.label is not None else -100, "example": i}
                for i, (f, e) in enumerate(zip(inputs, examples))]

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

    predict = predict_by_logits  # per example: (label, probabilities)
    evaluate = evaluate_by_predictions

    # ---- what the task is, outside one tokenizer (see tunelab.tasks.Task) ----

    noun = "a classification"

    @staticmethod
    def reader(path, fmt: str, labelled: bool, f):
        """JSONL or CSV with a text (and label) field -> TextExample; unlabelled also text lines. JSONL labels
        are all names or all integers (a file mixing them is refused at the first label written the other way)."""
        from tunelab.data.readers import jsonl_texts
        from tunelab.tasks.common import text_reader

        pair = f.field("text_pair_field") if f.text_pair_field else None
        if fmt == "jsonl" and labelled:
            return jsonl_texts(path, f.field("text_field"), f.field("label_field"), one_label_kind=True, pair=pair)
        return text_reader(path, fmt, labelled, f.field("text_field"), f.field("label_field") if labelled else None,
                           False, "classification", pair)

    @staticmethod
    def from_record(r, i: int) -> TextExample:
        """An in-memory record {"text": ..., "label": ...} (with "text_pair" for pairs), or a (text, label)
        tuple."""
        from tunelab.tasks.common import record_texts

        text, pair = record_texts(r, i)
        label = r.get("label") if isinstance(r, dict) else r[1]
        return TextExample(text, None if label is None else str(label), "<memory>", i, text_pair=pair)

    @staticmethod
    def hf_records(ds, f) -> list[dict]:
        """A `datasets.Dataset`'s rows as records; an integer ClassLabel column becomes label names."""
        from tunelab.tasks.common import require_columns

        require_columns(ds, [f.text_field, f.label_field] + ([f.text_pair_field] if f.text_pair_field else []))
        names = getattr(ds.features[f.label_field], "names", None)
        return [{"text": r[f.text_field], "label": names[r[f.label_field]] if names else r[f.label_field]}
                | ({"text_pair": r[f.text_pair_field]} if f.text_pair_field else {}) for r in ds]

    @staticmethod
    def label_list(train: list) -> list[str]:
        from tunelab.errors import TunelabError

        labels = sorted({e.label for e in train})
        if len(labels) < 2:
            raise TunelabError(f"training data has {len(labels)} distinct label(s); classification needs at least 2")
        return labels

    @staticmethod
    def gold(example) -> list:
        return [example.label]

    @staticmethod
    def check_kept_labels(train: list, keep: list[str]) -> None:
        from tunelab.tasks.common import check_known

        check_known(keep, sorted({e.label for e in train}), "labels")

    @staticmethod
    def keep_labels(examples: list, keep: list[str]) -> list:
        """Only the examples of the `keep` classes (a class-incremental experience's data)."""
        keep = set(keep)
        return [e for e in examples if e.label in keep]

    merge_predictions = staticmethod(nothing_to_fill)
    objective = staticmethod(model_loss)
    epoch_features = same_every_epoch
    restrict_predictions = staticmethod(predictions_as_given)
    settle = no_decision_to_settle

    model_class = staticmethod(sequence_classifier)
    peft_type = staticmethod(sequence_classifier_peft)

    configure = staticmethod(set_labels)

    options = staticmethod(pair_option)

    @classmethod
    def build(cls, tokenizer, labels, max_length, options: dict):
        return cls(tokenizer, labels, max_length, options.get("pairs", False))

    def meta(self) -> dict:
        return {"task": self.kind, "labels": self.labels, "max_length": self.max_length, "context_sentences": 0,
                "options": {"pairs": self.pairs}}

    def describe(self) -> dict:
        return {"kind": self.kind, "labels": self.labels, "pairs": self.pairs}

    format_main = staticmethod(percent)
    score = staticmethod(main_score)
    curve_value = staticmethod(as_is)
    samples = no_samples

    @staticmethod
    def text_examples(texts: list) -> tuple[list, None]:
        return list(texts), None

    @staticmethod
    def records(labels, examples, predictions, offsets=None):
        """One record per example: text (and text_pair), label, score and probabilities by label name."""
        for ex, (label, probs) in zip(examples, predictions):
            yield {"text": ex.text} | ({"text_pair": ex.text_pair} if ex.text_pair is not None else {}) | {
                "label": label, "score": max(probs), "probabilities": dict(zip(labels, probs))}
