"""Multi-label classification: any number of labels per text or text pair (topics, tags, intents that
co-occur), an independent sigmoid per label on the first ([CLS]) token, trained with binary cross-entropy
(transformers' problem_type "multi_label_classification", so that plain transformers trains and loads it the
same way).

A label is predicted when its probability reaches the task's threshold. Training evaluates at 0.5; each dev
evaluation also finds the threshold with the best micro-F1, and after model selection the selected
evaluation's threshold becomes the model's (`settle`): the test split is scored with it, and the saved folder
keeps it (tunelab.json), so that predict, eval and serve decide the same way. Model selection maximises
micro-F1 at the threshold in force; macro-F1, subset accuracy and a per-label report are beside it.
"""

import numpy as np

from tunelab.data.examples import MultiLabelText
from tunelab.tasks.common import (as_is, encode_texts, evaluate_by_predictions, main_score, model_loss, no_samples,
                                  pad_id, pair_option, percent, predict_by_logits, same_every_epoch,
                                  sequence_classifier, sequence_classifier_peft, set_labels)


class MultiLabelTask:
    kind = "multilabel"
    example_type = MultiLabelText
    head = "sequence-classification"
    new_head = True
    predicts = True  # it makes predictions (tunelab predict, serve)
    token_level = False
    tag_sequences = False  # (model.crf is for tag sequences: NER)
    outputs = ("jsonl",)
    ranks_labels = True
    main_name = "micro-F1"
    score_name = "micro-F1"
    curve_title = "dev micro-F1 (threshold 0.5 until settled)"
    new_tokens_bound = None
    donor_rank = 1
    decoder_only = False

    def __init__(self, tokenizer, labels: list[str], max_length: int, pairs: bool = False, threshold: float = 0.5):
        self.tokenizer = tokenizer
        self.labels = labels
        self.label2id = {label: i for i, label in enumerate(labels)}
        self.max_length = max_length
        self.pairs = pairs
        self.threshold = threshold
        self.truncated = 0
        self.pad = pad_id(tokenizer)

    def encode(self, examples: list[MultiLabelText], training: bool) -> list[dict]:
        inputs, self.truncated = encode_texts(self.tokenizer, examples, self.max_length, self.pairs)
        out = []
        for i, (f, e) in enumerate(zip(inputs, examples)):
            hot = [0.0] * len(self.labels)
            for label in e.labels or ():
                hot[self.label2id[label]] = 1.0
            out.append(f | {"labels": tuple(hot), "example": i})  # a tuple: one vector per text (collate)
        return out

    def decode(self, features, logits, n_examples):
        """Per example: (the labels at or over the threshold, the probability of every label)."""
        out = [None] * n_examples
        for feat, lg in zip(features, logits):
            p = 1 / (1 + np.exp(-np.asarray(lg, dtype=np.float64)))
            out[feat["example"]] = ([lab for lab, q in zip(self.labels, p) if q >= self.threshold], p.tolist())
        return out

    def metrics(self, examples, predictions) -> dict:
        from tunelab.metrics import multilabel_metrics

        return multilabel_metrics([e.labels for e in examples], [p[1] for p in predictions], self.labels,
                                  self.threshold)

    predict = predict_by_logits
    evaluate = evaluate_by_predictions

    objective = staticmethod(model_loss)
    epoch_features = same_every_epoch
    def settle(self, dev_metrics: dict) -> None:
        """Take the threshold the selected dev evaluation found best."""
        self.threshold = dev_metrics["best_threshold"]

    # ---- what the task is, outside one tokenizer (see tunelab.tasks.Task) ----

    noun = "a multi-label"

    @staticmethod
    def reader(path, fmt: str, labelled: bool, f):
        """JSONL with a text (text pair) and a list of labels (names or integers; [] for none); unlabelled
        input as classification reads it."""
        from tunelab.data.readers import jsonl_records
        from tunelab.errors import TunelabError
        from tunelab.tasks.common import text_reader

        pair = f.field("text_pair_field") if f.text_pair_field else None
        if not labelled:
            return text_reader(path, fmt, False, f.field("text_field"), None, False, "multi-label", pair)
        if fmt != "jsonl":
            raise TunelabError(f"{path}: multi-label data must be JSONL, a list of labels in the "
                               f"{f.label_field!r} field of each record")
        text, label = f.field("text_field"), f.field("label_field")

        def parse(record: dict) -> MultiLabelText:
            from tunelab.data.readers import RecordError, required_text

            value = record.get(label.name)
            if not isinstance(value, list) or not all(isinstance(v, (str, int)) and not isinstance(v, bool)
                                                      and str(v).strip() for v in value):
                raise RecordError(f"field {label.name!r} must be a list of label names or integers ([] for none), "
                                  f"got {value!r:.60}" + ("" if label.name in record else
                                                          f" (fields: {', '.join(record)}); {label.hint}"))
            names = [str(v) for v in value]
            if len(set(names)) < len(names):
                raise RecordError(f"field {label.name!r} repeats a label: {names}")
            return MultiLabelText(required_text(record, text), names,
                                  text_pair=required_text(record, pair) if pair else None)

        return jsonl_records(path, parse)

    @staticmethod
    def from_record(r, i: int) -> MultiLabelText:
        """An in-memory record {"text": ..., "labels": [...]} (with "text_pair" for pairs), or (text, labels)."""
        from tunelab.errors import TunelabError
        from tunelab.tasks.common import record_texts

        text, pair = record_texts(r, i)
        labels = r.get("labels", r.get("label")) if isinstance(r, dict) else r[1]
        if labels is not None and not isinstance(labels, (list, tuple)):
            raise TunelabError(f"record {i}: labels must be a list of label names, got {labels!r:.60}")
        return MultiLabelText(text, None if labels is None else [str(x) for x in labels], "<memory>", i,
                              text_pair=pair)

    @staticmethod
    def hf_records(ds, f) -> list[dict]:
        from tunelab.tasks.common import require_columns

        require_columns(ds, [f.text_field, f.label_field] + ([f.text_pair_field] if f.text_pair_field else []))
        feature = ds.features[f.label_field]
        names = getattr(getattr(feature, "feature", None), "names", None)  # Sequence(ClassLabel)
        return [{"text": r[f.text_field], "labels": [names[x] if names else x for x in r[f.label_field]]}
                | ({"text_pair": r[f.text_pair_field]} if f.text_pair_field else {}) for r in ds]

    @staticmethod
    def label_list(train: list) -> list[str]:
        from tunelab.errors import TunelabError

        labels = sorted({label for e in train for label in e.labels})
        if not labels:
            raise TunelabError("training data has no labels at all; multi-label classification needs at least one")
        return labels

    @staticmethod
    def gold(example) -> list:
        return list(example.labels or [])

    @staticmethod
    def check_kept_labels(train: list, keep: list[str]) -> None:
        from tunelab.tasks.common import check_known

        check_known(keep, sorted({label for e in train for label in e.labels}), "labels")

    @staticmethod
    def keep_labels(examples: list, keep: list[str]) -> list:
        """Every example, with the labels of `keep` only (the others were never annotated)."""
        from dataclasses import replace

        keep = set(keep)
        return [replace(e, labels=[x for x in e.labels if x in keep]) if e.labels is not None else e
                for e in examples]

    @staticmethod
    def merge_predictions(examples: list, predictions: list) -> list:
        """Pseudo-labels: an example keeps its labels and takes the other model's predicted ones too."""
        from dataclasses import replace

        return [replace(e, labels=sorted(set(e.labels) | set(p[0]))) for e, p in zip(examples, predictions)]

    @staticmethod
    def restrict_predictions(predictions: list, labels: list[str]) -> list:
        known = set(labels)
        return [([x for x in got if x in known], probs) for got, probs in predictions]

    model_class = staticmethod(sequence_classifier)
    peft_type = staticmethod(sequence_classifier_peft)

    @staticmethod
    def configure(config, labels) -> None:
        set_labels(config, labels)
        config.problem_type = "multi_label_classification"  # sigmoid + BCE in transformers too

    options = staticmethod(pair_option)

    @classmethod
    def build(cls, tokenizer, labels, max_length, options: dict):
        return cls(tokenizer, labels, max_length, options.get("pairs", False), options.get("threshold", 0.5))

    def meta(self) -> dict:
        return {"task": self.kind, "labels": self.labels, "max_length": self.max_length, "context_sentences": 0,
                "options": {"pairs": self.pairs, "threshold": self.threshold}}

    def describe(self) -> dict:
        return {"kind": self.kind, "labels": self.labels, "pairs": self.pairs, "threshold": self.threshold}

    format_main = staticmethod(percent)
    score = staticmethod(main_score)
    curve_value = staticmethod(as_is)
    samples = no_samples

    @staticmethod
    def text_examples(texts: list) -> tuple[list, None]:
        return [MultiLabelText(t.text, None, t.source, t.line, t.text_pair) for t in texts], None

    @staticmethod
    def records(labels, examples, predictions, offsets=None):
        """One record per example: text (text_pair), the predicted labels, every label's probability."""
        for ex, (got, probs) in zip(examples, predictions):
            yield {"text": ex.text} | ({"text_pair": ex.text_pair} if ex.text_pair is not None else {}) | {
                "labels": got, "probabilities": dict(zip(labels, probs))}
