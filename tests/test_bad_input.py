"""A user's mistake is a TunelabError naming file:line (or the key); the CLI prints one line and exits 2."""

import json

import pytest

from tunelab import cli
from tunelab.config import load_config, to_yaml
from tunelab.data import check_labels
from tunelab.data.conll import read_conll
from tunelab.data.text import read_csv, read_jsonl, read_jsonl_sentences
from tunelab.errors import TunelabError


def write(path, text, encoding="utf-8"):
    path.write_bytes(text.encode(encoding) if isinstance(text, str) else text)
    return path


def recipe(tmp_path, train, task="ner", extra="") -> str:
    p = tmp_path / "recipe.yaml"
    p.write_text(f"task: {task}\noutput_dir: {tmp_path / 'out'}\ndata:\n  train: {train}\n{extra}",
                 encoding="utf-8")
    return str(p)


def run_cli(capsys, args) -> str:
    """Run the CLI, expect exit code 2 and one line on stderr without a traceback; return that line."""
    rc = cli.main(args)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("tunelab: error: ")
    return lines[0]


def test_malformed_conll_line(tmp_path, capsys):
    p = write(tmp_path / "bad.conll", "EU B-ORG\nrejects O\n\nPeter\nBlackburn I-PER\n")
    with pytest.raises(TunelabError, match=r"bad\.conll:4"):
        read_conll(p)
    msg = run_cli(capsys, ["train", recipe(tmp_path, p)])
    assert "bad.conll:4" in msg


def test_conll_inconsistent_columns_and_bad_tag(tmp_path):
    with pytest.raises(TunelabError, match=r"c\.conll:2.*columns"):
        read_conll(write(tmp_path / "c.conll", "EU NNP B-ORG\nrejects O\n"))
    with pytest.raises(TunelabError, match=r"t\.conll:3.*'X-PER'"):
        read_conll(write(tmp_path / "t.conll", "a O\n\nPeter X-PER\n"))


def test_jsonl_tokens_tags_count(tmp_path, capsys):
    p = write(tmp_path / "ner.jsonl", json.dumps({"tokens": ["a", "b"], "tags": ["O", "O"]}) + "\n" +
              json.dumps({"tokens": ["Peter", "Blackburn", "spoke"], "tags": ["B-PER", "I-PER"]}) + "\n")
    with pytest.raises(TunelabError, match=r"ner\.jsonl:2.*'tags'"):
        read_jsonl_sentences(p)
    msg = run_cli(capsys, ["train", recipe(tmp_path, p)])
    assert "ner.jsonl:2" in msg


