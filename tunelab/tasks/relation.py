"""Relation extraction: which relation holds between two marked mentions of a text (head -> tail), classified
from the first ([CLS]) token of the text with typed entity markers around the mentions:

    "@ * PER * Obama @ was born in # ^ LOC ^ Hawaii # ."

(the "typed entity marker (punct)" of Zhou & Chen 2022, "An Improved Baseline for Sentence-level Relation
Extraction": punctuation the vocabulary already has, so no new tokens, no resized embeddings, and the saved
folder is a plain sequence classifier: `pipeline("text-classification")` on the marked text gives the same
label). A text too long for model.max_length is cut around the two mentions (context farthest from them goes
first), so that the markers always survive.

Scores: micro-F1 over the relations without the no-relation class (data.no_relation; predicting it is
abstaining, as TACRED and SemEval score), macro-F1, accuracy and per-relation scores.
Raw input to predict and serve marks the mentions inline, SemEval-2010 style: "<e1:PER>Obama</e1> was born in
<e2:LOC>Hawaii</e2>" (the ":TYPE" is optional; e1 is the head).
"""

import re

from tunelab.data.examples import RelationExample, TextExample
from tunelab.errors import TunelabError
from tunelab.tasks.classify import ClassifyTask

HEAD, TAIL = ("@", "*"), ("#", "^")  # (outer, inner) marker characters
UNTYPED = "entity"  # the type of a mention given without one
INLINE = re.compile(r"<(e[12])(?::([^<>]+))?>(.+?)</\1>", re.S)


def mark(example: RelationExample) -> tuple[str, dict]:
    """The text with typed markers around both mentions, and where each mention now sits: {"head": (start,
    end), "tail": (start, end)} in the marked text (the mention's own characters, unchanged)."""
    spans = sorted([("head", example.head, HEAD), ("tail", example.tail, TAIL)], key=lambda s: s[1][0])
    out, at, where = [], 0, {}
    for name, (start, end, etype), (outer, inner) in spans:
        out.append(example.text[at:start])
        opening = f"{outer} {inner} {etype} {inner} "
        pos = sum(map(len, out)) + len(opening)
        out.append(opening + example.text[start:end] + f" {outer}")
        where[name] = (pos, pos + end - start)
        at = end
    out.append(example.text[at:])
    return "".join(out), where


def crop(example: RelationExample, keep: int) -> RelationExample:
    """The example with its text cut to at most `keep` characters of context on each side of the stretch from
    the first mention to the last (offsets moved with it)."""
    lo = min(example.head[0], example.tail[0])
    hi = max(example.head[1], example.tail[1])
    a, b = max(0, lo - keep), min(len(example.text), hi + keep)

    def moved(m):
        return (m[0] - a, m[1] - a, m[2])

    return RelationExample(example.text[a:b], moved(example.head), moved(example.tail), example.label,
                           example.source, example.line)


