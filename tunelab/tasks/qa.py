"""Extractive question answering: the answer is a span of the context, found by a start and an end logit per
token (transformers' question-answering head, so that a saved folder runs in `pipeline("question-answering")`).

Encoding: question and context as a pair (the question first, as BERT-style QA models read them); a context
longer than the room left is cut into overlapping windows (`doc_stride` tokens of overlap) so that every
answer lies whole inside at least one window. In training, a window that does not hold the (first) gold answer
whole points at the first token ([CLS]): "no answer here", as SQuAD fine-tuning scripts train it.

Decoding: in every window, the `N_BEST` highest start and end logits over context tokens are paired into
valid spans (end not before start, at most `max_answer_length` tokens); the best span over all windows (by
start + end logit) wins and is cut from the original context by character offsets, so the answer text is the
context's own. With `no_answer` (SQuAD v2-style data) the empty answer wins when the lowest [CLS] score over
the windows beats the best span. Scores: exact match and F1 of the official SQuAD v1.1 script (normalised
text, best over the gold answers); main = F1.
"""

import numpy as np

from tunelab.data.examples import QAExample
from tunelab.errors import TunelabError
from tunelab.tasks.common import (all_examples, as_is, evaluate_by_predictions, main_score, model_loss,
                                  no_decision_to_settle, no_labels, no_samples, nothing_to_fill, pad_id, percent,
                                  predict_by_logits, predictions_as_given, refuse_only_labels, same_every_epoch)

N_BEST = 20  # start and end candidates per window (as the SQuAD scripts take them)
MAX_QUESTION = 64  # question tokens kept (longer questions are cut), so that the context keeps its room


