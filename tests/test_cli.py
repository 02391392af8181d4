"""The `tunelab` command: help, and train -> eval -> predict on the tiny model."""

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ner_overrides
from tunelab import cli
from tunelab.data.conll import read_conll

REPO = Path(__file__).resolve().parents[1]


def test_console_script_help():
    exe = Path(sys.executable).parent / "tunelab"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "tunelab"]
    r = subprocess.run(cmd + ["--help"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    for word in ("train", "eval", "predict"):
        assert word in r.stdout


@pytest.mark.parametrize("argv, words", [
    ([], ["train", "eval", "predict", "examples:"]),
    (["train"], ["recipe", "key.sub=value", "--resume", "--overwrite"]),
    (["eval"], ["model_dir", "--data", "--output", "--predictions", "--tag-scheme"]),
    (["predict"], ["model_dir", "input", "--output", "--format", "--batch-size", "--on-error", "--chunk-size"]),
    (["export"], ["model_dir", "output", "--task", "--onnx", "--atol", "--check-data"]),
])
def test_help(capsys, argv, words):
    with pytest.raises(SystemExit) as e:
        cli.main(argv + ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for w in words:
        assert w in out, w


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, conll_dir, tiny_model_dir):
    """`tunelab train` on the made-up CoNLL files; returns (model folder, exit code, stdout)."""
    tmp = tmp_path_factory.mktemp("cli")
    recipe = tmp / "recipe.yaml"
    recipe.write_text("task: ner\ntrain:\n  epochs: 8\n", encoding="utf-8")
    out = tmp / "model"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli.main(["train", str(recipe)] + ner_overrides(conll_dir, tiny_model_dir, out, **{"train.epochs": 8}))
    return out, rc, buf.getvalue()


def test_cli_train(cli_run):
    out, rc, stdout = cli_run
    assert rc == 0
    assert "== dev ==" in stdout and "== test ==" in stdout
    assert "| PER |" in stdout and "micro" in stdout
    assert str(out) in stdout
    assert (out / "model.safetensors").is_file() and (out / "tunelab.json").is_file()
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 48 and report["test"]["main"] > 0.5


def test_cli_eval(cli_run, conll_dir, capsys, tmp_path):
    out, _, _ = cli_run
    metrics_path = tmp_path / "metrics.json"
    preds_path = tmp_path / "preds.conll"
    assert cli.main(["eval", str(out), "--data", str(conll_dir / "test.conll"), "--output", str(metrics_path),
                     "--predictions", str(preds_path), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "| type | precision | recall | F1 | support |" in printed
    for etype in ("LOC", "ORG", "PER"):
        assert f"| {etype} |" in printed
    metrics = json.loads(metrics_path.read_text())
    report = json.loads((out / "report.json").read_text())
    assert metrics["main"] == pytest.approx(report["test"]["main"])  # same weights, same data, same score
    assert metrics["micro"]["support"] == report["test"]["micro"]["support"] > 0
    gold = read_conll(conll_dir / "test.conll")
    written = read_conll(preds_path, tag_column=1)  # word gold pred
    assert [s.words for s in written] == [s.words for s in gold]
    assert [s.tags for s in written] == [s.tags for s in gold]


def test_cli_eval_label_unknown_to_model(cli_run, tmp_path, capsys):
    out, _, _ = cli_run
    data = tmp_path / "misc.conll"
    data.write_text("Peter B-PER\nlikes O\nEuropean B-MISC\nfood O\n", encoding="utf-8")
    assert cli.main(["eval", str(out), "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert "misc.conll:1" in err and "B-MISC" in err and "Traceback" not in err


def test_cli_predict_literal_sentence(cli_run, capsys):
    out, _, _ = cli_run
    text = "Peter Blackburn  visited Paris, said Reuters."
    assert cli.main(["predict", str(out), text, "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    rec = json.loads(lines[0])
    assert rec["text"] == text
    assert rec["tokens"] == ["Peter", "Blackburn", "visited", "Paris", ",", "said", "Reuters", "."]
    assert len(rec["tags"]) == len(rec["tokens"])
    assert rec["entities"], rec
    for ent in rec["entities"]:
        assert text[ent["start"]:ent["end"]] == ent["text"]
        assert ent["type"] in ("PER", "LOC", "ORG") and 0 < ent["score"] <= 1
    found = {(e["type"], e["text"]) for e in rec["entities"]}
    assert ("PER", "Peter Blackburn") in found and ("LOC", "Paris") in found
    per = next(e for e in rec["entities"] if e["text"] == "Peter Blackburn")
    assert (per["start"], per["end"]) == (0, 15)


def test_cli_predict_text_file_lines(cli_run, tmp_path):
    out, _, _ = cli_run
    src = tmp_path / "in.txt"
    src.write_text("John Smith visited London .\n\nSiemens opened an office in Tokyo .\n", encoding="utf-8")
    dst = tmp_path / "out.jsonl"
    assert cli.main(["predict", str(out), str(src), "-o", str(dst)]) == 0
    recs = [json.loads(x) for x in dst.read_text().splitlines()]
    assert [r["text"] for r in recs] == ["John Smith visited London .", "Siemens opened an office in Tokyo ."]
    for r in recs:
        for ent in r["entities"]:
            assert r["text"][ent["start"]:ent["end"]] == ent["text"]
    assert ("LOC", "London") in {(e["type"], e["text"]) for e in recs[0]["entities"]}


def test_cli_predict_conll_file(cli_run, conll_dir, tmp_path):
    out, _, _ = cli_run
    dst = tmp_path / "out.conll"
    assert cli.main(["predict", str(out), str(conll_dir / "test.conll"), "-o", str(dst)]) == 0
    src = read_conll(conll_dir / "test.conll")
    labels = set(json.loads((out / "tunelab.json").read_text())["labels"])
    rows = [line.split() for line in dst.read_text().splitlines() if line.strip()]
    tokens = [r for r in rows if r[0] != "-DOCSTART-"]
    assert all(len(r) == 2 for r in tokens)  # word prediction
    assert [r[0] for r in tokens] == [w for s in src for w in s.words]
    assert {r[1] for r in tokens} <= labels
    assert sum(r[0] == "-DOCSTART-" for r in rows) == len({s.doc for s in src}) - 1
    pred = read_conll(dst)
    assert [s.words for s in pred] == [s.words for s in src]
    correct = sum(p == g for ps, gs in zip(pred, src) for p, g in zip(ps.tags, gs.tags))
    assert correct / sum(len(s.words) for s in src) > 0.8


def test_cli_predict_missing_file(cli_run, capsys):
    out, _, _ = cli_run
    assert cli.main(["predict", str(out), "no/such/file.txt"]) == 2
    assert "no/such/file.txt" in capsys.readouterr().err


def test_cli_eval_builtin_split(cli_run, capsys):
    out, _, _ = cli_run
    # CoNLL-2003 has MISC entities; the made-up training data had none: said plainly, not scored as misses
    assert cli.main(["eval", str(out), "--data", "conll2003:dev"]) == 2
    err = capsys.readouterr().err
    assert "valid.txt" in err and "MISC" in err
    assert cli.main(["eval", str(out), "--data", "conll2003:validation"]) == 2
    assert "split must be train, dev or test" in capsys.readouterr().err