class RelationTask(ClassifyTask):
    kind = "relation"
    example_type = RelationExample
    main_name = "micro-F1 (no relation excluded)"
    score_name = "micro-F1"
    curve_title = "dev micro-F1 (without no-relation)"
    noun = "a relation-extraction"

    def __init__(self, tokenizer, labels: list[str], max_length: int, no_relation: str = "no_relation"):
        super().__init__(tokenizer, labels, max_length, pairs=False)
        self.no_relation = no_relation

    def marked(self, examples: list[RelationExample]) -> list[TextExample]:
        """The examples as marked texts that fit max_length (cropped around the mentions where needed)."""
        texts = [mark(e)[0] for e in examples]
        lengths = [len(ids) for ids in self.tokenizer(texts)["input_ids"]]  # (one batched call for them all)
        for i, e in enumerate(examples):
            if lengths[i] > self.max_length:  # halve the context around the mentions until it fits
                keep = len(e.text)
                while keep > 0:
                    keep //= 2
                    texts[i] = mark(crop(e, keep))[0]
                    if len(self.tokenizer(texts[i])["input_ids"]) <= self.max_length:
                        break
                self.cropped += 1
        return [TextExample(text, e.label, e.source, e.line) for text, e in zip(texts, examples)]

    def encode(self, examples: list[RelationExample], training: bool) -> list[dict]:
        self.cropped = 0
        features = super().encode(self.marked(examples), training)
        self.truncated = self.cropped  # (texts cut around their mentions; the markers are always kept)
        return features

    def metrics(self, examples, predictions) -> dict:
        from tunelab.metrics import relation_metrics

        none = self.no_relation if self.no_relation in self.labels else None
        return relation_metrics([e.label for e in examples], [p[0] for p in predictions], self.labels, none)

    # ---- what the task is, outside one tokenizer (see tunelab.tasks.Task) ----

    @staticmethod
    def reader(path, fmt: str, labelled: bool, f):
        """JSONL: {"text", "head": {"start", "end", "type"}, "tail": {...}, "label"} with character offsets
        [start, end) ("type" optional); unlabelled without "label", or a text with inline <e1>/<e2> marks."""
        from tunelab.data.readers import RecordError, jsonl_records, required_text
        from tunelab.data.readers import Field

        if fmt == "text" and not labelled:
            from tunelab.data.readers import text_lines

            return text_lines(path)  # (inline marks, parsed by text_examples)
        if fmt != "jsonl":
            raise TunelabError(f"{path}: relation data must be JSONL with 'text', 'head', 'tail' and "
                               f"'{f.label_field}' fields" + ("" if labelled else ", or text lines with <e1>/<e2> marks"))
        label = f.field("label_field")

        def parse(record: dict) -> RelationExample:
            text = required_text(record, Field(f.text_field, "text_field"))
            head, tail = (_mention(record, k, text) for k in ("head", "tail"))
            if head[0] < tail[1] and tail[0] < head[1]:
                raise RecordError(f"the head ({head[0]}-{head[1]}) and tail ({tail[0]}-{tail[1]}) mentions overlap")
            name = None
            if labelled:
                value = record.get(label.name)
                if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
                    raise RecordError(f"field {label.name!r} must be a relation name, got {value!r:.60}" + (
                        "" if label.name in record else f" (fields: {', '.join(record)}); {label.hint}"))
                name = str(value)
            return RelationExample(text, head, tail, name)

        return jsonl_records(path, parse)

    @staticmethod
    def from_record(r, i: int) -> RelationExample:
        """An in-memory record as the JSONL reader takes it, or {"text": "<e1>..</e1> .. <e2>..</e2>", "label"}."""
        from tunelab.data.readers import RecordError

        if not isinstance(r, dict) or not isinstance(r.get("text"), str):
            raise TunelabError(f"record {i}: a relation record is a dict with text, head, tail and label")
        label = None if r.get("label") is None else str(r["label"])
        if "head" not in r and "tail" not in r:
            example = inline(r["text"], f"record {i}")
            example.label = label
            return example
        try:
            head, tail = (_mention(r, k, r["text"]) for k in ("head", "tail"))
        except RecordError as e:
            raise TunelabError(f"record {i}: {e}") from None
        return RelationExample(r["text"], head, tail, label, "<memory>", i)

    @staticmethod
    def hf_records(ds, f) -> list[dict]:
        from tunelab.tasks.common import require_columns

        require_columns(ds, [f.text_field, "head", "tail", f.label_field])
        names = getattr(ds.features[f.label_field], "names", None)
        return [{"text": r[f.text_field], "head": r["head"], "tail": r["tail"],
                 "label": names[r[f.label_field]] if names else r[f.label_field]} for r in ds]

    @staticmethod
    def options(data, model_config) -> dict:
        return {"no_relation": data.no_relation}

    @classmethod
    def build(cls, tokenizer, labels, max_length, options: dict):
        return cls(tokenizer, labels, max_length, options.get("no_relation", "no_relation"))

    def meta(self) -> dict:
        return {"task": self.kind, "labels": self.labels, "max_length": self.max_length, "context_sentences": 0,
                "options": {"no_relation": self.no_relation}}

    def describe(self) -> dict:
        return {"kind": self.kind, "labels": self.labels, "no_relation": self.no_relation,
                "input": "text with <e1:TYPE>head</e1> and <e2:TYPE>tail</e2> marks"}

    @staticmethod
    def text_examples(texts: list) -> tuple[list, None]:
        """Raw texts with inline marks (<e1:TYPE>head</e1>, <e2:TYPE>tail</e2>) as examples."""
        return [inline(t.text, f"{t.source}:{t.line}" if t.line is not None else t.source, t.source, t.line)
                for t in texts], None

    @staticmethod
    def records(labels, examples, predictions, offsets=None):
        """One record per example: the text, both mentions, the relation, its probability and every label's."""
        for ex, (label, probs) in zip(examples, predictions):
            yield {"text": ex.text,
                   "head": {"start": ex.head[0], "end": ex.head[1], "type": ex.head[2],
                            "text": ex.text[ex.head[0]:ex.head[1]]},
                   "tail": {"start": ex.tail[0], "end": ex.tail[1], "type": ex.tail[2],
                            "text": ex.text[ex.tail[0]:ex.tail[1]]},
                   "label": label, "score": max(probs), "probabilities": dict(zip(labels, probs))}


def _mention(record: dict, key: str, text: str) -> tuple[int, int, str]:
    from tunelab.data.readers import RecordError

    m = record.get(key)
    if not isinstance(m, dict):
        raise RecordError(f"field {key!r} must be {{'start': int, 'end': int, 'type': str}} (character offsets "
                          f"[start, end) in the text), got {m!r:.60}")
    start, end, etype = m.get("start"), m.get("end"), m.get("type", UNTYPED)
    if any(isinstance(v, bool) or not isinstance(v, int) for v in (start, end)):
        raise RecordError(f"field {key!r}: 'start' and 'end' must be integers, got {start!r} and {end!r}")
    if not 0 <= start < end <= len(text):
        raise RecordError(f"field {key!r}: offsets {start}-{end} are out of range for a text of {len(text)} "
                          "characters (0 <= start < end <= length)")
    if not text[start:end].strip():
        raise RecordError(f"field {key!r}: the mention {start}-{end} is only white space")
    if not isinstance(etype, str) or not etype.strip() or any(c in etype for c in "@#*^<>"):
        raise RecordError(f"field {key!r}: 'type' must be a non-empty name without @ # * ^ < >, got {etype!r:.40}")
    return start, end, etype.strip()


def inline(marked: str, where: str, source: str = "<memory>", line=None) -> RelationExample:
    """A text with <e1[:TYPE]>..</e1> and <e2[:TYPE]>..</e2> marks as an example (the marks removed)."""
    found = {m.group(1): m for m in INLINE.finditer(marked)}
    if set(found) != {"e1", "e2"} or len(INLINE.findall(marked)) != 2:
        raise TunelabError(f"{where}: mark the two mentions once each, as <e1:TYPE>head</e1> and "
                           "<e2:TYPE>tail</e2> (the :TYPE is optional)")
    text, at, spans = [], 0, {}
    for m in sorted(found.values(), key=lambda m: m.start()):
        text.append(marked[at:m.start()])
        start = sum(map(len, text))
        text.append(m.group(3))
        spans[m.group(1)] = (start, start + len(m.group(3)), (m.group(2) or UNTYPED).strip())
        at = m.end()
    text.append(marked[at:])
    return RelationExample("".join(text), spans["e1"], spans["e2"], None, source, line)