class QATask:
    kind = "qa"
    example_type = QAExample
    head = "question-answering"
    new_head = True
    predicts = True  # it makes predictions (tunelab predict, serve)
    token_level = True  # (a start and an end logit per token: prompt tuning's virtual tokens would shift them)
    tag_sequences = False  # (model.crf is for tag sequences: NER)
    outputs = ("jsonl",)
    ranks_labels = False
    main_name = "F1"
    score_name = "F1"
    curve_title = "dev F1 (SQuAD)"
    new_tokens_bound = None
    donor_rank = 2  # (BERT's QA model has no pooler: a sequence classifier's backbone is the one to share)
    decoder_only = False
    labels: list[str] = []
    pairs = True  # a question and its context

    def __init__(self, tokenizer, max_length: int, doc_stride: int = 128, max_answer_length: int = 30,
                 no_answer: bool = False):
        if not getattr(tokenizer, "is_fast", False):
            raise TunelabError("extractive QA needs a fast (Rust) tokenizer: its character offsets place the answer "
                               "spans; this model's tokenizer is a slow one")
        self.tokenizer = tokenizer
        self.labels = []
        self.max_length = max_length
        self.doc_stride = doc_stride
        self.max_answer_length = max_answer_length
        self.no_answer = no_answer
        self.pad = pad_id(tokenizer)
        self.truncated = 0  # questions cut to MAX_QUESTION tokens, in the last encode() call

    def _questions(self, examples: list[QAExample]) -> tuple[list[str], int]:
        """The questions, each cut to its first MAX_QUESTION tokens, and the most tokens one keeps."""
        enc = self.tokenizer([e.question for e in examples], add_special_tokens=False, return_offsets_mapping=True)
        out = []
        for e, ids, offsets in zip(examples, enc["input_ids"], enc["offset_mapping"]):
            if len(ids) > MAX_QUESTION:
                self.truncated += 1
                out.append(e.question[: offsets[MAX_QUESTION - 1][1]])
            else:
                out.append(e.question)
        return out, min(MAX_QUESTION, max(map(len, enc["input_ids"])))

    def encode(self, examples: list[QAExample], training: bool) -> list[dict]:
        """Windows: input_ids (token_type_ids), start/end_positions (0 = [CLS] when the window holds no gold
        answer, or unlabelled), and for decoding the example, each token's character span in the context
        (None outside it)."""
        self.truncated = 0
        questions, longest = self._questions(examples)
        room = self.max_length - longest - 3  # ([CLS] question [SEP] context [SEP])
        if self.doc_stride >= room:
            raise TunelabError(f"model.max_length={self.max_length} leaves {room} context tokens a window beside "
                               f"a question of {longest} tokens; data.doc_stride ({self.doc_stride}) must be smaller "
                               "than that: lower data.doc_stride or raise model.max_length")
        types = "token_type_ids" in self.tokenizer.model_input_names
        enc = self.tokenizer(questions, [e.context for e in examples], truncation="only_second",
                             max_length=self.max_length, stride=self.doc_stride, return_overflowing_tokens=True,
                             return_offsets_mapping=True, return_token_type_ids=types)
        features = []
        for k, ids in enumerate(enc["input_ids"]):
            i = enc["overflow_to_sample_mapping"][k]
            seq = enc.sequence_ids(k)
            offsets = [o if s == 1 else None for o, s in zip(enc["offset_mapping"][k], seq)]
            start = end = 0
            answers = examples[i].answers
            if answers:
                a_start, text = answers[0]
                a_end = a_start + len(text)
                inside = [t for t, o in enumerate(offsets) if o is not None]
                if offsets[inside[0]][0] <= a_start and offsets[inside[-1]][1] >= a_end:
                    start = next(t for t in inside if offsets[t][1] > a_start)
                    end = next(t for t in reversed(inside) if offsets[t][0] < a_end)
            f = {"input_ids": ids, "start_positions": start, "end_positions": end, "example": i,
                 "offsets": offsets}
            if types:
                f["token_type_ids"] = enc["token_type_ids"][k]
            features.append(f)
        return features

    def decode(self, features, logits, n_examples):
        """Per example: (answer text, start character, end character, score); ("", -1, -1, score) for no answer."""
        best = [None] * n_examples
        null = [None] * n_examples
        for feat, lg in zip(features, logits):
            i, offsets = feat["example"], feat["offsets"]
            starts, ends = np.asarray(lg[:, 0], dtype=np.float64), np.asarray(lg[:, 1], dtype=np.float64)
            cls = float(starts[0] + ends[0])
            null[i] = cls if null[i] is None else min(null[i], cls)
            context = [t for t, o in enumerate(offsets) if o is not None]
            if not context:
                continue
            cs = np.asarray(context)
            top_s = cs[np.argsort(-starts[cs], kind="stable")[:N_BEST]]
            top_e = cs[np.argsort(-ends[cs], kind="stable")[:N_BEST]]
            for s in top_s:
                for e in top_e:
                    if e < s or e - s + 1 > self.max_answer_length:
                        continue
                    score = float(starts[s] + ends[e])
                    if best[i] is None or score > best[i][0]:
                        best[i] = (score, offsets[s][0], offsets[e][1])
        out = []
        for i in range(n_examples):
            if best[i] is None or (self.no_answer and null[i] is not None and null[i] > best[i][0]):
                out.append(("", -1, -1, null[i] if null[i] is not None else 0.0))
            else:
                out.append((None, best[i][1], best[i][2], best[i][0]))  # text cut in predict (the context)
        return out

    def predict(self, model, examples, device, bf16=False, batch_size=64, desc=None, max_new_tokens=None,
                dist=None) -> list:
        spans = predict_by_logits(self, model, examples, device, bf16, batch_size, desc, max_new_tokens, dist)
        return [(e.context[a:b], a, b, s) if text is None else (text, a, b, s)
                for e, (text, a, b, s) in zip(examples, spans)]

    def metrics(self, examples, predictions) -> dict:
        from tunelab.metrics import squad_metrics

        return squad_metrics([[t for _, t in e.answers] for e in examples], [p[0] for p in predictions])

    evaluate = evaluate_by_predictions

    objective = staticmethod(model_loss)
    epoch_features = same_every_epoch
    settle = no_decision_to_settle

    # ---- what the task is, outside one tokenizer (see tunelab.tasks.Task) ----

    noun = "an extractive QA"

    @staticmethod
    def reader(path, fmt: str, labelled: bool, f):
        """JSONL, a question a line: {"question", "context", "answers": {"text": [...], "answer_start": [...]}}
        (the Hugging Face SQuAD layout) or "answers": [{"text", "answer_start"}, ...]; "id" optional; an empty
        answer list: no answer in the context. Unlabelled: question and context only."""
        from tunelab.data.readers import jsonl_records

        if fmt != "jsonl":
            raise TunelabError(f"{path}: QA data must be JSONL with 'question', 'context' and 'answers' fields")
        return jsonl_records(path, lambda record: parse_record(record, labelled))

    @staticmethod
    def from_record(r, i: int) -> QAExample:
        """An in-memory record as the JSONL reader takes it (answers optional)."""
        from tunelab.data.readers import RecordError

        if not isinstance(r, dict):
            raise TunelabError(f"record {i}: a QA record is a dict with question, context and answers")
        try:
            example = parse_record(r, "answers" in r)
        except RecordError as e:
            raise TunelabError(f"record {i}: {e}") from None
        example.line = i
        return example

    @staticmethod
    def hf_records(ds, f) -> list[dict]:
        from tunelab.tasks.common import require_columns

        require_columns(ds, ["question", "context", "answers"])
        return [{k: r[k] for k in ("id", "question", "context", "answers") if k in r} for r in ds]

    label_list = gold = staticmethod(no_labels)  # spans, not labels
    check_kept_labels = refuse_only_labels("QA data has answer spans")
    keep_labels = staticmethod(all_examples)

    merge_predictions = staticmethod(nothing_to_fill)
    restrict_predictions = staticmethod(predictions_as_given)

    @staticmethod
    def model_class(config):
        from transformers import AutoModelForQuestionAnswering

        return AutoModelForQuestionAnswering

    @staticmethod
    def peft_type(config):
        import peft

        return peft.TaskType.QUESTION_ANS

    @staticmethod
    def configure(config, labels) -> None:
        """The head is a start and an end logit per token (transformers' QA head has num_labels 2)."""
        config.num_labels = 2

    @staticmethod
    def options(data, model_config) -> dict:
        return {"doc_stride": data.doc_stride, "max_answer_length": data.max_answer_length,
                "no_answer": data.no_answer}

    @classmethod
    def build(cls, tokenizer, labels, max_length, options: dict):
        return cls(tokenizer, max_length, options.get("doc_stride", 128), options.get("max_answer_length", 30),
                   options.get("no_answer", False))

    def meta(self) -> dict:
        return {"task": self.kind, "labels": [], "max_length": self.max_length, "context_sentences": 0,
                "options": {"doc_stride": self.doc_stride, "max_answer_length": self.max_answer_length,
                            "no_answer": self.no_answer}}

    def describe(self) -> dict:
        return {"kind": self.kind, "pairs": True, "no_answer": self.no_answer}

    format_main = staticmethod(percent)
    score = staticmethod(main_score)
    curve_value = staticmethod(as_is)
    samples = no_samples

    @staticmethod
    def text_examples(texts: list) -> tuple[list, None]:
        """Raw inputs: the question as the text, the context as its text_pair."""
        for t in texts:
            if t.text_pair is None:
                where = f"{t.source}:{t.line}" if t.line is not None else t.source
                raise TunelabError(f"{where}: a QA model needs a question and a context (JSONL 'question' and "
                                   "'context', or texts and text_pairs in a request)")
        return [QAExample(t.text, t.text_pair, None, "", t.source, t.line) for t in texts], None

    @staticmethod
    def records(labels, examples, predictions, offsets=None):
        """One record per question: the answer, its character span in the context, the span's score."""
        for ex, (text, a, b, score) in zip(examples, predictions):
            yield ({"id": ex.id} if ex.id else {}) | {"question": ex.question, "answer": text, "start": a,
                                                      "end": b, "score": score}


