"""First-run friendliness: the messages a new user needs when an input is empty, unreadable for the model's
tokenizer, or a run has no dev split or learns nothing on dev."""

from tunelab import cli
from tunelab.config import load_config
from tunelab.train import train

CHINESE = "我们在北京的大学里学习中文和历史"


def test_predict_on_an_empty_file_names_the_file(ner_run, tmp_path, capsys):
    src, _ = ner_run
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert cli.main(["predict", str(src), str(empty)]) == 2
    assert f"tunelab: error: {empty}: no examples to predict (empty input?)" in capsys.readouterr().err


def test_eval_and_predict_warn_on_text_the_tokenizer_cannot_read(ner_run, tmp_path, capsys):
    src, _ = ner_run
    lines = tmp_path / "zh.txt"
    lines.write_text(CHINESE + "\n", encoding="utf-8")
    assert cli.main(["predict", str(src), str(lines), "-o", str(tmp_path / "out.jsonl")]) == 0
    err = capsys.readouterr().err
    assert f"tunelab: warning: {lines}: " in err and "[UNK] for this model's tokenizer" in err

    conll = tmp_path / "zh.conll"
    conll.write_text("".join(f"{ch} O\n" for ch in CHINESE) + "\n", encoding="utf-8")
    assert cli.main(["eval", str(src), "--data", str(conll)]) == 0
    assert "[UNK] for this model's tokenizer" in capsys.readouterr().err

    english = tmp_path / "en.txt"
    english.write_text("Angela Merkel visited Paris .\n")
    assert cli.main(["predict", str(src), str(english), "-o", str(tmp_path / "en.jsonl")]) == 0
    assert "[UNK]" not in capsys.readouterr().err


def test_a_run_says_when_it_has_no_dev_split_and_when_dev_stays_at_zero(conll_dir, tiny_model_dir, tmp_path, capsys):
    from conftest import tiny_overrides

    cfg = load_config(None, tiny_overrides(tiny_model_dir, tmp_path / "nodev", task="ner",
                                           **{"data.train": conll_dir / "train.conll", "train.epochs": 0.1}))
    train(cfg)
    assert "no dev split: no model selection" in capsys.readouterr().err

    # A dev set without entities: entity F1 is 0 whatever the model predicts.
    dev = tmp_path / "dev_o.conll"
    dev.write_text("".join(" ".join(line.split()[:-1] + ["O"]) + "\n" if line.strip() and
                           not line.startswith("-DOCSTART-") else line + "\n"
                           for line in (conll_dir / "dev.conll").read_text().splitlines()))
    cfg = load_config(None, tiny_overrides(tiny_model_dir, tmp_path / "zero", task="ner",
                                           **{"data.train": conll_dir / "train.conll", "data.dev": dev,
                                              "train.epochs": 0.1}))
    report = train(cfg)
    err = capsys.readouterr().err
    assert "no dev split" not in err and [e["dev"] for e in report["evals"]] == [0.0]
    assert "dev entity micro-F1 stayed at 0 over 1 evaluation(s)" in err and "train.epochs" in err

    cfg = load_config(None, tiny_overrides(tiny_model_dir, tmp_path / "some", task="ner",
                                           **{"data.train": conll_dir / "train.conll",
                                              "data.dev": conll_dir / "dev.conll", "train.epochs": 8}))
    report = train(cfg)
    assert report["dev"]["main"] > 0 and "stayed at 0" not in capsys.readouterr().err
