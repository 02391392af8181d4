"""Regression: one real value per text or text pair (similarity scores, ratings), from a one-output head on
the first ([CLS]) token, trained with mean squared error (transformers' problem_type "regression", so that a
saved folder predicts the same value in plain transformers). Targets are used as given (no rescaling): the
head's output is on the data's own scale. Model selection maximises Pearson's r on dev; Spearman's rho, MSE
and MAE are reported beside it.
"""

from tunelab.data.examples import ScoredText
from tunelab.tasks.common import (all_examples, as_is, encode_texts, evaluate_by_predictions, model_loss,
                                  no_decision_to_settle, no_labels, no_samples, nothing_to_fill, pad_id, pair_option,
                                  predict_by_logits, predictions_as_given, refuse_only_labels, same_every_epoch,
                                  sequence_classifier, sequence_classifier_peft)


class RegressTask:
    kind = "regress"
    example_type = ScoredText
    head = "sequence-classification"  # transformers' sequence classifier with one output
    new_head = True
    predicts = True  # it makes predictions (tunelab predict, serve)
    token_level = False
    tag_sequences = False  # (model.crf is for tag sequences: NER)
    outputs = ("jsonl",)
    ranks_labels = False
    main_name = "Pearson r"
    score_name = "Pearson r (negative as 0)"
    curve_title = "dev Pearson r"
    new_tokens_bound = None
    donor_rank = 1
    decoder_only = False
    labels: list[str] = []

    def __init__(self, tokenizer, max_length: int, pairs: bool = False):
        self.tokenizer = tokenizer
        self.labels = []
        self.max_length = max_length
        self.pairs = pairs
        self.truncated = 0
        self.pad = pad_id(tokenizer)

    def encode(self, examples: list[ScoredText], training: bool) -> list[dict]:
        inputs, self.truncated = encode_texts(self.tokenizer, examples, self.max_length, self.pairs)
        # unlabelled: a 0.0 target (a float keeps the batch a regression batch; prediction never uses it)
        return [f | {"labels": float(e.score) if e.score is not None else 0.0, "example": i}
                for i, (f, e) in enumerate(zip(inputs, examples))]

    def decode(self, features, logits, n_examples) -> list[float]:
        out = [None] * n_examples
        for feat, lg in zip(features, logits):
            out[feat["example"]] = float(lg[0])
        return out

    def metrics(self, examples, predictions) -> dict:
        from tunelab.metrics import regression_metrics

        return regression_metrics([e.score for e in examples], predictions)

    predict = predict_by_logits  # per example: the predicted value
    evaluate = evaluate_by_predictions

    # ---- what the task is, outside one tokenizer (see tunelab.tasks.Task) ----

    noun = "a regression"

    @staticmethod
    def reader(path, fmt: str, labelled: bool, f):
        """JSONL or CSV with a text (text pair) and a numeric score field; unlabelled: the text fields only."""
        from tunelab.data.readers import csv_records, jsonl_records
        from tunelab.tasks.common import text_reader

        pair = f.field("text_pair_field") if f.text_pair_field else None
        if not labelled:
            return text_reader(path, fmt, False, f.field("text_field"), None, False, "regression", pair)
        text, label = f.field("text_field"), f.field("label_field")

        def parse(record: dict) -> ScoredText:
            from tunelab.data.readers import RecordError, required_text

            value = record.get(label.name)
            if isinstance(value, str):  # (CSV values are strings)
                try:
                    value = float(value)
                except ValueError:
                    pass
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or \
                    abs(value) == float("inf"):
                raise RecordError(f"field {label.name!r} must be a finite number, got {value!r:.60}" + (
                    "" if label.name in record else f" (fields: {', '.join(record)}); {label.hint}"))
            return ScoredText(required_text(record, text), float(value),
                              text_pair=required_text(record, pair) if pair else None)

        if fmt == "jsonl":
            return jsonl_records(path, parse)
        if fmt == "csv":
            return csv_records(path, [text, label] + ([pair] if pair else []), parse)
        from tunelab.errors import TunelabError

        raise TunelabError(f"{path}: regression data must be JSONL or CSV with {text.name!r} and {label.name!r} "
                           "fields")

    @staticmethod
    def from_record(r, i: int) -> ScoredText:
        """An in-memory record {"text": ..., "score": ...} (with "text_pair" for pairs), or (text, score)."""
        from tunelab.errors import TunelabError
        from tunelab.tasks.common import record_texts

        text, pair = record_texts(r, i)
        score = r.get("score", r.get("label")) if isinstance(r, dict) else r[1]
        if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))):
            raise TunelabError(f"record {i}: score must be a number, got {score!r:.60}")
        return ScoredText(text, None if score is None else float(score), "<memory>", i, text_pair=pair)

    @staticmethod
    def hf_records(ds, f) -> list[dict]:
        from tunelab.tasks.common import require_columns

        require_columns(ds, [f.text_field, f.label_field] + ([f.text_pair_field] if f.text_pair_field else []))
        return [{"text": r[f.text_field], "score": r[f.label_field]}
                | ({"text_pair": r[f.text_pair_field]} if f.text_pair_field else {}) for r in ds]

    label_list = gold = staticmethod(no_labels)  # a value, not labels
    check_kept_labels = refuse_only_labels("regression data has scores")
    keep_labels = staticmethod(all_examples)

    merge_predictions = staticmethod(nothing_to_fill)
    restrict_predictions = staticmethod(predictions_as_given)
    objective = staticmethod(model_loss)
    epoch_features = same_every_epoch
    settle = no_decision_to_settle

    model_class = staticmethod(sequence_classifier)
    peft_type = staticmethod(sequence_classifier_peft)

    @staticmethod
    def configure(config, labels) -> None:
        """One output, mean squared error (transformers picks MSE for problem_type regression)."""
        config.num_labels = 1
        config.problem_type = "regression"
        config.id2label, config.label2id = {0: "score"}, {"score": 0}

    options = staticmethod(pair_option)

    @classmethod
    def build(cls, tokenizer, labels, max_length, options: dict):
        return cls(tokenizer, max_length, options.get("pairs", False))

    def meta(self) -> dict:
        return {"task": self.kind, "labels": [], "max_length": self.max_length, "context_sentences": 0,
                "options": {"pairs": self.pairs}}

    def describe(self) -> dict:
        return {"kind": self.kind, "pairs": self.pairs}

    @staticmethod
    def format_main(m: dict) -> str:
        return f"{m['main']:.4f}"

    @staticmethod
    def score(m: dict) -> float:
        return max(0.0, m["main"])

    curve_value = staticmethod(as_is)
    samples = no_samples

    @staticmethod
    def text_examples(texts: list) -> tuple[list, None]:
        return [ScoredText(t.text, None, t.source, t.line, t.text_pair) for t in texts], None

    @staticmethod
    def records(labels, examples, predictions, offsets=None):
        for ex, value in zip(examples, predictions):
            yield {"text": ex.text} | ({"text_pair": ex.text_pair} if ex.text_pair is not None else {}) | {
                "score": value}
