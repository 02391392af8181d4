"""One lazy reader per input format; training, evaluation and prediction all read files through these.

Each reader is a generator over one file that yields an example per record, or a `BadLine` for a record that
cannot become one (not UTF-8, not JSON, a missing or empty field, a row with extra values, a bad tag), and
goes on. Problems with the file as a whole (missing, a CSV header without the column) raise TunelabError.
Two ways to use a reader:
    streaming  iterate it; the caller decides whether a BadLine is skipped or fatal (`tunelab predict`)
    eager      collect(reader, path) -> list; the first BadLine becomes a TunelabError (training, eval)
so both agree on what a bad line is, and files are parsed by one piece of code whichever way they are read.

Formats (one record a line unless said; blank lines are skipped):
    text_lines        plain text                                       -> TextExample(text)
    jsonl_texts       {text: str, label: str|int} (label optional)     -> TextExample(text, label)
    jsonl_sentences   {tokens: [str], tags: [str]} (tags optional)     -> Sentence(words, tags IOB2, doc=line)
    csv_texts         a header, then rows (a quoted value may span lines; line = where the row starts)
                      with the text and label columns                  -> TextExample(text, label)
    conll_sentences   a token a line, word first, blank line between sentences, -DOCSTART- between
                      documents; tags from one column (None: unlabelled) -> Sentence(words, tags IOB2, doc)
Files are read as UTF-8 (a BOM is ignored); bytes that are not UTF-8 make their line (or CoNLL sentence) bad.
"""

import csv
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from tunelab.data.examples import Sentence, TextExample
from tunelab.data.tags import to_iob2
from tunelab.errors import TunelabError, where


@dataclass(frozen=True)
class BadLine:
    """A record that could not become an example, and why: `line` is where the record starts (a CoNLL
    sentence: its bad line; the message names where the sentence starts)."""

    source: str
    line: int
    message: str
    not_utf8: str | None = None  # where, when the problem is bytes that are not UTF-8 ("byte 0xe9 at line 4,
    # character 2"): then the file's encoding is wrong, not just this line, and the eager readers say so

    def __str__(self) -> str:
        return f"{where(self.source, self.line)}: {self.message}"

    def error(self) -> TunelabError:
        """The TunelabError an eager reader raises for this line."""
        if self.not_utf8:
            return TunelabError(f"{self.source}: not UTF-8 text ({self.not_utf8}); convert the file to UTF-8")
        return TunelabError(str(self))


class Field(NamedTuple):
    """A record's field and the setting that names it, for messages: Field("body", "text_field")."""

    name: str
    setting: str

    @property
    def hint(self) -> str:
        return f"set data.{self.setting} (or --{self.setting.replace('_', '-')})"


def collect(items: Iterable, path, noun: str = "examples") -> list:
    """Every example of a reader, as a list; the first bad line, or a file without any example, is an error."""
    out = []
    for item in items:
        if isinstance(item, BadLine):
            raise item.error()
        out.append(item)
    if not out:
        raise TunelabError(f"{path}: no {noun} found (empty file?)")
    return out


class _Bad(Exception):
    """Raised inside a reader for the record being read; the reader yields it as a BadLine and goes on."""

    def __init__(self, message: str, not_utf8: str | None = None):
        super().__init__(message)
        self.not_utf8 = not_utf8

    def at(self, path, line: int) -> BadLine:
        return BadLine(str(path), line, str(self), self.not_utf8)


def _open(path, newline: str | None = None):
    path = Path(path)
    if not path.is_file():
        raise TunelabError(f"{path}: no such file")
    # surrogateescape: bytes that are not UTF-8 survive as lone surrogates, so that the line holding them can be
    # reported (and skipped) instead of failing the whole file at the first one.
    return open(path, encoding="utf-8-sig", errors="surrogateescape", newline=newline)


def _lines(path) -> Iterator[tuple[int, str]]:
    """(line number, line without its end). Only \\n, \\r\\n and \\r end a line (not str.splitlines()'s
    U+2028 and friends, which may sit inside a JSON string)."""
    with _open(path) as f:
        for n, line in enumerate(f, 1):
            yield n, line.rstrip("\r\n")


def _check_bytes(line: str, n: int, start: int | None = None, note: str = "") -> None:
    """Raise _Bad when line `n` holds bytes that are not UTF-8 (read with surrogateescape, they are lone
    surrogates). `start`: the line where the record starts, when it is another (a CSV row over several lines)."""
    try:
        line.encode("utf-8")
    except UnicodeEncodeError as e:
        byte, char = ord(line[e.start]) - 0xDC00, e.start + 1
        of_line = f" of line {n}" if start not in (None, n) else ""
        raise _Bad(f"not valid UTF-8 (byte 0x{byte:02x} at character {char}{of_line}); convert the file to "
                   f"UTF-8{note}", f"byte 0x{byte:02x} at line {n}, character {char}") from None


