"""ONNX export of encoder models: onnxruntime's logits match PyTorch's on real inputs of other batch sizes and
lengths than the export example; generation models and bad parity are refused, leaving nothing behind."""

import json

import numpy as np
import pytest

from tunelab import cli
from tunelab.data.examples import TextExample
from tunelab.predict import Predictor, feature_logits, text_examples


def onnx_logits(folder, texts, kind):
    """Logits from the exported folder alone (onnxruntime + its tokenizer, no tunelab model), one batch."""
    import onnxruntime as ort
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    enc = tok(texts, padding=True, return_tensors="np")
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"input_ids": enc["input_ids"].astype(np.int64),
                                         "attention_mask": enc["attention_mask"].astype(np.int64)})
    return logits, enc["attention_mask"]


TEXTS = ["John Smith works for Google in London .", "Siemens opened an office in Tokyo .", "Paris"]


@pytest.mark.parametrize("which", ["ner", "classify"])
def test_export_matches_pytorch(which, ner_run, cls_model, tmp_path, capsys):
    folder = ner_run[0] if which == "ner" else cls_model
    out = tmp_path / "onnx"
    assert cli.main(["export", str(folder), str(out), "--onnx"]) == 0
    assert "max |difference|" in capsys.readouterr().out
    assert {"model.onnx", "onnx.json", "config.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    doc = json.loads((out / "onnx.json").read_text())
    pred = Predictor(folder, device="cpu")
    assert doc["task"] == which and doc["labels"] == pred.meta["labels"]
    assert doc["parity"]["passed"] and doc["parity"]["max_abs_diff"] <= 1e-4
    # the parity check ran other batch shapes than the export example (2 inputs)
    assert any(shape[0] != 2 for shape in doc["parity"]["batch_shapes"])
    assert len({shape[1] for shape in doc["parity"]["batch_shapes"]}) > 1 or which == "classify"

    # Independently of the exporter's own check: the folder alone (plain tokenizer, onnxruntime) gives the
    # logits tunelab computes (for these texts the plain tokenizer and tunelab's word split agree).
    from transformers import AutoConfig, AutoTokenizer

    got, mask = onnx_logits(out, TEXTS, which)
    examples, _ = text_examples(which, [TextExample(t) for t in TEXTS])
    task, model = pred.use()
    features = task.encode(examples, training=False)
    assert [f["input_ids"] for f in features] == AutoTokenizer.from_pretrained(str(out))(TEXTS)["input_ids"]
    want = feature_logits(model, features, task.pad, pred.device)
    for row, w in enumerate(want):
        np.testing.assert_allclose(got[row, : int(mask[row].sum())] if which == "ner" else got[row], w, atol=1e-4)
    assert AutoConfig.from_pretrained(str(out)).id2label[0] == pred.meta["labels"][0]


def test_export_of_a_multitask_task(tmp_path, conll_dir, cls_dir, tiny_model_dir, capsys):
    from tunelab import finetune

    mt = tmp_path / "mt"
    values = {"task": "multitask", "model.name": tiny_model_dir, "output_dir": mt, "train.threads": 1,
              "train.epochs": 1, "train.batch_size": 8, "train.device": "cpu", "train.bf16": False,
              "tasks.ner.task": "ner", "tasks.ner.data.train": conll_dir / "train.conll",
              "tasks.ner.data.dev": conll_dir / "dev.conll", "tasks.topic.task": "classify",
              "tasks.topic.data.train": cls_dir / "train.jsonl", "tasks.topic.data.dev": cls_dir / "dev.jsonl"}
    finetune(None, [f"{k}={v}" for k, v in values.items()])
    assert cli.main(["export", str(mt), str(tmp_path / "x"), "--onnx"]) == 2
    assert "name one with --task" in capsys.readouterr().err
    assert cli.main(["export", str(mt), str(tmp_path / "y")]) == 2
    assert "name one with --task" in capsys.readouterr().err
    out = tmp_path / "topic-onnx"
    assert cli.main(["export", str(mt), "--task", "topic", str(out), "--onnx"]) == 0
    doc = json.loads((out / "onnx.json").read_text())
    assert doc["task"] == "classify" and doc["exported_from"]["task"] == "topic" and doc["parity"]["passed"]
    # the plain (transformers) export still works beside it
    assert cli.main(["export", str(mt), "--task", "ner", str(tmp_path / "ner-plain")]) == 0


def test_failed_parity_fails_loudly_and_writes_nothing(ner_run, tmp_path, capsys, monkeypatch):
    """A graph whose logits are off by 1e-3 on one input (as a broken export would be) is not written."""
    import onnxruntime as ort

    real = ort.InferenceSession.run

    def off(self, names, feeds, *a, **kw):
        out = real(self, names, feeds, *a, **kw)
        out[0][0] += 1e-3
        return out

    monkeypatch.setattr(ort.InferenceSession, "run", off)
    out = tmp_path / "onnx"
    assert cli.main(["export", str(ner_run[0]), str(out), "--onnx"]) == 2
    err = capsys.readouterr().err
    assert "ONNX parity check failed" in err and "above the tolerance 0.0001" in err and "nothing was written" in err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == []


def test_check_data_file_and_refusals(ner_run, tmp_path, capsys):
    data = tmp_path / "check.txt"
    data.write_text("Hans Muller left Berlin .\nThe talks ended .\nAnna visited Madrid and Paris .\n")
    out = tmp_path / "onnx"
    assert cli.main(["export", str(ner_run[0]), str(out), "--onnx", "--check-data", str(data)]) == 0
    assert json.loads((out / "onnx.json").read_text())["parity"]["features"] == 3
    assert cli.main(["export", str(ner_run[0]), str(out), "--onnx"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_generation_models_are_refused(tmp_path, gen_dir, tiny_causal_dir, capsys):
    from conftest import gen_overrides
    from tunelab import finetune

    gen = tmp_path / "gen"
    finetune(None, gen_overrides(gen_dir, tiny_causal_dir, gen, **{"train.epochs": 1, "train.threads": 1}))
    out = tmp_path / "onnx"
    assert cli.main(["export", str(gen), str(out), "--onnx"]) == 2
    err = capsys.readouterr().err
    assert "generation model" in err and "encoder models" in err
    assert not out.exists()
