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
                      unlabelled, or raw text {text: str} instead      -> TextExample(text) (one way per file)
    csv_texts         a header, then rows (a quoted value may span lines; line = where the row starts)
                      with the text and label columns                  -> TextExample(text, label)
    conll_sentences   a token a line, word first, blank line between sentences, -DOCSTART- between
                      documents; tags from one column (None: unlabelled) -> Sentence(words, tags IOB2, doc)
Files are read as UTF-8 (a BOM is ignored); bytes that are not UTF-8 make their line (or CoNLL sentence) bad.
So does a C0/C1 control character other than tab, line feed and carriage return (CONTROL: U+0000-U+0008,
U+000B, U+000C, U+000E-U+001F, U+007F-U+009F) in a text, label, token or tag (text lines and CoNLL: anywhere
in the line), checked by `_no_control`, the one place for it.
A JSONL file of classification labels writes every label the same way: all names, or all integers (else a
bad line).
NER tags read as IOB2 with an I- tag that starts an entity (IOB1's way) are repaired to B-, with a warning
(logger "tunelab.data") naming the first such tag's file:line.
"""

import csv
import json
import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from tunelab.data.examples import Sentence, TextExample
from tunelab.data.tags import to_iob2
from tunelab.errors import TunelabError, where

log = logging.getLogger("tunelab.data")

# C0 and C1 control characters but tab, line feed and carriage return: never part of a text, label, token or
# tag (a NUL from a binary file or a broken conversion, an escape sequence, a form feed), invisible in output
# and messages. Python's str.split() even takes U+001C-U+001F as white space. The server refuses them too.
CONTROL_RANGES = r"\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f"  # (inside a character class, in Python as in JSON Schema)
CONTROL = re.compile(f"[{CONTROL_RANGES}]")


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
        raise TunelabError(f"{path}: " + ("a folder; give a file" if path.is_dir() else "no such file"))
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


def control_character(text: str) -> str | None:
    """The first control character (CONTROL) of `text` as a message says it, 'control character U+0000 at
    character 7'; None when there is none."""
    m = CONTROL.search(text)
    return None if m is None else f"control character U+{ord(m.group()):04X} at character {m.start() + 1}"


def _no_control(value: str, what: str = "", note: str = "") -> str:
    """Raise _Bad when `value` holds a control character; `what` says where ("field 'text': ")."""
    found = control_character(value)
    if found:
        raise _Bad(f"{what}{found}; remove it{note}")
    return value


def _blank(line: str) -> bool:
    """A line to skip: nothing but white space (a line of control characters is not blank: it is bad)."""
    return not line.strip() and control_character(line) is None


def _valid(value: str, name: str, item: str = "") -> str:
    """A string decoded from a record's field `name` (`item`: which of its list, "token 3"): no lone surrogate,
    no control character."""
    return _no_control(_no_surrogate(value, name), f"field {name!r}{', ' + item if item else ''}: ")


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
    if isinstance(value, str):
        _valid(value, field.name)
    if not isinstance(value, str) or not value.strip():
        raise _Bad(f"field {field.name!r} must be a non-empty string, got {value!r:.60}")
    return value


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
    return _valid(str(value), field.name)


# --- plain text --------------------------------------------------------------------------------------------


def text_lines(path) -> Iterator[TextExample | BadLine]:
    """One input a line, kept as written (spaces included): unlabelled, for prediction."""
    for n, line in _lines(path):
        if _blank(line):
            continue
        try:
            _check_bytes(line, n)
            _no_control(line)
            yield TextExample(line, None, str(path), n)
        except _Bad as e:
            yield e.at(path, n)


# --- JSONL -------------------------------------------------------------------------------------------------


def _json_objects(path) -> Iterator[tuple[int, dict | BadLine]]:
    """(line number, the line's JSON object, or a BadLine) for each non-blank line: the one JSONL parser."""
    for n, line in _lines(path):
        if _blank(line):
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


def jsonl_texts(path, text: Field, label: Field | None = None, free_text: bool = False, one_label_kind: bool = False,
                pair: Field | None = None) -> Iterator[TextExample | BadLine]:
    """A text (and with `label`, a label; `free_text`: the label is text, a generation target) a line. With
    `one_label_kind` (classification data) labels are all names or all integers: a label written the other way
    than the file's first one is a bad line (JSON 1 and "neg": a set written by two hands, or numbers that stand
    for names)."""
    first = None  # (the first label's kind, its line)
    for n, obj in _json_objects(path):
        if isinstance(obj, BadLine):
            yield obj
            continue
        try:
            value = _text(obj, text)
            second = _text(obj, pair) if pair else None
            name = _label(obj, label, free_text) if label else None
            if label and not free_text and one_label_kind:
                raw = obj[label.name]
                kind = "a number" if isinstance(raw, int) else "text"
                first = first or (kind, n)
                if kind != first[0]:
                    raise _Bad(f"label {json.dumps(raw, ensure_ascii=False):.60} is {kind} but earlier labels are "
                               f"{'numbers' if first[0] == 'a number' else 'text'} (from line {first[1]}); write all "
                               "labels the same way")
            yield TextExample(value, name, str(path), n, text_pair=second)
        except _Bad as e:
            yield e.at(path, n)


def jsonl_records(path, parse) -> Iterator:
    """A record a line, each made an example by `parse(record: dict)`, which raises RecordError for a record it
    cannot take (the task types with records of their own: QA, relations, multi-label, regression)."""
    for n, obj in _json_objects(path):
        if isinstance(obj, BadLine):
            yield obj
            continue
        try:
            example = parse(obj)
            example.source, example.line = str(path), n
            yield example
        except _Bad as e:
            yield e.at(path, n)


def jsonl_sentences(path, tokens: Field, tags: Field | None = None, scheme: str = "iob2", text: Field | None = None
                    ) -> Iterator[Sentence | TextExample | BadLine]:
    """A pre-split sentence a line (each line its own document); with `tags`, one tag per token in `scheme`.
    With `text` (unlabelled input), a record without the tokens field may give raw text in the text field
    instead (-> TextExample, split into words as text lines are); a file is read one way, the first record's:
    a record written the other way is a bad line."""
    if tags:
        to_iob2([], scheme)  # an unknown scheme is a setting mistake: raise it before reading
    iob1 = _Iob1Note(path, scheme)
    first = None  # (the field the file's first good record was read from, its line)
    for n, obj in _json_objects(path):
        if isinstance(obj, BadLine):
            yield obj
            continue
        try:
            # the tokens field when there is one; else raw text, when the record has it or the file is raw text
            raw = text is not None and tokens.name not in obj and (text.name in obj or bool(first and
                                                                                          first[0] == text.name))
            if first and first[0] != (text if raw else tokens).name:
                this = (f"raw text in {text.name!r} (no field {tokens.name!r}; fields: {', '.join(obj)})" if raw
                        else f"a token list in {tokens.name!r}")
                raise _Bad(f"{this}, but the records before it (from line {first[1]}) are "
                           f"{'token lists' if raw else 'raw text'}; write every record of a file the same way")
            if raw:
                item = TextExample(_text(obj, text), None, str(path), n)
            else:
                item = _sentence(obj, n, path, tokens, tags, scheme, text, iob1)
            first = first or ((text if raw else tokens).name, n)
            yield item
        except _Bad as e:
            yield e.at(path, n)


def _sentence(obj: dict, n: int, path, tokens: Field, tags: Field | None, scheme: str, text: Field | None,
              iob1: "_Iob1Note") -> Sentence:
    words = obj.get(tokens.name)
    if not isinstance(words, list) or not words or not all(isinstance(w, str) and w.strip() for w in words):
        raise _Bad(f"field {tokens.name!r} must be a non-empty list of non-empty strings" + (
            "" if tokens.name in obj else f" (fields: {', '.join(obj) or 'none'}); {tokens.hint}" + (
                f", or give raw text in a field {text.name!r}" if text else "")))
    for i, w in enumerate(words, 1):
        _valid(w, tokens.name, f"token {i}")
    return Sentence(words, _sentence_tags(obj, tags, len(words), scheme, iob1, n) if tags else None, n, str(path), n)


def _sentence_tags(obj: dict, tags: Field, n_words: int, scheme: str, iob1: "_Iob1Note", n: int) -> list[str]:
    value = obj.get(tags.name)
    if not isinstance(value, list) or len(value) != n_words:
        raise _Bad(f"field {tags.name!r} must be a list with one tag per token ({n_words} tokens)" + (
            "" if tags.name in obj else f"; {tags.hint}"))
    value = [_valid(str(t), tags.name, f"tag {i}") for i, t in enumerate(value, 1)]
    try:
        converted = to_iob2(value, scheme)
    except ValueError as e:
        raise _Bad(str(e)) from None
    iob1.check(value, converted, lambda i: n)
    return converted


class _Iob1Note:
    """Tags read as IOB2 in which an I- tag starts an entity (after O, at the start of a sentence, or after
    another type), as IOB1 writes them: repaired to B- (tags.repair_iob2), which is also what reading them as
    IOB1 gives, but the file is likely IOB1 (or broken) and the user should know. Said once per file, at the
    first such tag."""

    def __init__(self, path, scheme: str | None):
        self.path, self.on = path, scheme == "iob2"  # (None: say nothing)

    def check(self, tags: list[str], converted: list[str], line_of) -> None:
        """`line_of(i)`: the line of the i-th tag (0-based)."""
        if not self.on:
            return
        for i, (tag, new) in enumerate(zip(tags, converted)):
            if tag != new:
                after = f"after {tags[i - 1]!r}" if i else "at the start of a sentence"
                log.warning(f"{where(self.path, line_of(i))}: tag {tag!r} starts an entity ({after}), as IOB1 "
                            f"writes it; the tags were read as IOB2 (data.tag_scheme=iob2), which repairs it to "
                            f"{new!r} (the first such tag of this file; any others alike); if the file is IOB1, "
                            "data.tag_scheme=iob1 (--tag-scheme iob1) reads it as IOB1")
                self.on = False
                return


# --- CSV / TSV ---------------------------------------------------------------------------------------------


def csv_texts(path, text: Field, label: Field | None = None, free_text: bool = False, pair: Field | None = None
              ) -> Iterator[TextExample | BadLine]:
    """A header naming the columns, then a row a record (comma-separated; tab-separated for .tsv). Quoted values
    keep their commas, quotes and line breaks as written; a row's line is the one where it starts."""
    def parse(record: dict) -> TextExample:
        return TextExample(_text(record, text), _label(record, label, free_text) if label else None,
                           text_pair=_text(record, pair) if pair else None)

    return csv_records(path, [f for f in (text, label, pair) if f], parse)


def csv_records(path, need: list[Field], parse) -> Iterator:
    """CSV rows as examples: `need` are the columns the header must have, `parse(record: dict)` makes a row's
    example (RecordError for a row it cannot take)."""
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
        header = _csv_header(reader, path, undecodable, need)
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
                example = parse(_csv_record(header, row, need))
                example.source, example.line = str(path), start
                yield example
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


def conll_sentences(path, tag_column: int | None = -1, scheme: str = "iob2", note_iob1: bool = True
                    ) -> Iterator[Sentence | BadLine]:
    """Sentences of a CoNLL file, the word from the first column and the tag from `tag_column` (negative
    counts from the end; None: unlabelled, any columns after the word are ignored). Every token line of a
    labelled file needs the same number of columns. A sentence with a bad line is one BadLine (its first
    problem), yielded where the sentence ends. `note_iob1=False`: no warning about IOB1-looking tags (a
    packaged set, about which the user can do nothing)."""
    labelled = tag_column is not None
    if labelled:
        to_iob2([], scheme)  # an unknown scheme is a setting mistake: raise it before reading
    iob1 = _Iob1Note(path, scheme if note_iob1 else None)
    words, tags, start, bad = [], [], None, None
    doc, seen, ncols = 0, False, None

    def finish():
        if bad:
            return bad
        if labelled:
            try:
                converted = to_iob2(tags, scheme)
            except ValueError as e:
                return BadLine(str(path), start, f"sentence starting here: {e}")
            iob1.check(tags, converted, lambda i: start + i)  # a sentence's token lines follow each other
            return Sentence(words, converted, doc, str(path), start)
        return Sentence(words, None, doc, str(path), start)

    for n, line in _lines(path):
        cols = line.split()
        # (a line with a control character is never a break: it belongs to a sentence, which it makes bad)
        if (not cols or cols[0] == "-DOCSTART-") and control_character(line) is None:
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
        words.append(cols[0] if cols else line)
        if bad:
            continue
        try:
            _check_bytes(line, n, note=f" (the sentence starting at line {start} is left out)")
            _no_control(line, note=f" (in the sentence starting at line {start})" if start != n else "")
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


# For the task types that parse records of their own (tunelab.tasks): the error a record's problem raises,
# and a record's non-empty text field, checked as every reader checks text.
RecordError = _Bad
required_text = _text
