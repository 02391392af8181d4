"""`tunelab predict` on files: streamed in chunks, bad lines reported by file and line and skipped or fatal
(--on-error), the output written atomically, and the records the same as predicting everything at once."""

import json
import tracemalloc

import pytest

from tunelab import cli
from tunelab.data import read_file
from tunelab.data.conll import write_conll
from tunelab.data.examples import Sentence, TextExample
from tunelab.data.stream import BadLine, stream_inputs
from tunelab.data.text import read_lines
from tunelab.predict import Predictor, prediction_records, text_examples
from tunelab.predict_file import chunks


def records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def at_once(folder, examples, offsets=None) -> list[dict]:
    """The records of one Predictor call over every example: what the streamed output must equal."""
    pred = Predictor(folder, device="cpu")
    kind, labels = pred.meta["task"], pred.meta["labels"]
    return list(prediction_records(kind, labels, examples, pred.predict(examples), offsets))


def same(got: list[dict], want: list[dict]) -> None:
    """Equal records; scores and probabilities within float noise (other batches pad differently)."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        for key in set(g) | set(w):
            if key == "entities":
                assert [{k: v for k, v in e.items() if k != "score"} for e in g[key]] == \
                       [{k: v for k, v in e.items() if k != "score"} for e in w[key]]
                assert [e["score"] for e in g[key]] == pytest.approx([e["score"] for e in w[key]], abs=1e-5)
            elif key == "probabilities":
                assert list(g[key]) == list(w[key])
                assert list(g[key].values()) == pytest.approx(list(w[key].values()), abs=1e-5)
            elif key == "score":
                assert g[key] == pytest.approx(w[key], abs=1e-5)
            else:
                assert g[key] == w[key], key


TEXTS = ["The striker scored twice", "Shares fell 4 percent on Monday", "The new phone has a faster chip",
         "The bank raised interest rates again", "Fans cheered as the club won the league",
         "Users downloaded the app millions of times", "Profits at the company doubled"]


def jsonl_with_bad_line(tmp_path, bad: bytes, name="in.jsonl"):
    """TEXTS as JSONL with `bad` as line 4 (in the middle) and a blank line 6."""
    lines = [json.dumps({"text": t, "id": i}).encode() for i, t in enumerate(TEXTS)]
    lines.insert(3, bad)
    lines.insert(5, b"")
    path = tmp_path / name
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


BAD_LINES = [  # (line 4 of the file, words of the message)
    (b'{"text": "unclosed', "not valid JSON"),
    (b'{"txt": "typo in the field name"}', "no field 'text'"),
    (b'{"text": "   "}', "non-empty string"),
    (b'{"text": 42}', "non-empty string"),
    (b'["text", "a list"]', "JSON object"),
    ('{"text": "café"}'.encode("latin-1"), "not valid UTF-8 (byte 0xe9"),
    (b'{"text": "\\ud800 lone surrogate"}', "lone surrogate"),
]


@pytest.mark.parametrize("bad, words", BAD_LINES)
def test_bad_line_fails_the_run_and_writes_nothing(cls_model, tmp_path, capsys, bad, words):
    src = jsonl_with_bad_line(tmp_path, bad)
    out = tmp_path / "out" / "preds.jsonl"
    assert cli.main(["predict", str(cls_model), str(src), "-o", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"{src}:4: " in err and words in err, err
    assert "1 bad line(s)" in err and "--on-error skip" in err and "Traceback" not in err
    assert not out.exists() and not (out.parent.exists() and any(out.parent.iterdir()))
    # to standard output: nothing printed either
    assert cli.main(["predict", str(cls_model), str(src), "--device", "cpu"]) == 2
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("bad, words", BAD_LINES[:1] + BAD_LINES[5:6])
def test_bad_line_skipped_with_a_warning(cls_model, tmp_path, capsys, bad, words):
    src = jsonl_with_bad_line(tmp_path, bad)
    out = tmp_path / "preds.jsonl"
    assert cli.main(["predict", str(cls_model), str(src), "-o", str(out), "--on-error", "skip",
                     "--chunk-size", "2", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert f"warning: {src}:4: {words}" in err, err
    assert "skipped 1 bad line(s)" in err and f"predicted {len(TEXTS)}" in err
    got = records(out)
    assert [r["text"] for r in got] == TEXTS
    same(got, at_once(cls_model, [TextExample(t) for t in TEXTS]))


def test_every_line_bad_is_an_error(cls_model, tmp_path, capsys):
    src = tmp_path / "bad.jsonl"
    src.write_text("nope\n{}\n")
    assert cli.main(["predict", str(cls_model), str(src), "--on-error", "skip", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"{src}:1: not valid JSON" in err and f"{src}:2: no field 'text'" in err and "every line is bad" in err


def test_ner_text_lines_in_chunks_equal_one_call(ner_run, tmp_path, capsys):
    folder = ner_run[0]
    lines = ["Peter Blackburn  visited Paris, said Reuters.", "", "John Smith works for Google in London .",
             "Anna Müller 😀 flew to Zürich .", "  ", "\tUnited Nations said on Monday that Hans Muller will lead it ."]
    src = tmp_path / "in.txt"
    src.write_text("\n".join(lines * 5) + "\n", encoding="utf-8")
    examples, offsets = text_examples("ner", read_lines(src))  # the eager reader, as before streaming
    want = at_once(folder, examples, offsets)
    for chunk in ("1", "3", "1000"):
        out = tmp_path / f"out-{chunk}.jsonl"
        assert cli.main(["predict", str(folder), str(src), "-o", str(out), "--chunk-size", chunk,
                         "--device", "cpu"]) == 0
        got = records(out)
        same(got, want)
        for rec in got:
            for ent in rec["entities"]:
                assert rec["text"][ent["start"]:ent["end"]] == ent["text"]
    # standard output: the same records
    capsys.readouterr()
    assert cli.main(["predict", str(folder), str(src), "--chunk-size", "4", "--device", "cpu"]) == 0
    same([json.loads(x) for x in capsys.readouterr().out.splitlines()], want)


def test_conll_in_chunks_keeps_documents_and_columns(ner_run, conll_dir, tmp_path):
    folder = ner_run[0]
    src = conll_dir / "test.conll"
    sentences = read_file(src, "ner", labelled=False)
    pred = Predictor(folder, device="cpu")
    whole = tmp_path / "whole.conll"
    write_conll(whole, sentences, [p[0] for p in pred.predict(sentences)])
    out = tmp_path / "chunked.conll"
    assert cli.main(["predict", str(folder), str(src), "-o", str(out), "--chunk-size", "3", "--device", "cpu"]) == 0
    assert out.read_text() == whole.read_text()
    jsonl = tmp_path / "chunked.jsonl"
    assert cli.main(["predict", str(folder), str(src), "-o", str(jsonl), "--chunk-size", "3", "--device", "cpu"]) == 0
    same(records(jsonl), at_once(folder, sentences))


def test_chunks_cut_only_between_groups():
    items = [Sentence(["w"], None, doc) for doc in (0, 0, 0, 1, 2, 2, 2, 2, 3)]
    plain = [len(c) for c in chunks(items, 2)]
    assert plain == [2, 2, 2, 2, 1]
    by_doc = list(chunks(items, 2, group=lambda s: s.doc))
    assert [[s.doc for s in c] for c in by_doc] == [[0, 0, 0], [1, 2, 2, 2, 2], [3]]


def test_failure_midway_leaves_no_output(ner_run, tmp_path, monkeypatch, capsys):
    """A model error in the third chunk: the old output file stays as it was, and no temporary file remains."""
    folder = ner_run[0]
    src = tmp_path / "in.txt"
    src.write_text("".join(f"John Smith visited London {i} .\n" for i in range(10)))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "preds.jsonl"
    out.write_text("old\n")
    calls = []
    real = Predictor.predict

    def flaky(self, examples, *a, **kw):
        calls.append(len(examples))
        if len(calls) == 3:
            raise RuntimeError("the model broke")
        return real(self, examples, *a, **kw)

    monkeypatch.setattr(Predictor, "predict", flaky)
    with pytest.raises(RuntimeError, match="the model broke"):
        cli.main(["predict", str(folder), str(src), "-o", str(out), "--chunk-size", "4", "--device", "cpu"])
    assert calls == [4, 4, 2]
    assert out.read_text() == "old\n" and [p.name for p in out_dir.iterdir()] == ["preds.jsonl"]


def test_stream_reports_bad_lines_of_every_format(tmp_path):
    def items(name, data: bytes, kind, fmt):
        path = tmp_path / name
        path.write_bytes(data)
        return [(type(x).__name__, x.line, getattr(x, "message", "")) for x in stream_inputs(path, kind, fmt)]

    got = items("t.txt", b"one\n\n caf\xe9 \nthree\r\n", "classify", "text")
    assert [g[:2] for g in got] == [("TextExample", 1), ("BadLine", 3), ("TextExample", 4)]
    assert "byte 0xe9 at character 5" in got[1][2]
    got = items("t.csv", b'id,text\n1,fine\n2,\n3,"multi\nline"\n4,a,b\n5,caf\xe9\n6,last\n', "classify", "csv")
    assert [g[:2] for g in got] == [("TextExample", 2), ("BadLine", 3), ("TextExample", 4), ("BadLine", 6),
                                    ("BadLine", 7), ("TextExample", 8)]
    assert "3 values but 2 header columns" in got[3][2]
    got = items("n.jsonl", b'{"tokens": ["a", "b"]}\n{"tokens": []}\n{"tokens": "a b"}\n{"text": "a"}\n', "ner", "jsonl")
    assert [g[:2] for g in got] == [("Sentence", 1), ("BadLine", 2), ("BadLine", 3), ("BadLine", 4)]
    assert "fields: text" in got[3][2]
    got = items("g.jsonl", b'{"prompt": "copy: a"}\n{"text": "x"}\n', "generate", "jsonl")
    assert [g[:2] for g in got] == [("TextExample", 1), ("BadLine", 2)] and "no field 'prompt'" in got[1][2]
    (tmp_path / "x.conll").write_bytes(b"-DOCSTART- O\n\nJohn\nSmith\n\nM\xfcller\nleft\n\n-DOCSTART- O\n\nBerlin\n")
    got = list(stream_inputs(tmp_path / "x.conll", "ner", "conll"))
    assert [type(x).__name__ for x in got] == ["Sentence", "BadLine", "Sentence"]
    assert (got[0].words, got[0].doc, got[2].words, got[2].doc) == (["John", "Smith"], 0, ["Berlin"], 1)
    assert got[1].line == 6 and "sentence starting at line 6" in got[1].message


def test_stream_memory_does_not_grow_with_the_file(tmp_path):
    """Reading a JSONL file of ~8 MB holds one line at a time: the peak of Python allocations stays far below
    the file's size (the eager reader holds the whole text and every example)."""
    path = tmp_path / "big.jsonl"
    line = json.dumps({"text": "The striker scored twice in the second half of the cup final " * 2}) + "\n"
    with open(path, "w") as f:
        for i in range(60_000):
            f.write(line)
    size = path.stat().st_size
    assert size > 8_000_000
    tracemalloc.start()
    try:
        n = sum(isinstance(x, TextExample) for x in stream_inputs(path, "classify", "jsonl"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n == 60_000
    assert peak < 1_000_000, peak


def test_bad_input_is_a_bad_line_not_an_exception(tmp_path):
    path = tmp_path / "deep.jsonl"
    path.write_text("[" * 100_000 + "\n" + '{"text": "ok"}\n')
    got = list(stream_inputs(path, "classify", "jsonl"))
    assert isinstance(got[0], BadLine) and got[0].line == 1 and isinstance(got[1], TextExample)


def test_max_new_tokens_is_checked(ner_run, tmp_path, capsys):
    assert cli.main(["predict", str(ner_run[0]), "John Smith left .", "--max-new-tokens", "3"]) == 2
    assert "for generation" in capsys.readouterr().err
