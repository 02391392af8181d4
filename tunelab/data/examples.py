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
    """One text of a sequence-classification set. `label` is None for unlabelled input."""

    text: str
    label: str | None = None
    source: str = "<memory>"
    line: int | None = None
    meta: dict = field(default_factory=dict)


@dataclass
class GenExample:
    """One prompt of a generation set, with the reference output (None for unlabelled input)."""

    prompt: str
    target: str | None = None
    source: str = "<memory>"
    line: int | None = None


def unlabelled(example):
    """A copy of an example without its gold labels, as prediction input (labels a predicting model's label
    list lacks would otherwise be refused by its encoder)."""
    from dataclasses import replace

    field = {Sentence: "tags", TextExample: "label", GenExample: "target"}[type(example)]
    return replace(example, **{field: None})
