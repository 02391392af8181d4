"""Prediction input read lazily, one line (or one CoNLL sentence) at a time, so that `tunelab predict` on a
large file holds only the chunk it is predicting, never the whole file.

A line that cannot become an example (not UTF-8, not JSON, a missing or empty field, a row with extra values)
is yielded as a `BadLine` naming the file and line, instead of raising, so that the caller decides whether to
skip it or fail. Problems with the file as a whole (missing, a CSV header without the column, a format the
task cannot read) still raise TunelabError at once.

Yields, per format (unlabelled):
    text   one input a line (blank lines skipped)            -> TextExample (raw text)
    jsonl  an object a line: text_field / prompt_field       -> TextExample (raw text)
           or, for NER, tokens_field (a list of words)       -> Sentence
    csv    a header, then a row a record (text / prompt)     -> TextExample (raw text)
    conll  NER only: words in the first column               -> Sentence (documents kept apart)
Raw texts become a task's examples with `tunelab.predict.text_examples`.
"""

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from tunelab.data.examples import Sentence, TextExample
from tunelab.errors import TunelabError, where

FORMATS = ("text", "jsonl", "csv", "conll")


@dataclass(frozen=True)
class BadLine:
    source: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{where(self.source, self.line)}: {self.message}"


def input_format(path, fmt: str | None) -> str:
    """The format of a prediction input: `fmt`, else from the extension (.txt is text lines, also for NER;
    .conll and friends are CoNLL columns)."""
    if fmt:
        return fmt
    from tunelab.data import file_format

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
    path = Path(path)
    if not path.is_file():
        raise TunelabError(f"{path}: no such file")
    field = prompt_field if kind == "generate" else text_field
    if fmt == "text":
        return _text_lines(path)
    if fmt == "jsonl":
        return _jsonl(path, field, tokens_field if kind == "ner" else None)
    if fmt == "csv":
        if kind == "ner":
            raise TunelabError(f"{path}: NER input must be text lines, CoNLL columns or JSONL with "
                               f"{tokens_field!r}")
        return _csv(path, field)
    if fmt == "conll":
        if kind != "ner":
            raise TunelabError(f"{path}: CoNLL columns are NER input; a {kind} model reads text lines, JSONL "
                               "or CSV")
        return _conll(path)
    raise TunelabError(f"{path}: unknown input format {fmt!r}; choose one of {', '.join(FORMATS)}")


def _lines(path: Path, newline: str | None = None):
    """(line number, line without its end) pairs. Bytes that are not UTF-8 survive as lone surrogates, so that
    the line holding them can be reported (and skipped) instead of failing the whole file."""
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline=newline) as f:
        for n, line in enumerate(f, 1):
            yield n, line.rstrip("\r\n")


def _not_utf8(text: str) -> str | None:
    """Why `text` is not valid UTF-8 text (undecodable bytes, or a lone surrogate written as a JSON escape)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start]
        what = f"byte 0x{ord(bad) - 0xDC00:02x}" if "\udc80" <= bad <= "\udcff" else "a lone surrogate"
        return f"not valid UTF-8 ({what} at character {e.start + 1}); convert the file to UTF-8"
    return None


def _text_lines(path: Path):
    for n, line in _lines(path):
        if not line.strip():
            continue
        problem = _not_utf8(line)
        yield BadLine(str(path), n, problem) if problem else TextExample(line, None, str(path), n)


def _jsonl(path: Path, field: str, tokens_field: str | None):
    for n, line in _lines(path):
        if not line.strip():
            continue
        problem = _not_utf8(line)
        if problem:
            yield BadLine(str(path), n, problem)
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            yield BadLine(str(path), n, f"not valid JSON ({e.msg}, column {e.colno})")
            continue
        except (ValueError, RecursionError) as e:  # a number of thousands of digits, nesting thousands deep
            yield BadLine(str(path), n, f"not acceptable JSON ({str(e)[:100] or type(e).__name__})")
            continue
        if not isinstance(obj, dict):
            yield BadLine(str(path), n, f"expected a JSON object, got {type(obj).__name__}")
        elif tokens_field is not None:
            words = obj.get(tokens_field)
            if not isinstance(words, list) or not words or not all(isinstance(w, str) and w.strip() for w in words):
                yield BadLine(str(path), n, f"field {tokens_field!r} must be a non-empty list of non-empty strings"
                              + ("" if tokens_field in obj else f" (fields: {', '.join(obj) or 'none'})"))
            else:
                problem = next(filter(None, map(_not_utf8, words)), None)
                # Each line its own document, as the eager reader numbers them.
                yield BadLine(str(path), n, problem) if problem else Sentence(words, None, n, str(path), n)
        else:
            yield _text_field(obj, field, str(path), n)


def _text_field(obj: dict, field: str, source: str, n: int) -> TextExample | BadLine:
    if field not in obj:
        return BadLine(source, n, f"no field {field!r} (fields: {', '.join(obj) or 'none'})")
    value = obj[field]
    if not isinstance(value, str) or not value.strip():
        return BadLine(source, n, f"field {field!r} must be a non-empty string, got {value!r:.60}")
    problem = _not_utf8(value)
    return BadLine(source, n, f"field {field!r}: {problem}") if problem else TextExample(value, None, source, n)


def _csv(path: Path, field: str):
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    numbered = _lines(path, newline="")
    current = [0]

    def rows():  # lines for csv.reader, remembering the number of the last one handed out
        for n, line in numbered:
            current[0] = n
            yield line

    reader = csv.reader(rows(), delimiter=delimiter)
    header = next(reader, None)
    if header is None:
        raise TunelabError(f"{path}: empty file; expected a header line")
    if field not in header:
        raise TunelabError(f"{where(path, 1)}: header has no column {field!r} (columns: {', '.join(header)}); "
                           "name the column with --text-field / --prompt-field")
    col = header.index(field)
    while True:
        start = current[0] + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            yield BadLine(str(path), start, f"not valid CSV ({e})")
            continue
        if not row or not any(v.strip() for v in row):
            continue
        if len(row) > len(header):
            yield BadLine(str(path), start, f"{len(row)} values but {len(header)} header columns")
            continue
        yield _text_field({header[i]: v for i, v in enumerate(row)}, field, str(path), start)


def _conll(path: Path):
    """Sentences of words (first column); a sentence with a line that is not UTF-8 is one BadLine."""
    words, start, bad, doc, seen = [], None, None, 0, False
    for n, line in _lines(path):
        cols = line.split()
        if not cols or cols[0] == "-DOCSTART-":
            if bad:
                yield bad
            elif words:
                yield Sentence(words, None, doc, str(path), start)
                seen = True
            words, start, bad = [], None, None
            if cols and seen:
                doc += 1
            continue
        if start is None:
            start = n
        problem = bad is None and _not_utf8(line)
        if problem:
            bad = BadLine(str(path), n, problem + " (the sentence starting at line " + f"{start} is left out)")
        words.append(cols[0])
    if bad:
        yield bad
    elif words:
        yield Sentence(words, None, doc, str(path), start)
