"""Text-classification files read at once: JSONL (one object a line) or CSV/TSV with a header, plus plain text
(one text a line, unlabelled, for prediction) and NER JSONL (tokens/tags lists). Thin entry points over the
lazy readers of `tunelab.data.readers`: the first bad line is a TunelabError naming file:line."""

from tunelab.data.examples import Sentence, TextExample
from tunelab.data.readers import Field, collect, csv_texts, jsonl_sentences, jsonl_texts, text_lines


def _fields(text_field, label_field, labelled) -> tuple[Field, Field | None]:
    return Field(text_field, "text_field"), Field(label_field, "label_field") if labelled else None


def read_jsonl(path, text_field="text", label_field="label", labelled=True, free_text=False) -> list[TextExample]:
    """{text_field: str, label_field: str|int} a line. `free_text`: the label field holds text (a generation
    target), not a label name."""
    return collect(jsonl_texts(path, *_fields(text_field, label_field, labelled), free_text), path)


def read_csv(path, text_field="text", label_field="label", labelled=True, free_text=False) -> list[TextExample]:
    """A header, then a row an example (tab-separated for .tsv); `line` is the line where the row starts."""
    return collect(csv_texts(path, *_fields(text_field, label_field, labelled), free_text), path)


def read_lines(path) -> list[TextExample]:
    """Plain text, one input a line (blank lines skipped): unlabelled, for prediction."""
    return collect(text_lines(path), path, "text")


def read_jsonl_sentences(path, words_field="tokens", tags_field="tags", labelled=True, scheme="iob2") -> list[Sentence]:
    """Token-classification JSONL: {"tokens": [...], "tags": [...]} a line, tags in `scheme`."""
    tags = Field(tags_field, "tags_field") if labelled else None
    return collect(jsonl_sentences(path, Field(words_field, "tokens_field"), tags, scheme), path)
