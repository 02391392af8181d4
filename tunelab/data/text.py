"""Text-classification files: JSONL (one object a line) or CSV/TSV with a header, plus plain text (one text
a line, unlabelled, for prediction)."""

import csv
import json
from pathlib import Path

from tunelab.data.examples import Sentence, TextExample
from tunelab.errors import TunelabError, where


def _read(path) -> str:
    path = Path(path)
    if not path.is_file():
        raise TunelabError(f"{path}: no such file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TunelabError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); convert the file to UTF-8") from None


def _check_text(value, path, line, field) -> str:
    if not isinstance(value, str) or not value.strip():
        raise TunelabError(f"{where(path, line)}: field {field!r} must be a non-empty string, got {value!r}")
    return value


def _check_label(value, path, line, field) -> str:
    # Labels may be written as numbers in JSON; they are names inside tunelab.
    if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value).strip() == "":
        raise TunelabError(f"{where(path, line)}: field {field!r} must be a label name or integer, got {value!r}")
    return str(value)


def read_jsonl(path, text_field="text", label_field="label", labelled=True, free_text=False) -> list[TextExample]:
    """`free_text`: the label field holds text (a generation target), not a label name."""
    out = []
    for lineno, raw in enumerate(_read(path).splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise TunelabError(f"{where(path, lineno)}: not valid JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(obj, dict):
            raise TunelabError(f"{where(path, lineno)}: expected a JSON object, got {type(obj).__name__}")
        if text_field not in obj:
            raise TunelabError(f"{where(path, lineno)}: no field {text_field!r} (fields: {', '.join(obj)}); "
                               "set data.text_field")
        text = _check_text(obj[text_field], path, lineno, text_field)
        label = None
        if labelled:
            if label_field not in obj:
                raise TunelabError(f"{where(path, lineno)}: no field {label_field!r} (fields: {', '.join(obj)}); "
                                   "set data.label_field")
            label = _check_text(obj[label_field], path, lineno, label_field) if free_text else \
                _check_label(obj[label_field], path, lineno, label_field)
        out.append(TextExample(text, label, str(path), lineno))
    if not out:
        raise TunelabError(f"{path}: no examples found (empty file?)")
    return out


def read_csv(path, text_field="text", label_field="label", labelled=True, free_text=False) -> list[TextExample]:
    text = _read(path)
    delimiter = "\t" if str(path).endswith(".tsv") else ","
    reader = csv.DictReader(text.splitlines(), delimiter=delimiter)
    fields = reader.fieldnames or []
    need = [text_field] + ([label_field] if labelled else [])
    for f in need:
        if f not in fields:
            raise TunelabError(f"{where(path, 1)}: header has no column {f!r} (columns: {', '.join(fields)}); "
                               "set data.text_field / data.label_field")
    out = []
    for row in reader:
        lineno = reader.line_num
        if None in row:
            raise TunelabError(f"{where(path, lineno)}: more values than header columns")
        t = _check_text(row[text_field], path, lineno, text_field)
        check = _check_text if free_text else _check_label
        label = check(row[label_field], path, lineno, label_field) if labelled else None
        out.append(TextExample(t, label, str(path), lineno))
    if not out:
        raise TunelabError(f"{path}: no examples found (empty file?)")
    return out


def read_lines(path) -> list[TextExample]:
    """Plain text, one input a line (blank lines skipped): unlabelled, for prediction."""
    out = [TextExample(raw, None, str(path), n) for n, raw in enumerate(_read(path).splitlines(), 1) if raw.strip()]
    if not out:
        raise TunelabError(f"{path}: no text found (empty file?)")
    return out


def read_jsonl_sentences(path, words_field="tokens", tags_field="tags", labelled=True, scheme="iob2") -> list[Sentence]:
    """Token-classification JSONL: {"tokens": [...], "tags": [...]} a line, tags in `scheme`."""
    from tunelab.data.tags import to_iob2

    out = []
    for lineno, raw in enumerate(_read(path).splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise TunelabError(f"{where(path, lineno)}: not valid JSON ({e.msg}, column {e.colno})") from None
        words = obj.get(words_field) if isinstance(obj, dict) else None
        if not isinstance(words, list) or not words or not all(isinstance(w, str) and w for w in words):
            raise TunelabError(f"{where(path, lineno)}: field {words_field!r} must be a non-empty list of strings")
        tags = None
        if labelled:
            tags = obj.get(tags_field)
            if not isinstance(tags, list) or len(tags) != len(words):
                raise TunelabError(f"{where(path, lineno)}: field {tags_field!r} must be a list with one tag per "
                                   f"token ({len(words)} tokens)")
            try:
                tags = to_iob2([str(t) for t in tags], scheme)
            except ValueError as e:
                raise TunelabError(f"{where(path, lineno)}: {e}") from None
        out.append(Sentence(words, tags, lineno, str(path), lineno))
    if not out:
        raise TunelabError(f"{path}: no examples found (empty file?)")
    return out