def test_bad_json_line(tmp_path):
    with pytest.raises(TunelabError, match=r"j\.jsonl:2.*JSON"):
        read_jsonl(write(tmp_path / "j.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", label: 1}\n'))


def test_dev_label_never_seen_in_training(tmp_path, capsys):
    train = write(tmp_path / "train.conll", "Peter B-PER\nspoke O\n\nin O\nParis B-LOC\n")
    dev = write(tmp_path / "dev.conll", "Peter B-PER\n\nThe O\nGoogle B-ORG\nboss O\n")
    with pytest.raises(TunelabError, match=r"dev\.conll:3.*'B-ORG'"):
        check_labels(read_conll(train), {"dev": read_conll(dev)})
    msg = run_cli(capsys, ["train", recipe(tmp_path, train, extra=f"  dev: {dev}\n")])
    assert "dev.conll:3" in msg and "B-ORG" in msg


def test_test_label_never_seen_in_training_classify(tmp_path):
    train = write(tmp_path / "train.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n')
    test = write(tmp_path / "test.csv", "text,label\nc,x\nd,z\n")
    with pytest.raises(TunelabError, match=r"test\.csv:3.*'z'"):
        check_labels(read_jsonl(train), {"test": read_csv(test)})


@pytest.mark.parametrize("name", ["empty.conll", "empty.jsonl", "empty.csv"])
def test_empty_file(tmp_path, capsys, name):
    p = write(tmp_path / name, "" if not name.endswith(".csv") else "text,label\n")
    task = "ner" if name.endswith(".conll") else "classify"
    msg = run_cli(capsys, ["train", recipe(tmp_path, p, task=task)])
    assert name in msg and "empty" in msg


def test_unknown_config_key(tmp_path, capsys, conll_dir):
    with pytest.raises(TunelabError, match="'train.lrr'"):
        load_config(None, ["data.train=x.conll", "train.lrr=1e-4"])
    msg = run_cli(capsys, ["train", recipe(tmp_path, conll_dir / "train.conll"), "train.lrr=1e-4"])
    assert "'train.lrr'" in msg and "lr" in msg  # names the key and lists the valid ones
    msg = run_cli(capsys, ["train", recipe(tmp_path, conll_dir / "train.conll", extra="modle:\n  name: x\n")])
    assert "recipe.yaml" in msg and "'modle'" in msg


def test_wrong_type(tmp_path, capsys, conll_dir):
    with pytest.raises(TunelabError, match="'train.lr'.*abc"):
        load_config(None, ["data.train=x.conll", "train.lr=abc"])
    with pytest.raises(TunelabError, match="'train.batch_size'"):
        load_config(None, ["data.train=x.conll", "train.batch_size=2.5"])
    with pytest.raises(TunelabError, match="'task'"):
        load_config(None, ["data.train=x.conll", "task=parse"])
    msg = run_cli(capsys, ["train", recipe(tmp_path, conll_dir / "train.conll"), "train.lr=abc"])
    assert "'train.lr'" in msg


def test_types_accepted():
    cfg = load_config(None, ["data.train=x.conll", "train.lr=3e-5", "train.epochs=2", "train.patience=null",
                             "model.dropout=0.2"])
    assert cfg.train.lr == 3e-5 and isinstance(cfg.train.epochs, float) and cfg.train.patience is None
    assert cfg.model.dropout == 0.2


def test_bad_yaml_recipe(tmp_path, capsys):
    p = write(tmp_path / "bad.yaml", "task: ner\ndata:\n  train: [a.conll\n  dev: b\n")
    with pytest.raises(TunelabError, match=r"bad\.yaml:\d+: invalid YAML"):
        load_config(p)
    msg = run_cli(capsys, ["train", str(p)])
    assert "bad.yaml:" in msg and "invalid YAML" in msg
    msg = run_cli(capsys, ["train", str(tmp_path / "missing.yaml")])
    assert "missing.yaml" in msg


def test_missing_model_path(tmp_path, capsys, conll_dir):
    msg = run_cli(capsys, ["train", recipe(tmp_path, conll_dir / "train.conll"), "model.name=/nonexistent"])
    assert "/nonexistent" in msg


def test_corrected_rerun_is_not_blocked(tmp_path, capsys, conll_dir, tiny_model_dir):
    """A run stopped by a mistake in its data or model path leaves no output folder that would make the
    corrected command fail with 'already holds files'."""
    r = recipe(tmp_path, conll_dir / "train.conll")
    run_cli(capsys, ["train", r, "model.name=/nonexistent"])
    run_cli(capsys, ["train", recipe(tmp_path, write(tmp_path / "bad.conll", "Peter\n"))])
    assert not (tmp_path / "out").exists()
    r = recipe(tmp_path, conll_dir / "train.conll")
    assert cli.main(["train", r, f"model.name={tiny_model_dir}", "train.epochs=1", "train.threads=2",
                     "train.device=cpu"]) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_model_folder_without_config(tmp_path, capsys, conll_dir):
    (tmp_path / "empty_model").mkdir()
    msg = run_cli(capsys, ["train", recipe(tmp_path, conll_dir / "train.conll"),
                           f"model.name={tmp_path / 'empty_model'}"])
    assert "config.json" in msg


def test_output_dir_already_holds_run(tmp_path, capsys, conll_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.yaml").write_text("task: ner\n")
    (out / "model.safetensors").write_bytes(b"x")
    msg = run_cli(capsys, ["train", recipe(tmp_path, conll_dir / "train.conll")])
    assert str(out) in msg and "--resume" in msg and "--overwrite" in msg
    assert (out / "model.safetensors").read_bytes() == b"x"  # nothing was touched


def test_resume_with_different_config(tmp_path, capsys, conll_dir):
    r = recipe(tmp_path, conll_dir / "train.conll")
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.yaml").write_text(to_yaml(load_config(r)), encoding="utf-8")
    (out / "checkpoint").mkdir()
    msg = run_cli(capsys, ["train", r, "train.lr=1e-3", "--resume"])
    assert "train.lr" in msg


@pytest.mark.parametrize("name", ["latin1.conll", "latin1.jsonl"])
def test_non_utf8_file(tmp_path, capsys, name):
    text = "Müller B-PER\nsprach O\n" if name.endswith(".conll") else '{"text": "café", "label": "a"}\n'
    p = write(tmp_path / name, text, encoding="latin-1")
    task = "ner" if name.endswith(".conll") else "classify"
    msg = run_cli(capsys, ["train", recipe(tmp_path, p, task=task)])
    assert name in msg and "UTF-8" in msg


def test_predict_on_missing_model_folder(tmp_path, capsys):
    msg = run_cli(capsys, ["predict", str(tmp_path), "Angela Merkel visited Paris ."])
    assert "tunelab.json" in msg


@pytest.mark.parametrize("name, task", [("e.conll", "ner"), ("e.jsonl", "ner"), ("e.jsonl", "classify"),
                                        ("e.csv", "classify"), ("e.txt", "ner")])
def test_empty_and_non_utf8_raise(tmp_path, name, task):
    from tunelab.data import read_file

    empty = write(tmp_path / name, "\n\n")
    with pytest.raises(TunelabError, match=rf"{name}(: no (sentences|examples|text)|:1: header has no column)"):
        read_file(empty, task)
    latin = write(tmp_path / ("l" + name), "Müller B-PER\n", encoding="latin-1")
    with pytest.raises(TunelabError, match=rf"l{name}: not UTF-8"):
        read_file(latin, task)


def test_missing_model_path_raises():
    from tunelab.models import resolve_model_path

    with pytest.raises(TunelabError, match="'/nonexistent'.*never downloads"):
        resolve_model_path("/nonexistent")


def test_data_the_tokenizer_cannot_read_is_refused_before_output_is_written(tmp_path, capsys, tiny_model_dir):
    # Rare CJK characters: the packaged (English, uncased) WordPiece vocabulary has none of them.
    lines = []
    for i in range(6):
        lines += ["鑫 B-PER", "淼 I-PER", "犇 O", "骉 B-LOC", ""]
    train = write(tmp_path / "zh.conll", "\n".join(lines) + "\n")
    msg = run_cli(capsys, ["train", recipe(tmp_path, train, extra=f"model:\n  name: {tiny_model_dir}\n")])
    assert "[UNK]" in msg and "model.max_unk_share" in msg
    assert not (tmp_path / "out").exists()  # the corrected rerun is not blocked by a half-made run folder
