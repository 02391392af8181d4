"""One reader per input format: read at once (training, eval) and streamed (predict), the same examples and the
same bad lines."""

import json

import pytest

from tunelab.data import read_file
from tunelab.data.conll import read_conll
from tunelab.data.stream import BadLine, stream_inputs
from tunelab.data.text import read_csv, read_jsonl
from tunelab.errors import TunelabError


def write(tmp_path, name, data):
    p = tmp_path / name
    p.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return p


def fields(x) -> tuple:
    """What an example says, whichever class holds it (eager generation reads GenExamples, streaming raw texts)."""
    if hasattr(x, "words"):
        return ("sentence", x.words, x.tags, x.doc, x.source, x.line)
    return ("text", getattr(x, "text", None) or getattr(x, "prompt", None), x.source, x.line)


# --- CSV: quoted values keep their line breaks --------------------------------------------------------------


@pytest.mark.parametrize("end", ["\n", "\r\n"])
def test_csv_quoted_newline_is_kept(tmp_path, end):
    p = write(tmp_path, "a.csv", end.join(['text,label', '"line one', 'line two",a', 'next,b', '"x, ""y""",c', '']))
    ex = read_csv(p)
    assert [(e.text, e.label, e.line) for e in ex] == [
        (f"line one{end}line two", "a", 2), ("next", "b", 4), ('x, "y"', "c", 5)]
    streamed = list(stream_inputs(p, "classify", "csv"))
    assert [(e.text, e.line) for e in streamed] == [(e.text, e.line) for e in ex]


def test_csv_error_names_the_line_where_the_row_starts(tmp_path):
    p = write(tmp_path, "b.csv", 'text,label\n"one\ntwo\nthree",a\n"four\nfive",b,extra\nsix,c\n')
    with pytest.raises(TunelabError, match=r"b\.csv:5: 3 values but 2 header columns"):
        read_csv(p)
    got = list(stream_inputs(p, "classify", "csv"))
    assert [(type(x).__name__, x.line) for x in got] == [("TextExample", 2), ("BadLine", 5), ("TextExample", 7)]


def test_csv_short_row_and_blank_values(tmp_path):
    with pytest.raises(TunelabError, match=r"c\.csv:3: 1 values but 2 header columns: no value for 'label'"):
        read_csv(write(tmp_path, "c.csv", "text,label\nfine,a\nlonely\n"))
    with pytest.raises(TunelabError, match=r"d\.csv:3: field 'text' must be a non-empty string"):
        read_csv(write(tmp_path, "d.csv", "text,label\nfine,a\n ,\n"))
    assert [e.line for e in read_csv(write(tmp_path, "e.csv", "text,label\n\nfine,a\n\n"))] == [3]


def test_csv_header_problems_fail_the_file(tmp_path):
    with pytest.raises(TunelabError, match=r"e\.csv: empty file; expected a header"):
        list(stream_inputs(write(tmp_path, "e.csv", ""), "classify", "csv"))
    with pytest.raises(TunelabError, match=r"h\.csv:1: header has no column 'label' .*data\.label_field"):
        read_csv(write(tmp_path, "h.csv", "text,y\na,b\n"))
    with pytest.raises(TunelabError, match=r"l\.csv: not UTF-8 text \(byte 0xe9 at line 1, character 4\)"):
        list(stream_inputs(write(tmp_path, "l.csv", "caf\xe9\na\n".encode("latin-1")), "classify", "csv"))


# --- the same examples, read at once or streamed ------------------------------------------------------------

