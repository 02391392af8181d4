"""Opening a task's input files: the format (from the extension or named), the field names the readers
take, and `open_reader`, through which `read_file` (eager) and `stream_inputs` (lazy) both go, so that they
accept the same files. Which formats a task type reads, with which reader of `tunelab.data.readers`, is the
task type's own knowledge (its `reader`, in tunelab.tasks).
"""

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tunelab.data.readers import Field
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
    text_pair_field: str | None = None  # text pairs (classification, regression, multi-label): the second text

    @classmethod
    def of(cls, data) -> "Fields":
        """The field names a DataConfig (or anything with these attributes) sets."""
        from dataclasses import fields

        return cls(**{f.name: getattr(data, f.name) for f in fields(cls)})

    def field(self, setting: str) -> Field:
        return Field(getattr(self, setting), setting)


def file_format(path, fmt: str | None) -> str:
    """`fmt`, else the format the extension says (.txt is CoNLL here; prediction reads it as text lines)."""
    if fmt:
        return fmt
    if Path(path).is_dir():  # a folder of documents (raw text for pre-training)
        return "text"
    suffix = Path(path).suffix.lower()
    for name, suffixes in {"conll": (".conll", ".txt", ".iob", ".bio", ".tsv_ner"), "jsonl": (".jsonl", ".json"),
                           "csv": (".csv", ".tsv")}.items():
        if suffix in suffixes:
            return name
    raise TunelabError(f"{path}: cannot tell the format from the extension {suffix!r}; set data.format "
                       "(conll, jsonl or csv)")


def check_format(path, fmt: str) -> None:
    if fmt not in FORMATS:
        raise TunelabError(f"{path}: unknown input format {fmt!r}; choose one of {', '.join(FORMATS)}")


def open_reader(path, kind: str, fmt: str, labelled: bool, fields: Fields) -> Iterator:
    """The lazy reader of `path` for a task of kind `kind` (examples and BadLines). A format the kind cannot
    read, or a missing file, raises TunelabError at once; the file is opened when iteration starts."""
    from tunelab.tasks import REGISTRY

    if kind not in REGISTRY:
        raise ValueError(f"unknown task kind {kind!r}")
    check_format(path, fmt)
    reader = REGISTRY[kind].reader(path, fmt, labelled, fields)
    if not Path(path).exists():  # (a folder: the readers of files refuse it; pre-training reads its documents)
        raise TunelabError(f"{path}: no such file")
    return reader
