"""Which files a task kind reads, and how: the one place that maps (kind, format) to a reader and its fields.

One small function per kind says which formats it accepts (with labels for training and evaluation, or
without for prediction) and which reader of `tunelab.data.readers` it uses with which fields. `read_file`
(eager) and `stream_inputs` (lazy) both go through `open_reader`, so that they accept the same files.
"""

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tunelab.data.readers import Field, conll_sentences, csv_texts, jsonl_sentences, jsonl_texts, text_lines
from tunelab.errors import TunelabError

FORMATS = ("text", "jsonl", "csv", "conll")
NOUNS = {"conll": "sentences", "text": "text"}  # what "no ... found (empty file?)" names; others: examples


@dataclass(frozen=True)
class Fields:
    """The names of the fields (columns) the readers take, as in DataConfig and the CLI's --*-field options."""

    text_field: str = "text"
    label_field: str = "label"
    tokens_field: str = "tokens"
    tags_field: str = "tags"
    tag_column: int = -1
    tag_scheme: str = "iob2"
    prompt_field: str = "prompt"
    target_field: str = "target"

    def field(self, setting: str) -> Field:
        return Field(getattr(self, setting), setting)


def file_format(path, fmt: str | None) -> str:
    """`fmt`, else the format the extension says (.txt is CoNLL here; prediction reads it as text lines)."""
    if fmt:
        return fmt
    suffix = Path(path).suffix.lower()
    for name, suffixes in {"conll": (".conll", ".txt", ".iob", ".bio", ".tsv_ner"), "jsonl": (".jsonl", ".json"),
                           "csv": (".csv", ".tsv")}.items():
        if suffix in suffixes:
            return name
    raise TunelabError(f"{path}: cannot tell the format from the extension {suffix!r}; set data.format "
                       "(conll, jsonl or csv)")


def ner(path, fmt: str, labelled: bool, f: Fields) -> Iterator:
    """CoNLL columns or JSONL token lists -> Sentence; unlabelled also text lines -> raw TextExample (split into
    words by `tunelab.predict.text_examples`)."""
    if fmt == "conll":
        return conll_sentences(path, f.tag_column if labelled else None, f.tag_scheme)
    if fmt == "jsonl":
        return jsonl_sentences(path, f.field("tokens_field"), f.field("tags_field") if labelled else None,
                               f.tag_scheme)
    if fmt == "text" and not labelled:
        return text_lines(path)
    if labelled:
        raise TunelabError(f"{path}: NER data must be CoNLL columns or JSONL with {f.tokens_field!r}/"
                           f"{f.tags_field!r}")
    raise TunelabError(f"{path}: NER input must be text lines, CoNLL columns or JSONL with {f.tokens_field!r}")


def classify(path, fmt: str, labelled: bool, f: Fields) -> Iterator:
    """JSONL or CSV with a text (and label) field -> TextExample; unlabelled also text lines."""
    text, label = f.field("text_field"), f.field("label_field") if labelled else None
    return _texts(path, fmt, labelled, text, label, False, "classification")


def generate(path, fmt: str, labelled: bool, f: Fields) -> Iterator:
    """JSONL or CSV with a prompt (and target) field -> TextExample(prompt, target), which read_file makes a
    GenExample; unlabelled also text lines, a prompt a line."""
    prompt, target = f.field("prompt_field"), f.field("target_field") if labelled else None
    return _texts(path, fmt, labelled, prompt, target, True, "generation")


def _texts(path, fmt, labelled, text: Field, label: Field | None, free_text: bool, what: str) -> Iterator:
    if fmt == "jsonl":
        return jsonl_texts(path, text, label, free_text)
    if fmt == "csv":
        return csv_texts(path, text, label, free_text)
    if fmt == "text" and not labelled:
        return text_lines(path)
    if labelled:
        raise TunelabError(f"{path}: {what} data must be JSONL or CSV with {text.name!r} and {label.name!r} fields")
    raise TunelabError(f"{path}: {what} input must be text lines, JSONL or CSV with a {text.name!r} field"
                       + ("; CoNLL columns are NER input" if fmt == "conll" else ""))


KINDS = {"ner": ner, "classify": classify, "generate": generate}


def open_reader(path, kind: str, fmt: str, labelled: bool, fields: Fields) -> Iterator:
    """The lazy reader of `path` for a task of kind `kind` (examples and BadLines). A format the kind cannot
    read, or a missing file, raises TunelabError at once; the file is opened when iteration starts."""
    if kind not in KINDS:
        raise ValueError(f"unknown task kind {kind!r}")
    if fmt not in FORMATS:
        raise TunelabError(f"{path}: unknown input format {fmt!r}; choose one of {', '.join(FORMATS)}")
    reader = KINDS[kind](path, fmt, labelled, fields)
    if not Path(path).is_file():
        raise TunelabError(f"{path}: no such file")
    return reader