CONLL = "-DOCSTART- -X- O\n\nJohn NNP\nSmith NNP\n\nleft VBD\n\n-DOCSTART- -X- O\n\nBerlin NNP\n"
SAME = [  # (file name, content, task kind, format)
    ("t.txt", "one line\n\n  two, with spaces  \n\r\nthree\r\n", "classify", "text"),
    ("t.txt", "Angela Merkel visited Paris .\n\nJohn left\n", "ner", "text"),
    ("c.jsonl", '{"text": "good film", "label": "pos"}\n\n{"text": "caf\\u00e9 \\u2028 ok", "id": 3}\n',
     "classify", "jsonl"),
    ("g.jsonl", '{"prompt": "copy: a b", "target": "a b"}\n{"prompt": "copy: c"}\n', "generate", "jsonl"),
    ("n.jsonl", json.dumps({"tokens": ["Peter", "Blackburn"]}) + "\n\n" + json.dumps({"tokens": ["x"]}) + "\n",
     "ner", "jsonl"),
    ("c.csv", 'id,text\n1,"Shares fell, again"\n2,"two\nlines"\n\n3,Goal!\n', "classify", "csv"),
    ("c.tsv", "text\tid\nA late goal, then a win\t1\n", "classify", "csv"),
    ("g.csv", "prompt\ncopy: a\n", "generate", "csv"),
    ("x.conll", CONLL, "ner", "conll"),
]


@pytest.mark.parametrize("name, content, kind, fmt", SAME)
def test_eager_and_streaming_read_the_same_examples(tmp_path, name, content, kind, fmt):
    p = write(tmp_path, name, content)
    eager = read_file(p, kind, fmt, labelled=False)
    streamed = list(stream_inputs(p, kind, fmt))
    assert not any(isinstance(x, BadLine) for x in streamed)
    assert [fields(x) for x in eager] == [fields(x) for x in streamed]
    assert len(eager) >= 1


def test_a_bom_is_ignored(tmp_path):
    p = write(tmp_path, "b.csv", "\ufefftext,label\nhi,a\n")
    assert [(e.text, e.label) for e in read_csv(p)] == [("hi", "a")]
    p = write(tmp_path, "b.jsonl", '\ufeff{"text": "hi", "label": "a"}\n')
    assert [(e.text, e.label) for e in read_jsonl(p)] == [("hi", "a")]


# --- the same bad lines -------------------------------------------------------------------------------------

GOOD = {  # (task kind, format): two good records, a line each (CoNLL: a sentence each)
    ("classify", "text"): [b"first text", b"second text"],
    ("classify", "jsonl"): [b'{"text": "a"}', b'{"text": "b", "label": "x"}'],
    ("generate", "jsonl"): [b'{"prompt": "a"}', b'{"prompt": "b"}'],
    ("ner", "jsonl"): [b'{"tokens": ["a"]}', b'{"tokens": ["b", "c"]}'],
    ("classify", "csv"): [b"1,a", b"2,b"],
    ("ner", "conll"): [b"John\nSmith", b"left"],
}
HEADER = {"csv": b"id,text\n"}
BAD = {  # a bad record of each format, and words of its message
    ("classify", "text"): [(b"caf\xe9", "byte 0xe9")],
    ("classify", "jsonl"): [(b'{"text": "unclosed', "not valid JSON"), (b'{"txt": "a"}', "no field 'text'"),
                            (b'{"text": " "}', "non-empty string"), (b'{"text": 4}', "non-empty string"),
                            (b"[1]", "JSON object"), (b'{"text": "caf\xe9"}', "byte 0xe9"),
                            (b'{"text": "\\ud800"}', "lone surrogate"), (b"[" * 5000, "JSON")],
    ("generate", "jsonl"): [(b'{"text": "a"}', "no field 'prompt'")],
    ("ner", "jsonl"): [(b'{"tokens": []}', "non-empty list"), (b'{"tokens": "a b"}', "non-empty list"),
                       (b'{"tokens": ["a", " "]}', "non-empty list"), (b'{"text": "a"}', "fields: text"),
                       (b'{"tokens": ["\\udcff"]}', "lone surrogate")],
    ("classify", "csv"): [(b"3,", "non-empty string"), (b"3,a,b", "3 values"), (b"3", "no value for 'text'"),
                          (b",", "non-empty string"), (b"   ", "no value"), (b"3,caf\xe9", "byte 0xe9"),
                          (b'3,"two\nlines\xe9"', "byte 0xe9 at character 6 of line 4")],
    ("ner", "conll"): [(b"M\xfcller\nleft", "byte 0xfc at character 2"),
                      (b"John\nM\xfcller", "sentence starting at line 4")],
}
CASES = [(kind, fmt, bad, words) for (kind, fmt), bads in BAD.items() for bad, words in bads]




