"""Prediction input read lazily, one line (or one CoNLL sentence) at a time, so that `tunelab predict` on a
large file holds only the chunk it is predicting, never the whole file.

The same readers as training (tunelab.data.readers, chosen per task kind by tunelab.data.kinds), iterated
instead of collected: a line that cannot become an example (not UTF-8, not JSON, a missing or empty field, a
row with extra values) is yielded as a `BadLine` naming the file and line, so that the caller decides
whether to skip it or fail. Problems with the file as a whole (missing, a CSV header without the column, a
format the task cannot read) raise TunelabError.

Yields, per format (unlabelled):
    text   one input a line (blank lines skipped)            -> TextExample (raw text)
    jsonl  an object a line: text_field / prompt_field       -> TextExample (raw text)
           or, for NER, tokens_field (a list of words)       -> Sentence
    csv    a header, then a row a record (text / prompt)     -> TextExample (raw text)
    conll  NER only: words in the first column               -> Sentence (documents kept apart)
Raw texts become a task's examples with `tunelab.predict.text_examples`.
"""

from collections.abc import Iterator
from pathlib import Path

from tunelab.data.examples import Sentence, TextExample
from tunelab.data.kinds import FORMATS, Fields, file_format, open_reader
from tunelab.data.readers import BadLine
from tunelab.errors import TunelabError

__all__ = ["FORMATS", "BadLine", "input_format", "stream_inputs", "texts_of"]


def input_format(path, fmt: str | None) -> str:
    """The format of a prediction input: `fmt`, else from the extension (.txt is text lines, also for NER;
    .conll and friends are CoNLL columns)."""
    if fmt:
        return fmt
    suffix = Path(path).suffix.lower()
    if suffix == ".txt":
        return "text"
    try:
        return file_format(path, None)
    except TunelabError:
        raise TunelabError(f"{path}: cannot tell the format from the extension {suffix!r}; name the file .txt, "
                           ".jsonl, .csv or .conll, or pass --format") from None


def stream_inputs(path, kind: str, fmt: str, *, text_field="text", tokens_field="tokens",
                  prompt_field="prompt") -> Iterator[TextExample | Sentence | BadLine]:
    """The inputs of `path` for a task of kind `kind` (ner, classify, generate), read lazily."""
    fields = Fields(text_field=text_field, tokens_field=tokens_field, prompt_field=prompt_field)
    return open_reader(path, kind, fmt, False, fields)


def texts_of(path, fmt: str) -> Iterator[TextExample | Sentence | BadLine]:
    """The inputs of `path` whatever task reads them (e.g. sample inputs for a parity check): CoNLL columns as
    sentences, text lines, or the 'text' field of JSONL / CSV records."""
    from tunelab.data.readers import Field, conll_sentences, csv_texts, jsonl_texts, text_lines

    if not Path(path).is_file():
        raise TunelabError(f"{path}: no such file")
    if fmt not in FORMATS:
        raise TunelabError(f"{path}: unknown input format {fmt!r}; choose one of {', '.join(FORMATS)}")
    text = Field("text", "text_field")
    return {"conll": lambda: conll_sentences(path, None), "text": lambda: text_lines(path),
            "jsonl": lambda: jsonl_texts(path, text), "csv": lambda: csv_texts(path, text)}[fmt]()
