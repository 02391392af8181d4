"""The kinds of example tunelab trains on. Each remembers where it came from, for error messages."""

from dataclasses import dataclass, field


@dataclass
class Sentence:
    """One sentence of a token-classification set. `tags` is None for unlabelled input."""

    words: list[str]
    tags: list[str] | None = None
    doc: int = 0  # document index: neighbouring sentences of the same doc may be fed as context
    source: str = "<memory>"
    line: int | None = None  # first line of the sentence in `source`


@dataclass
class TextExample:
    """One text (or text pair: NLI, paraphrase, matching) of a sequence-classification set. `label` is None for
    unlabelled input; `text_pair` None for single-text data."""

    text: str
    label: str | None = None
    source: str = "<memory>"
    line: int | None = None
    meta: dict = field(default_factory=dict)
    text_pair: str | None = None


@dataclass
class ScoredText:
    """One text (or pair) with a real-valued target (regression: a similarity score, a rating)."""

    text: str
    score: float | None = None
    source: str = "<memory>"
    line: int | None = None
    text_pair: str | None = None


@dataclass
class MultiLabelText:
    """One text (or pair) with any number of labels (an empty list: none applies; None: unlabelled)."""

    text: str
    labels: list[str] | None = None
    source: str = "<memory>"
    line: int | None = None
    text_pair: str | None = None


@dataclass
class QAExample:
    """Extractive question answering: the answer is a span of `context`. `answers`: (character offset, text)
    of each gold answer (several annotators may give several); an empty list: the context has no answer;
    None: unlabelled."""

    question: str
    context: str
    answers: list[tuple[int, str]] | None = None
    id: str = ""
    source: str = "<memory>"
    line: int | None = None


@dataclass
class RelationExample:
    """Relation extraction: which relation holds between two mentions of `text`, each (start, end, type) with
    character offsets [start, end); `label` None for unlabelled input."""

    text: str
    head: tuple[int, int, str]
    tail: tuple[int, int, str]
    label: str | None = None
    source: str = "<memory>"
    line: int | None = None


@dataclass
class GenExample:
    """One prompt of a generation set, with the reference output (None for unlabelled input)."""

    prompt: str
    target: str | None = None
    source: str = "<memory>"
    line: int | None = None


@dataclass
class RawText:
    """One document of raw text for continued pre-training (no labels: the text is its own target)."""

    text: str
    source: str = "<memory>"
    line: int | None = None


def unlabelled(example):
    """A copy of an example without its gold labels, as prediction input (labels a predicting model's label
    list lacks would otherwise be refused by its encoder)."""
    from dataclasses import replace

    field = {Sentence: "tags", TextExample: "label", GenExample: "target", ScoredText: "score",
             MultiLabelText: "labels", QAExample: "answers", RelationExample: "label"}.get(type(example))
    if field is None:  # raw text (pre-training) has no label to take away
        return example
    return replace(example, **{field: None})
