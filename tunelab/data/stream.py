"""Prediction input read lazily, one line (or one CoNLL sentence) at a time, so that `tunelab predict` on a
large file holds only the chunk it is predicting, never the whole file.

The same readers as training (tunelab.data.readers, chosen per task kind by tunelab.data.kinds), iterated
instead of collected: a line that cannot become an example (not UTF-8, not JSON, a missing or empty field, a
row with extra values) is yielded as a `BadLine` naming the file and line, so that the caller decides
whether to skip it or fail. Problems with the file as a whole (missing, a CSV header without the column, a
format the task cannot read) raise TunelabError.

Yields, per format (unlabelled):
    text   one input a line (blank lines skipped)            -> TextExample (raw text); a .txt file that
           looks like CoNLL columns is refused unless the format is named (input_format)
    jsonl  an object a line: text_field / prompt_field       -> TextExample (raw text)
           or, for NER, tokens_field (a list of words)       -> Sentence
           (a record without it: raw text in text_field      -> TextExample; one way per file)
    csv    a header, then a row a record (text / prompt)     -> TextExample (raw text)
    conll  NER only: words in the first column               -> Sentence (documents kept apart)
Raw texts become a task's examples with `tunelab.predict.text_examples`.
"""

import re
from collections.abc import Iterator
from pathlib import Path

from tunelab.data.examples import Sentence, TextExample
from tunelab.data.kinds import FORMATS, Fields, check_format, file_format, open_reader
from tunelab.data.readers import BadLine
from tunelab.errors import TunelabError, where

__all__ = ["FORMATS", "BadLine", "input_format", "stream_inputs", "texts_of"]


def input_format(path, fmt: str | None, fix: str = "pass --format conll to read it as CoNLL columns, or --format "
                 "text to read each line as a text") -> str:
    """The format of a prediction input: `fmt`, else from the extension (.txt is text lines, also for NER;
    .conll and friends are CoNLL columns). A .txt file whose first lines look like CoNLL columns is ambiguous
    (train and eval read .txt as CoNLL columns): refused, with `fix` saying how to choose."""
    if fmt:
        return fmt
    suffix = Path(path).suffix.lower()
    if suffix == ".txt":
        columns = _looks_like_columns(path)
        if columns:
            n, line = columns
            raise TunelabError(f"{where(path, n)}: {line!r} looks like CoNLL columns (word ... tag), but a .txt "
                               "input to predict on is read as one text a line (train and eval read it as CoNLL "
                               f"columns); {fix}")
        return "text"
    try:
        return file_format(path, None)
    except TunelabError:
        raise TunelabError(f"{path}: cannot tell the format from the extension {suffix!r}; name the file .txt, "
                           ".jsonl, .csv or .conll, or pass --format") from None


# A tag as CoNLL files write one: O, or a one-letter prefix and a type (B-PER, I-LOC, S-ORG, E-MISC).
_TAG = re.compile(r"O|[BIESLUM]-\S+")


def _looks_like_columns(path, sample: int = 20) -> tuple[int, str] | None:
    """(line number, line) showing that a file's first non-blank lines (up to `sample`) are CoNLL columns, else
    None: a -DOCSTART- line, or at least two lines that all have the same number (2+) of whitespace-separated
    columns with a tag as the last one. Prose with spaces never has all of that."""
    first, count, ncols = None, 0, None
    if not Path(path).is_file():
        return None  # (the reader says so)
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        for n, line in enumerate(f, 1):
            cols = line.split()
            if not cols:
                continue
            if cols[0] == "-DOCSTART-":
                return n, line.strip()[:80]
            if len(cols) < 2 or ncols not in (None, len(cols)) or not _TAG.fullmatch(cols[-1]):
                return None
            ncols = len(cols)
            first = first or (n, line.strip()[:80])
            count += 1
            if count >= sample or n > 10 * sample:
                break
    return first if count >= 2 else None


def stream_inputs(path, kind: str, fmt: str, *, text_field="text", tokens_field="tokens",
                  prompt_field="prompt", text_pair_field=None) -> Iterator[TextExample | Sentence | BadLine]:
    """The inputs of `path` for a task of kind `kind` (tunelab.tasks.KINDS), read lazily."""
    fields = Fields(text_field=text_field, tokens_field=tokens_field, prompt_field=prompt_field,
                    text_pair_field=text_pair_field)
    return open_reader(path, kind, fmt, False, fields)


def texts_of(path, fmt: str) -> Iterator[TextExample | Sentence | BadLine]:
    """The inputs of `path` whatever task reads them (e.g. sample inputs for a parity check): CoNLL columns as
    sentences, text lines, or the 'text' field of JSONL / CSV records."""
    from tunelab.data.readers import Field, conll_sentences, csv_texts, jsonl_texts, text_lines

    if not Path(path).is_file():
        raise TunelabError(f"{path}: no such file")
    check_format(path, fmt)
    text = Field("text", "text_field")
    return {"conll": lambda: conll_sentences(path, None), "text": lambda: text_lines(path),
            "jsonl": lambda: jsonl_texts(path, text), "csv": lambda: csv_texts(path, text)}[fmt]()