def parse_record(record: dict, labelled: bool) -> QAExample:
    """A QA record as an example; answers must sit in the context at their offsets (RecordError otherwise)."""
    from tunelab.data.readers import RecordError, required_text
    from tunelab.data.readers import Field

    question = required_text(record, Field("question", "question"))
    context = required_text(record, Field("context", "context"))
    qid = record.get("id", "")
    if not isinstance(qid, (str, int)) or isinstance(qid, bool):
        raise RecordError(f"field 'id' must be a string, got {qid!r:.60}")
    if not labelled:
        return QAExample(question, context, None, str(qid))
    raw = record.get("answers")
    if isinstance(raw, dict):
        texts, starts = raw.get("text"), raw.get("answer_start")
        if not isinstance(texts, list) or not isinstance(starts, list) or len(texts) != len(starts):
            raise RecordError("field 'answers' must hold lists 'text' and 'answer_start' of one length")
        raw = [{"text": t, "answer_start": s} for t, s in zip(texts, starts)]
    if not isinstance(raw, list):
        raise RecordError("field 'answers' must be {'text': [...], 'answer_start': [...]} or a list of "
                          f"{{'text', 'answer_start'}} ([] for no answer), got {raw!r:.60}")
    answers = []
    for k, a in enumerate(raw, 1):
        text, start = (a.get("text"), a.get("answer_start")) if isinstance(a, dict) else (None, None)
        if not isinstance(text, str) or not text.strip() or isinstance(start, bool) or not isinstance(start, int):
            raise RecordError(f"answer {k}: needs a non-empty 'text' and an integer 'answer_start', got {a!r:.80}")
        if not 0 <= start <= len(context) - len(text):
            raise RecordError(f"answer {k} ({text!r:.40}): answer_start {start} is out of range for a context of "
                              f"{len(context)} characters")
        if context[start:start + len(text)] != text:
            raise RecordError(f"answer {k} ({text!r:.40}) is not in the context at answer_start {start} (the "
                              f"context reads {context[start:start + len(text)]!r:.40} there); answer_start counts "
                              "characters (code points) from 0")
        answers.append((start, text))
    return QAExample(question, context, answers, str(qid))