def _no_surrogate(value: str, name: str) -> str:
    """A value decoded from a JSON escape such as \\ud800 can be a lone surrogate, which no UTF-8 text holds
    (writing it out, or tokenizing it, would fail later)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _Bad(f"field {name!r}: not valid UTF-8 (a lone surrogate at character {e.start + 1}, from a "
                   "\\ud800-\\udfff escape); write the character itself or a valid surrogate pair") from None
    return value


def _text(record: dict, field: Field) -> str:
    """The non-empty string in `record[field]`."""
    if field.name not in record:
        raise _Bad(f"no field {field.name!r} (fields: {', '.join(record) or 'none'}); {field.hint}")
    value = record[field.name]
    if not isinstance(value, str) or not value.strip():
        raise _Bad(f"field {field.name!r} must be a non-empty string, got {value!r:.60}")
    return _no_surrogate(value, field.name)


def _label(record: dict, field: Field, free_text: bool) -> str:
    """A label name (JSON may write it as an integer: names inside tunelab), or with `free_text` any
    non-empty string (a generation target)."""
    if free_text:
        return _text(record, field)
    if field.name not in record:
        raise _Bad(f"no field {field.name!r} (fields: {', '.join(record) or 'none'}); {field.hint}")
    value = record[field.name]
    if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value).strip() == "":
        raise _Bad(f"field {field.name!r} must be a label name or integer, got {value!r:.60}")
    return _no_surrogate(str(value), field.name)


# --- plain text --------------------------------------------------------------------------------------------


def text_lines(path) -> Iterator[TextExample | BadLine]:
    """One input a line, kept as written (spaces included): unlabelled, for prediction."""
    for n, line in _lines(path):
        if not line.strip():
            continue
        try:
            _check_bytes(line, n)
            yield TextExample(line, None, str(path), n)
        except _Bad as e:
            yield e.at(path, n)


# --- JSONL -------------------------------------------------------------------------------------------------


def _json_objects(path) -> Iterator[tuple[int, dict | BadLine]]:
    """(line number, the line's JSON object, or a BadLine) for each non-blank line: the one JSONL parser."""
    for n, line in _lines(path):
        if not line.strip():
            continue
        try:
            _check_bytes(line, n)
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise _Bad(f"not valid JSON ({e.msg}, column {e.colno})") from None
            except (ValueError, RecursionError) as e:  # a number of thousands of digits, nesting thousands deep
                raise _Bad(f"not acceptable JSON ({str(e)[:100] or type(e).__name__})") from None
            if not isinstance(obj, dict):
                raise _Bad(f"expected a JSON object, got {type(obj).__name__}")
            yield n, obj
        except _Bad as e:
            yield n, e.at(path, n)


def jsonl_texts(path, text: Field, label: Field | None = None, free_text: bool = False
                ) -> Iterator[TextExample | BadLine]:
    """A text (and with `label`, a label; `free_text`: the label is text, a generation target) a line."""
    for n, obj in _json_objects(path):
        if isinstance(obj, BadLine):
            yield obj
            continue
        try:
            value = _text(obj, text)
            yield TextExample(value, _label(obj, label, free_text) if label else None, str(path), n)
        except _Bad as e:
            yield e.at(path, n)


def jsonl_sentences(path, tokens: Field, tags: Field | None = None, scheme: str = "iob2"
                    ) -> Iterator[Sentence | BadLine]:
    """A pre-split sentence a line (each line its own document); with `tags`, one tag per token in `scheme`."""
    if tags:
        to_iob2([], scheme)  # an unknown scheme is a setting mistake: raise it before reading
    for n, obj in _json_objects(path):
        if isinstance(obj, BadLine):
            yield obj
            continue
        try:
            words = obj.get(tokens.name)
            if not isinstance(words, list) or not words or not all(isinstance(w, str) and w.strip() for w in words):
                raise _Bad(f"field {tokens.name!r} must be a non-empty list of non-empty strings" + (
                    "" if tokens.name in obj else f" (fields: {', '.join(obj) or 'none'}); {tokens.hint}"))
            for w in words:
                _no_surrogate(w, tokens.name)
            yield Sentence(words, _sentence_tags(obj, tags, len(words), scheme) if tags else None, n, str(path), n)
        except _Bad as e:
            yield e.at(path, n)


def _sentence_tags(obj: dict, tags: Field, n_words: int, scheme: str) -> list[str]:
    value = obj.get(tags.name)
    if not isinstance(value, list) or len(value) != n_words:
        raise _Bad(f"field {tags.name!r} must be a list with one tag per token ({n_words} tokens)" + (
            "" if tags.name in obj else f"; {tags.hint}"))
    try:
        return to_iob2([str(t) for t in value], scheme)
    except ValueError as e:
        raise _Bad(str(e)) from None


# --- CSV / TSV ---------------------------------------------------------------------------------------------


def csv_texts(path, text: Field, label: Field | None = None, free_text: bool = False
              ) -> Iterator[TextExample | BadLine]:
    """A header naming the columns, then a row a record (comma-separated; tab-separated for .tsv). Quoted values
    keep their commas, quotes and line breaks as written; a row's line is the one where it starts."""
    path = Path(path)
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    undecodable = []  # (line, number) of the lines of the row being read that hold bytes that are not UTF-8

    def checked(f):  # the file's lines, as csv.reader needs them (ends kept), each checked for bytes
        for n, line in enumerate(f, 1):
            try:
                _check_bytes(line, n)
            except _Bad:
                undecodable.append((line, n))
            yield line

    with _open(path, newline="") as f:
        reader = csv.reader(checked(f), delimiter=delimiter)
        header = _csv_header(reader, path, undecodable, [text] + ([label] if label else []))
        while True:
            start = reader.line_num + 1
            undecodable.clear()
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                yield BadLine(str(path), start, f"not valid CSV ({e})")
                continue
            if not row:  # an empty line (a line of spaces is a row: its text is empty, which is bad)
                continue
            try:
                if undecodable:
                    _check_bytes(*undecodable[0], start)
                record = _csv_record(header, row, [text] + ([label] if label else []))
                yield TextExample(_text(record, text), _label(record, label, free_text) if label else None,
                                  str(path), start)
            except _Bad as e:
                yield e.at(path, start)


def _csv_header(reader, path: Path, undecodable: list, need: list[Field]) -> list[str]:
    """The column names; a header that is missing, not UTF-8 or without a needed column fails the file."""
    try:
        header = next(reader, None)
    except csv.Error as e:
        raise TunelabError(f"{where(path, 1)}: not valid CSV ({e})") from None
    if header is None:
        raise TunelabError(f"{path}: empty file; expected a header line naming the columns")
    if undecodable:  # the header is read before any row: the file as a whole is not UTF-8
        line, n = undecodable[0]
        try:
            _check_bytes(line, n)
        except _Bad as e:
            raise e.at(path, n).error() from None
    for field in need:
        if field.name not in header:
            raise TunelabError(f"{where(path, 1)}: header has no column {field.name!r} (columns: "
                               f"{', '.join(header) or 'none'}); {field.hint}")
    return header


def _csv_record(header: list[str], row: list[str], need: list[Field]) -> dict:
    if len(row) > len(header):
        raise _Bad(f"{len(row)} values but {len(header)} header columns; quote a value that holds the delimiter")
    record = dict(zip(header, row))
    for field in need:
        if field.name not in record:
            raise _Bad(f"{len(row)} values but {len(header)} header columns: no value for {field.name!r}")
    return record


# --- CoNLL columns -----------------------------------------------------------------------------------------


def conll_sentences(path, tag_column: int | None = -1, scheme: str = "iob2") -> Iterator[Sentence | BadLine]:
    """Sentences of a CoNLL file, the word from the first column and the tag from `tag_column` (negative
    counts from the end; None: unlabelled, any columns after the word are ignored). Every token line of a
    labelled file needs the same number of columns. A sentence with a bad line is one BadLine (its first
    problem), yielded where the sentence ends."""
    labelled = tag_column is not None
    if labelled:
        to_iob2([], scheme)  # an unknown scheme is a setting mistake: raise it before reading
    words, tags, start, bad = [], [], None, None
    doc, seen, ncols = 0, False, None

    def finish():
        if bad:
            return bad
        if labelled:
            try:
                return Sentence(words, to_iob2(tags, scheme), doc, str(path), start)
            except ValueError as e:
                return BadLine(str(path), start, f"sentence starting here: {e}")
        return Sentence(words, None, doc, str(path), start)

    for n, line in _lines(path):
        cols = line.split()
        if not cols or cols[0] == "-DOCSTART-":
            if words:
                item = finish()
                seen = seen or isinstance(item, Sentence)
                yield item
            words, tags, start, bad = [], [], None, None
            if cols and seen:  # documents are numbered from the first one that holds a sentence
                doc += 1
            continue
        if start is None:
            start = n
        words.append(cols[0])
        if bad:
            continue
        try:
            _check_bytes(line, n, note=f" (the sentence starting at line {start} is left out)")
            if labelled:
                if len(cols) < 2:
                    raise _Bad(f"expected a word and a tag separated by whitespace, got {line!r}")
                ncols = ncols or len(cols)
                if len(cols) != ncols:
                    raise _Bad(f"{len(cols)} columns where earlier lines have {ncols}; every token line needs "
                               "the same columns")
                try:
                    tags.append(cols[tag_column])
                except IndexError:
                    raise _Bad(f"no column {tag_column} in {line!r}") from None
        except _Bad as e:
            bad = e.at(path, n)
    if words:
        yield finish()
