"""A sweep of user mistakes over every command: each ends with exit 2 and one `tunelab: error:` line that
names what is wrong, never a Python traceback."""


from tunelab import cli


def mistakes(tmp_path, ner_dir, conll_dir):
    """(argv, words the message must hold) for mistakes a user makes with each command."""
    missing = tmp_path / "nope"
    not_a_model = tmp_path / "plain"
    not_a_model.mkdir(exist_ok=True)
    (not_a_model / "notes.txt").write_text("hello\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("task: ner\ntrain: {epochs: -1}\n")
    columns = tmp_path / "cols.txt"
    columns.write_text("EU B-ORG\nrejects O\n\nPeter B-PER\n")
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "ok"}\n{"text": \n')
    nul = tmp_path / "nul.conll"
    nul.write_text("Pe\x00ter B-PER\nleft O\n")
    return [
        (["train", str(missing / "r.yaml")], "no such recipe file"),
        (["train", str(recipe)], "train.epochs"),
        (["train", str(recipe), "train.epochs=1", f"data.train={conll_dir / 'train.conll'}",
          "model.name=" + str(not_a_model)], "no config.json"),
        (["train", str(recipe), "train.epochs=1", f"data.train={nul}", f"output_dir={tmp_path / 'o'}"],
         "control character U+0000"),
        (["eval", str(missing), "--data", str(conll_dir / "test.conll")], "not a tunelab model folder"),
        (["eval", str(ner_dir), "--data", str(missing / "x.conll")], "no such file"),
        (["eval", str(ner_dir), "--data", str(nul)], "control character U+0000"),
        (["predict", str(not_a_model), "some text"], "not a tunelab model folder"),
        (["predict", str(ner_dir), str(missing / "x.txt")], "no such file"),
        (["predict", str(ner_dir), str(columns)], "--format conll"),
        (["predict", str(ner_dir), str(bad_json)], "bad line"),
        (["predict", str(ner_dir), "x", "--task", "ner"], "not a multi-task folder"),
        (["export", str(ner_dir), str(tmp_path / "e")], "not a multi-task folder"),
        (["export", str(missing), str(tmp_path / "e2"), "--onnx"], "not a tunelab model folder"),
        (["serve", str(missing)], "not a tunelab model folder"),
        (["serve", str(ner_dir), "--max-batch", "0"], "max"),
        (["runs", str(missing)], "no such folder"),
        (["runs", str(not_a_model)], "no runs here"),
        (["compare", str(ner_dir), "--out", str(tmp_path / "c.txt")], "PNG"),
    ]


def test_every_command_answers_a_mistake_with_one_line(ner_run, conll_dir, tmp_path, capsys):
    ner_dir, _ = ner_run
    for argv, words in mistakes(tmp_path, ner_dir, conll_dir):
        code = cli.main(argv)
        err = capsys.readouterr().err
        assert code == 2, (argv, err)
        assert "Traceback" not in err, (argv, err)
        errors = [line for line in err.splitlines() if line.startswith("tunelab: error: ")]
        assert len(errors) == 1 and words in errors[0], (argv, err)
    assert not (tmp_path / "o").exists()
