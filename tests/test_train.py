"""The supervised recipe end to end on a tiny random BERT: learning, output folder, plain-transformers
compatibility, early stopping, exact resume after a kill, gradient accumulation."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import kill_after_first_checkpoint, ner_overrides, plain_transformers_tags, tiny_overrides
from tunelab import cli
from tunelab.config import load_config
from tunelab.data.conll import read_conll
from tunelab.data.text import read_jsonl
from tunelab.predict import Predictor
from tunelab.train import checkpoint, train

REPO = Path(__file__).resolve().parents[1]


def mean(xs):
    return sum(xs) / len(xs)


def weights(folder) -> dict:
    return load_file(str(Path(folder) / "model.safetensors"))


def assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# --- NER ---------------------------------------------------------------------------------------------------


def test_ner_loss_goes_down_and_model_learns(ner_run):
    out, report = ner_run
    losses = [h["loss"] for h in report["history"]]
    assert report["steps"] == report["total_steps"] == len(losses) == 48
    assert mean(losses[-5:]) < 0.6 * mean(losses[:5])
    assert [h["step"] for h in report["history"]] == list(range(1, 49))
    assert report["test"]["main"] > 0.5  # entity micro-F1 on made-up but learnable patterns
    assert report["dev"]["main"] == max(e["dev"] for e in report["evals"])
    assert report["best_step"] in [e["step"] for e in report["evals"]]
    assert 0 <= report["padding_share"] < 0.5 and report["train_tokens"] > 0


def test_ner_weights_change(ner_run, tiny_model_dir):
    out, _ = ner_run
    before, after = weights(tiny_model_dir), weights(out)
    shared = [k for k in before if not k.startswith("pooler.")]  # no pooler in a token-classification model
    changed = [k for k in shared if not torch.equal(before[k], after["bert." + k])]
    assert "embeddings.word_embeddings.weight" in changed
    assert any(k.startswith("encoder.layer.1.") for k in changed)
    assert after["classifier.weight"].shape == (7, 32)


def test_ner_output_folder(ner_run):
    out, report = ner_run
    names = {p.name for p in out.iterdir()}
    for f in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "tunelab.json",
              "config.yaml", "report.json", "report.md", "curves.png"):
        assert f in names, f
    assert not {"checkpoint", checkpoint.BEST, ".model.tmp", ".checkpoint.old", ".checkpoint.tmp"} & names
    assert not any(n.endswith((".bin", ".pt", ".tmp")) for n in names)
    cfg = json.loads((out / "config.json").read_text())
    labels = ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
    assert cfg["id2label"] == {str(i): lab for i, lab in enumerate(labels)}
    assert cfg["label2id"] == {lab: i for i, lab in enumerate(labels)}
    meta = json.loads((out / "tunelab.json").read_text())
    assert meta["task"] == "ner" and meta["labels"] == labels and meta["max_length"] == 128
    saved = json.loads((out / "report.json").read_text())
    assert saved["test"]["main"] == pytest.approx(report["test"]["main"])
    assert load_config(out / "config.yaml").output_dir == str(out)  # the resolved config loads back
    md = (out / "report.md").read_text()
    assert "## Test" in md and "| PER |" in md
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ner_plain_transformers_matches_predictor(ner_run, conll_dir):
    from transformers import AutoModelForTokenClassification

    out, report = ner_run
    sents = read_conll(conll_dir / "test.conll")
    assert AutoModelForTokenClassification.from_pretrained(str(out)).config.id2label[0] == "O"
    plain = plain_transformers_tags(out, sents)
    ours = Predictor(out, device="cpu").predict(sents)
    assert [p[0] for p in ours] == plain
    assert sum(t != "O" for tags in plain for t in tags) > 10  # it predicts entities at all
    # and the Predictor reproduces the report's test score
    from tunelab.metrics import entity_metrics

    assert entity_metrics([s.tags for s in sents], plain)["main"] == pytest.approx(report["test"]["main"])


# --- classification ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory, cls_dir, tiny_model_dir):
    out = tmp_path_factory.mktemp("cls-run") / "out"
    cfg = load_config(None, tiny_overrides(tiny_model_dir, out, task="classify", **{
        "data.train": cls_dir / "train.jsonl", "data.dev": cls_dir / "dev.csv", "data.test": cls_dir / "test.jsonl",
        # a random tiny BERT learns from [CLS] slowly: more, smaller steps at a higher rate than for NER
        "train.epochs": 8, "train.batch_size": 4, "train.lr": 5e-3, "train.warmup_ratio": 0.1}))
    return out, train(cfg)


def test_classify_run(cls_run):
    out, report = cls_run
    losses = [h["loss"] for h in report["history"]]
    assert len(losses) == report["steps"] == 96
    assert mean(losses[-5:]) < 0.7 * mean(losses[:5])
    test = report["test"]
    assert test["confusion"]["labels"] == ["business", "sport", "tech"]
    m = test["confusion"]["matrix"]
    assert len(m) == 3 and all(len(r) == 3 for r in m) and sum(map(sum, m)) == 12
    assert sum(m[i][i] for i in range(3)) / 12 == pytest.approx(test["accuracy"])
    assert test["accuracy"] > 0.5  # three classes: chance is a third
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "confusion.png", "curves.png", "report.md"} <= names
    assert "checkpoint" not in names
    assert "Confusion" in (out / "report.md").read_text()


def test_classify_plain_transformers_matches_predictor(cls_run, cls_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out, _ = cls_run
    examples = read_jsonl(cls_dir / "test.jsonl", labelled=False)
    tok = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    enc = tok([e.text for e in examples], padding=True, return_tensors="pt")
    with torch.no_grad():
        probs = model(**enc).logits.softmax(-1)
    plain = [model.config.id2label[int(k)] for k in probs.argmax(-1)]
    ours = Predictor(out, device="cpu").predict(examples)
    assert [p[0] for p in ours] == plain
    for (label, p), row in zip(ours, probs):
        assert p == pytest.approx(row.tolist(), abs=1e-4)


def test_python_api_in_memory(tmp_path, tiny_model_dir):
    import tunelab

    recs = [{"text": f"good great fine {i}", "label": "pos"} if i % 2 else {"text": f"bad awful {i}", "label": "neg"}
            for i in range(16)]
    # `train=` is the data; the train section of the config goes in as overrides.
    report = tunelab.finetune(None, ["train.epochs=1", "train.batch_size=8", "train.threads=2", "train.device=cpu"],
                           task="classify", model={"name": str(tiny_model_dir)}, output_dir=str(tmp_path / "o"),
                           train=recs, dev=recs[:4], test=recs[4:8])
    assert report["sizes"] == {"train": 16, "dev": 4, "test": 4}
    assert report["labels"] == ["neg", "pos"] and report["steps"] == 2
    assert (tmp_path / "o" / "model.safetensors").is_file()
    again = tunelab.finetune(None, ["train.epochs=1", "train.batch_size=8", "train.threads=2", "train.device=cpu"],
                          task="classify", model={"name": str(tiny_model_dir)}, output_dir=str(tmp_path / "o"),
                          train=recs, dev=recs[:4], overwrite=True)
    assert [h["loss"] for h in again["history"]] == [h["loss"] for h in report["history"]] and again["test"] is None


# --- early stopping ----------------------------------------------------------------------------------------


def test_early_stopping_restores_best(tmp_path, conll_dir, tiny_model_dir):
    # A dev set without entities: entity F1 is 0 at every evaluation, so the first one stays the best.
    dev = tmp_path / "dev_all_o.conll"
    dev.write_text("\n".join(" ".join(line.split()[:-1] + ["O"]) if line.strip() and not line.startswith("-DOC")
                             else line for line in (conll_dir / "dev.conll").read_text().splitlines()) + "\n")
    common = {"data.dev": dev, "data.test": "null", "train.scheduler": "constant", "train.eval_every": 2}
    stopped = train(load_config(None, ner_overrides(conll_dir, tiny_model_dir, tmp_path / "stop", **common,
                                                    **{"train.patience": 2})))
    assert stopped["stopped_early"] is True
    assert stopped["total_steps"] == 24 and stopped["steps"] == 6 < stopped["total_steps"]
    assert [e["step"] for e in stopped["evals"]] == [2, 4, 6]
    assert stopped["best_step"] == 2
    # the saved weights are those of step 2: the same as a run that trains exactly 2 steps
    two = train(load_config(None, ner_overrides(conll_dir, tiny_model_dir, tmp_path / "two", **common,
                                                **{"train.epochs": 0.3})))
    assert two["steps"] == two["total_steps"] == 2
    assert [h["loss"] for h in two["history"]] == [h["loss"] for h in stopped["history"][:2]]
    assert_same_weights(weights(tmp_path / "stop"), weights(tmp_path / "two"))
    assert "stopped early" in (tmp_path / "stop" / "report.md").read_text()


# --- resume after a kill -----------------------------------------------------------------------------------


def test_resume_after_sigkill_is_exact(tmp_path, conll_dir, tiny_model_dir):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""task: ner
model:
  name: {tiny_model_dir}
data:
  train: {conll_dir / 'train.conll'}
  dev: {conll_dir / 'dev.conll'}
  test: {conll_dir / 'test.conll'}
train:
  epochs: 3
  batch_size: 4
  lr: 3.0e-3
  threads: 2
  device: cpu
  save_every: 1
""")
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    report_a = train(load_config(recipe, [f"output_dir={out_a}"]))
    assert report_a["total_steps"] == 36

    kill_after_first_checkpoint(recipe, [f"output_dir={out_b}"], tmp_path / "b.log")
    found = checkpoint.find(out_b)
    assert found is not None
    killed_at = json.loads((found / "state.json").read_text())["step"]
    assert 1 <= killed_at < 36  # killed mid-run
    assert not (out_b / "model.safetensors").exists() and not (out_b / "report.json").exists()

    assert cli.main(["train", str(recipe), f"output_dir={out_b}", "--resume"]) == 0
    report_b = json.loads((out_b / "report.json").read_text())
    assert report_b["steps"] == 36
    assert_same_weights(weights(out_a), weights(out_b))
    assert [h["loss"] for h in report_b["history"]] == [h["loss"] for h in report_a["history"]]
    assert report_b["test"] == json.loads(json.dumps(report_a["test"]))
    assert report_b["best_step"] == report_a["best_step"]
    assert not (out_b / "checkpoint").exists()
    # a finished run is not resumed again
    assert cli.main(["train", str(recipe), f"output_dir={out_b}", "--resume"]) == 2