@pytest.mark.parametrize("kind, fmt, bad, words", CASES)
def test_eager_and_streaming_find_the_same_bad_lines(tmp_path, kind, fmt, bad, words):
    """A bad record between two good ones: streaming yields one BadLine for it, the eager reader fails on it,
    both at the line where the record starts (CoNLL: the bad line of the sentence, which names its start)."""
    first, second = GOOD[kind, fmt]
    sep = b"\n" if fmt == "conll" else b""  # CoNLL sentences end with a blank line
    data = HEADER.get(fmt, b"") + first + b"\n" + sep + bad + b"\n" + sep + second + b"\n"
    line = HEADER.get(fmt, b"").count(b"\n") + first.count(b"\n") + 1 + len(sep) + 1  # where `bad` starts
    high = [i for i, b in enumerate(bad) if b >= 0x80]
    at = line + bad[:high[0]].count(b"\n") if high else line  # the line of the first byte that is not UTF-8
    p = write(tmp_path, "in." + {"text": "txt"}.get(fmt, fmt), data)
    got = list(stream_inputs(p, kind, fmt))
    assert [type(x).__name__ for x in got] == [type(got[0]).__name__, "BadLine", type(got[0]).__name__]
    assert got[1].line == (at if fmt == "conll" else line) and words in got[1].message, got[1]
    with pytest.raises(TunelabError) as e:
        read_file(p, kind, fmt, labelled=False)
    msg = str(e.value)
    if got[1].not_utf8:  # bytes that are not UTF-8: the file's encoding is wrong, said once for the whole file
        assert msg.startswith(f"{p}: not UTF-8 text (byte 0x") and f"at line {at}, character" in msg, msg
        assert msg.endswith("; convert the file to UTF-8")
    else:
        assert msg == str(got[1])


def test_labelled_readers_stop_at_the_first_bad_line(tmp_path):
    p = write(tmp_path, "a.conll", "EU B-ORG\n\nPeter B-PER\nBlackburn\n\nParis X-LOC\n")
    with pytest.raises(TunelabError, match=r"a\.conll:4: expected a word and a tag"):
        read_conll(p)
    p = write(tmp_path, "b.conll", "EU B-ORG\n\nM\xfcller B-PER\n".encode("latin-1"))
    with pytest.raises(TunelabError, match=r"b\.conll: not UTF-8 text \(byte 0xfc at line 3, character 2\)"):
        read_conll(p)
    p = write(tmp_path, "g.jsonl", '{"prompt": "a", "target": "b"}\n{"prompt": "c", "target": 3}\n')
    with pytest.raises(TunelabError, match=r"g\.jsonl:2: field 'target' must be a non-empty string"):
        read_file(p, "generate")


def test_formats_a_kind_cannot_read(tmp_path):
    p = write(tmp_path, "x.csv", "text\na\n")
    with pytest.raises(TunelabError, match="NER input must be text lines, CoNLL columns or JSONL"):
        stream_inputs(p, "ner", "csv")
    with pytest.raises(TunelabError, match="CoNLL columns are NER input"):
        stream_inputs(p, "classify", "conll")
    with pytest.raises(TunelabError, match="classification data must be JSONL or CSV"):
        read_file(p, "classify", "text")
    with pytest.raises(TunelabError, match="unknown input format 'xml'"):
        read_file(p, "classify", "xml", labelled=False)
    with pytest.raises(TunelabError, match="no such file"):
        stream_inputs(tmp_path / "missing.csv", "classify", "csv")
