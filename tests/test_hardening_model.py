"""Model folders without safetensors weights: every command that loads a folder (train on it, eval, predict,
serve, export, the RL classifier reward) stops with one line naming the folder and what is missing, and says
that pickle weights are refused on purpose and how to convert them; never a traceback."""

import json
import shutil

import pytest

from tunelab import cli
from tunelab.errors import TunelabError


def _without_weights(src, dst, pickle: bool):
    shutil.copytree(src, dst)
    (dst / "model.safetensors").unlink()
    if pickle:
        (dst / "pytorch_model.bin").write_bytes(b"not loaded, ever")
    return dst


@pytest.mark.parametrize("pickle", [True, False])
def test_every_command_refuses_a_folder_without_safetensors(ner_run, conll_dir, tmp_path, capsys, pickle):
    src, _ = ner_run
    d = _without_weights(src, tmp_path / "m", pickle)
    want = "pytorch_model.bin, a pickle file" if pickle else "no model weights (model.safetensors)"
    commands = [
        ["eval", str(d), "--data", str(conll_dir / "test.conll")],
        ["predict", str(d), "Angela Merkel visited Paris ."],
        ["export", str(d), str(tmp_path / "onnx"), "--onnx"],
        ["serve", str(d), "--port", "0"],
    ]
    for argv in commands:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("tunelab: error: "), err
        assert str(d) in err and want in err, err
        assert "Traceback" not in err
    if pickle:
        assert "unpickling a file can run any code" in err and "save_pretrained" in err
    assert not (tmp_path / "onnx").exists()


def test_training_on_such_a_folder_says_the_same(ner_run, conll_dir, tmp_path, capsys):
    from conftest import ner_overrides

    src, _ = ner_run
    d = _without_weights(src, tmp_path / "m", pickle=True)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("task: ner\n")
    assert cli.main(["train", str(recipe), *ner_overrides(conll_dir, d, tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "pytorch_model.bin, a pickle file" in err and str(d) in err
    assert not (tmp_path / "out").exists()  # nothing written for a run that could not start


def test_adapter_and_multitask_folders_are_checked_too(tmp_path, capsys):
    from tunelab.models import require_weights

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.bin").write_bytes(b"x")
    with pytest.raises(TunelabError, match="adapter_model.bin, a pickle file.*adapter_model.safetensors"):
        require_weights(adapter, adapter=True)
    (adapter / "adapter_model.safetensors").write_bytes(b"x")
    require_weights(adapter, adapter=True)  # present: no error (its contents are safetensors' to check)

    mt = tmp_path / "mt"
    mt.mkdir()
    (mt / "tunelab.json").write_text(json.dumps({"task": "multitask", "base_model": "x", "tune": "full",
                                                 "tasks": {"ner": {"task": "ner", "labels": ["O"], "max_length": 8}}}))
    assert cli.main(["export", str(mt), "--task", "ner", str(tmp_path / "one")]) == 2
    err = capsys.readouterr().err
    assert f"{mt}: no model weights (model.safetensors)" in err and "Traceback" not in err


def test_the_pipeline_setting_the_readme_recommends_agrees_with_tunelab_predict(ner_run, conll_dir):
    """README: plain transformers' token-classification pipeline with aggregation_strategy="first" reads a
    word's label from its first sub-token, as tunelab trains and predicts; "simple" does not."""
    from transformers import pipeline

    from tunelab.data import read_file
    from tunelab.data.examples import TextExample
    from tunelab.predict import Predictor

    src, _ = ner_run
    sentences = [" ".join(s.words) for s in read_file(conll_dir / "test.conll", "ner")]
    pred = Predictor(src, device="cpu")
    examples, offsets = pred.task.text_examples([TextExample(t) for t in sentences])
    ours = [sorted((e["type"], e["start"], e["end"]) for e in rec["entities"])
            for rec in pred.task.records(pred.task.labels, examples, pred.predict(examples), offsets)]

    def agreement(strategy: str) -> float:
        tagger = pipeline("token-classification", model=str(src), aggregation_strategy=strategy, device="cpu")
        theirs = [sorted((e["entity_group"], e["start"], e["end"]) for e in out) for out in tagger(sentences)]
        return sum(a == b for a, b in zip(ours, theirs)) / len(sentences)

    first = agreement("first")
    assert sum(map(len, ours)) > 0 and first >= 0.9, first
    assert first >= agreement("simple")


def test_a_folder_trained_on_other_labels_gets_a_new_head(ner_run, tmp_path, caplog):
    """Re-training a fine-tuned NER folder on another label set: the backbone is kept, the head starts anew
    (with a warning), instead of transformers' shape error; the same labels keep the trained head."""
    import logging

    import torch

    from tunelab.models import load_model

    src, _ = ner_run
    labels = json.loads((src / "tunelab.json").read_text())["labels"]
    trained = load_model(src, "ner", labels)
    with caplog.at_level(logging.WARNING, logger="tunelab.models"):
        same = load_model(src, "ner", labels)
    assert not caplog.records
    assert torch.equal(same.classifier.weight, trained.classifier.weight)

    for other in (["O", "B-X", "I-X"], list(reversed(labels))):  # another count; the same count, other meaning
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="tunelab.models"):
            model = load_model(src, "ner", other)
        assert "its head was trained for the labels" in caplog.text and "starts anew" in caplog.text
        assert model.config.id2label == dict(enumerate(other)) and model.classifier.out_features == len(other)
        if len(other) == len(labels):
            assert not torch.equal(model.classifier.weight, trained.classifier.weight)
        assert torch.equal(model.bert.embeddings.word_embeddings.weight, trained.bert.embeddings.word_embeddings.weight)