# --- gradient accumulation ---------------------------------------------------------------------------------


def test_grad_accum_matches_larger_batch(tmp_path, conll_dir, tiny_model_dir):
    common = {"model.dropout": 0.0, "train.group_by_length": "false", "train.scheduler": "constant",
              "data.dev": "null", "data.test": "null", "train.epochs": 0.3, "train.lr": 1e-3}
    big = train(load_config(None, ner_overrides(conll_dir, tiny_model_dir, tmp_path / "big", **common,
                                                **{"train.batch_size": 8})))
    acc = train(load_config(None, ner_overrides(conll_dir, tiny_model_dir, tmp_path / "acc", **common,
                                                **{"train.batch_size": 4, "train.grad_accum": 2})))
    one = train(load_config(None, ner_overrides(conll_dir, tiny_model_dir, tmp_path / "one", **{
        **common, "train.batch_size": 4, "train.epochs": 0.15})))  # no accumulation: steps on half the data
    assert big["steps"] == acc["steps"] == 2 and one["steps"] == 2
    # the same examples, the same starting weights: nearly the same loss at each step
    for hb, ha in zip(big["history"], acc["history"]):
        assert ha["loss"] == pytest.approx(hb["loss"], rel=0.05)
    wb, wa, wo = weights(tmp_path / "big"), weights(tmp_path / "acc"), weights(tmp_path / "one")
    w0 = weights(tiny_model_dir)
    key = "bert.encoder.layer.0.attention.self.query.weight"
    step_b, step_a, step_o = (wb[key] - w0[key[5:]]), (wa[key] - w0[key[5:]]), (wo[key] - w0[key[5:]])
    assert step_b.abs().max() > 1e-4
    d_acc = (step_a - step_b).norm() / step_b.norm()
    d_one = (step_o - step_b).norm() / step_b.norm()
    assert d_acc < 0.1 and d_acc < d_one / 5
