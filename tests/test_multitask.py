"""Multi-task training: one shared backbone, several heads; samplers, loss weighting, saving, export."""

import json
import random
from statistics import mean

import pytest
import torch

from tunelab.errors import TunelabError
from tunelab.multitask.sampling import pick_task, task_probabilities
from tunelab.multitask.weighting import UncertaintyWeights, pcgrad


def mt_overrides(conll_dir, cls_dir, model_dir, out, **extra) -> list[str]:
    values = {"task": "multitask", "model.name": str(model_dir), "output_dir": str(out), "train.threads": 2,
              # a random tiny BERT learns classification from [CLS] slowly: small steps at a high rate
              "train.epochs": 6, "train.batch_size": 4, "train.lr": 5e-3, "train.warmup_ratio": 0.1,
              "train.device": "cpu", "train.bf16": False,
              "tasks.ner.task": "ner", "tasks.ner.data.train": conll_dir / "train.conll",
              "tasks.ner.data.dev": conll_dir / "dev.conll", "tasks.ner.data.test": conll_dir / "test.conll",
              "tasks.topic.task": "classify", "tasks.topic.data.train": cls_dir / "train.jsonl",
              "tasks.topic.data.dev": cls_dir / "dev.jsonl", "tasks.topic.data.test": cls_dir / "test.jsonl"}
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def load(overrides):
    from tunelab.config import load_config

    return load_config(None, overrides)


def run(overrides):
    from tunelab.multitask import train

    return train(load(overrides))


@pytest.fixture(scope="module")
def mt_run(tmp_path_factory, conll_dir, cls_dir, tiny_model_dir):
    out = tmp_path_factory.mktemp("mt") / "out"
    return out, run(mt_overrides(conll_dir, cls_dir, tiny_model_dir, out))


def test_heads_share_one_backbone(tiny_model_dir):
    from tunelab.multitask.model import build, head_modules
    from tunelab.train.optim import build_optimizer

    model = build(tiny_model_dir, {"ner": ("ner", ["O", "B-PER", "I-PER"]), "topic": ("classify", ["a", "b"]),
                                   "mood": ("classify", ["x", "y", "z"])})
    assert model.heads["ner"].bert is model.backbone is model.heads["topic"].bert is model.heads["mood"].bert
    backbone = {id(p) for p in model.backbone.parameters()}
    opt, _ = build_optimizer(model, 1e-3, 0.01, 1e-2, "linear", 0, 10, head_modules(model))
    entries = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(entries) == len(set(entries))  # every parameter once
    assert backbone <= set(entries)
    assert len(entries) == len(backbone) + 2 * 2 + 2  # + each head's weight and bias
    heads = {id(p) for n in model.heads for name, p in model.heads[n].named_parameters() if "classifier" in name}
    assert {id(p) for g in opt.param_groups if g["lr"] == 1e-2 for p in g["params"]} == heads


def test_sampler_frequencies():
    sizes = {"big": 9000, "mid": 900, "small": 100}
    names = list(sizes)
    assert task_probabilities(sizes, "proportional") == pytest.approx({"big": 0.9, "mid": 0.09, "small": 0.01})
    t = task_probabilities(sizes, "temperature", temperature=2.0)
    z = sum(n ** 0.5 for n in sizes.values())
    assert t == pytest.approx({n: s ** 0.5 / z for n, s in sizes.items()})
    assert task_probabilities(sizes, "annealed", progress=0.0) == pytest.approx(task_probabilities(sizes, "proportional"))
    end = task_probabilities(sizes, "annealed", progress=1.0, anneal_min=0.2)
    z = sum(n ** 0.2 for n in sizes.values())
    assert end == pytest.approx({n: s ** 0.2 / z for n, s in sizes.items()})
    for kind, probs in (("proportional", task_probabilities(sizes, "proportional")), ("temperature", t)):
        draws = [pick_task(names, probs, kind, seed=1, draw=k) for k in range(20000)]
        for n in names:
            assert draws.count(n) / len(draws) == pytest.approx(probs[n], abs=0.01)
        assert draws == [pick_task(names, probs, kind, seed=1, draw=k) for k in range(20000)]  # replayable
    rr = [pick_task(names, task_probabilities(sizes, "round_robin"), "round_robin", 1, k) for k in range(9)]
    assert rr == names * 3


def test_training_uses_the_sampled_shares(tmp_path, conll_dir, cls_dir, tiny_model_dir):
    """The loop draws batches with the sampler's shares (proportional: 48 vs 144 sequences -> 1/4, 3/4)."""
    from tunelab.config import load_config
    from tunelab.multitask import train

    over = mt_overrides(conll_dir, cls_dir, tiny_model_dir, tmp_path / "o", **{
        "multitask.sampling": "round_robin", "train.epochs": 1, "train.batch_size": 8})
    report = train(load_config(None, over))
    assert report["tasks"]["ner"]["batches"] == report["tasks"]["topic"]["batches"] == report["steps"] // 2
    assert [list(h["tasks"]) for h in report["history"][:4]] == [["ner"], ["topic"], ["ner"], ["topic"]]


def test_pcgrad_by_hand():
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
    # g1.g2 = -1 < 0: g1 - (-1/2) g2 = (0.5, 0.5); g2 - (-1/1) g1 = (0, 1); sum (0.5, 1.5)
    assert torch.allclose(pcgrad([g1, g2], random.Random(0)), torch.tensor([0.5, 1.5]))
    g3 = torch.tensor([1.0, 1.0])  # no conflict with g1: plain sum
    assert torch.allclose(pcgrad([g1, g3], random.Random(0)), g1 + g3)


def test_uncertainty_weighting_by_hand():
    w = UncertaintyWeights(["a", "b"])
    with torch.no_grad():
        w.log_vars["a"].fill_(0.7)
    loss = torch.tensor(2.0, requires_grad=True)
    out = w("a", loss)
    assert float(out) == pytest.approx(0.5 * torch.exp(torch.tensor(-0.7)).item() * 2.0 + 0.35)
    out.backward()
    s = torch.tensor(0.7)
    assert float(loss.grad) == pytest.approx(0.5 * torch.exp(-s).item())  # the task loss's weight
    assert float(w.log_vars["a"].grad) == pytest.approx(-0.5 * torch.exp(-s).item() * 2.0 + 0.5)
    assert w.log_vars["b"].grad is None
    assert w.weights() == pytest.approx({"a": 0.5 * torch.exp(-s).item(), "b": 0.5})


def _two_task_batches(tiny_model_dir, minilm_tokenizer):
    from tunelab.data import Sentence, TextExample
    from tunelab.data.batching import collate
    from tunelab.multitask.model import build
    from tunelab.tasks import make_task

    torch.manual_seed(0)
    ner_labels, cls_labels = ["O", "B-PER", "I-PER"], ["a", "b"]
    model = build(tiny_model_dir, {"ner": ("ner", ner_labels), "topic": ("classify", cls_labels)})
    sents = [Sentence(["John", "Smith", "ran", "home"], ["B-PER", "I-PER", "O", "O"], 0, "x", 1),
             Sentence(["Anna", "sang"], ["B-PER", "O"], 1, "x", 2)]
    texts = [TextExample("shares fell sharply", "a", "x", 1), TextExample("the team won", "b", "x", 2)]
    work = []
    for name, kind, labels, ex in (("ner", "ner", ner_labels, sents), ("topic", "classify", cls_labels, texts)):
        task = make_task(kind, minilm_tokenizer, labels, 64)
        work.append((name, collate(task.encode(ex, training=True), task.pad)))
    return model.eval(), work  # eval: no dropout, so that every forward is the same


def test_backward_pcgrad_and_uncertainty_change_the_update_as_specified(tiny_model_dir, minilm_tokenizer):
    from tunelab.multitask.train import backward

    model, work = _two_task_batches(tiny_model_dir, minilm_tokenizer)
    shared = list(model.backbone.parameters())

    def grads_of(name):
        model.zero_grad(set_to_none=True)
        model(name, **dict(work)[name]).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    g = {name: grads_of(name) for name, _ in work}
    keys = [n for n, _ in model.named_parameters() if n.startswith("backbone.")]
    flat = [torch.cat([g[t][k].flatten() if k in g[t] else torch.zeros_like(dict(model.named_parameters())[k]).flatten()
                       for k in keys]) for t in ("ner", "topic")]
    assert torch.dot(flat[0], flat[1]) != 0

    model.zero_grad(set_to_none=True)
    backward(model, work, lambda n, loss: loss, 1, torch.device("cpu"), False, shared, random.Random(3))
    got = torch.cat([p.grad.flatten() for p in shared])
    assert torch.allclose(got, pcgrad(flat, random.Random(3)), atol=1e-6)
    # head gradients are each task's own, untouched by the projection
    assert torch.allclose(model.heads["ner"].classifier.weight.grad, g["ner"]["heads.ner.classifier.weight"])

    # uncertainty: the backbone gradient is the sum of each task's gradient times ½·exp(−s_task)
    w = UncertaintyWeights(["ner", "topic"])
    with torch.no_grad():
        w.log_vars["ner"].fill_(1.0)
        w.log_vars["topic"].fill_(-0.5)
    model.zero_grad(set_to_none=True)
    total, losses = backward(model, work, w, 1, torch.device("cpu"), False)
    expect = 0.5 * torch.exp(torch.tensor(-1.0)) * flat[0] + 0.5 * torch.exp(torch.tensor(0.5)) * flat[1]
    assert torch.allclose(torch.cat([p.grad.flatten() for p in shared]), expect, atol=1e-6)
    assert total == pytest.approx(sum(0.5 * torch.exp(-w.log_vars[n]).item() * losses[n] + 0.5 * w.log_vars[n].item()
                                      for n in losses), rel=1e-5)


def test_multitask_run_learns_and_reports(mt_run):
    out, report = mt_run
    assert set(report["tasks"]) == {"ner", "topic"}
    for name, entry in report["tasks"].items():
        losses = [h["tasks"][name] for h in report["history"] if name in h["tasks"]]
        assert mean(losses[-5:]) < 0.7 * mean(losses[:5]), name
    assert report["tasks"]["ner"]["test"]["main"] > 0.5
    assert report["tasks"]["topic"]["test"]["accuracy"] > 0.5  # three classes: chance is a third
    best = next(e for e in report["evals"] if e["step"] == report["best_step"])
    assert report["dev"] == pytest.approx(mean(best["scores"].values())) == max(e["dev"] for e in report["evals"])
    md = (out / "report.md").read_text()
    assert "## Task ner (ner)" in md and "## Task topic (classify)" in md and "Confusion" in md
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tunelab.json", "curves.png", "report.json", "config.yaml"} <= names
    assert "checkpoint" not in names


def test_saved_folder_predicts_the_same_per_task(mt_run, conll_dir, cls_dir):
    from tunelab.data import read_file
    from tunelab.predict import Predictor

    out, report = mt_run
    pred = Predictor(out, device="cpu")
    ner_test = read_file(conll_dir / "test.conll", "ner")
    cls_test = read_file(cls_dir / "test.jsonl", "classify")
    assert pred.evaluate(ner_test, task="ner")["main"] == report["tasks"]["ner"]["test"]["main"]
    assert pred.evaluate(cls_test, task="topic")["main"] == report["tasks"]["topic"]["test"]["main"]
    with pytest.raises(TunelabError, match="ner, topic: name one with --task"):
        pred.predict(cls_test)


def test_export_loads_in_plain_transformers(mt_run, conll_dir, cls_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tests.conftest import plain_transformers_tags
    from tunelab.cli import main
    from tunelab.data import read_file
    from tunelab.predict import Predictor

    out, _ = mt_run
    pred = Predictor(out, device="cpu")
    sents = read_file(conll_dir / "test.conll", "ner")
    assert main(["export", str(out), "--task", "ner", str(tmp_path / "ner")]) == 0
    assert main(["export", str(out), "--task", "topic", str(tmp_path / "topic")]) == 0
    assert plain_transformers_tags(tmp_path / "ner", sents) == [t for t, _ in pred.predict(sents, task="ner")]
    texts = read_file(cls_dir / "test.jsonl", "classify")
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "topic"))
    plain = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "topic")).eval()
    with torch.no_grad():
        logits = plain(**tok([e.text for e in texts], padding=True, return_tensors="pt")).logits
    labels = [plain.config.id2label[int(i)] for i in logits.argmax(-1)]
    assert labels == [label for label, _ in pred.predict(texts, task="topic")]
    # the exported folder is also a tunelab model folder
    assert Predictor(tmp_path / "topic", device="cpu").predict(texts) == pred.predict(texts, task="topic")
    assert main(["export", str(out), "--task", "nope", str(tmp_path / "x")]) == 2
    assert main(["export", str(out), "--task", "ner", str(tmp_path / "ner")]) == 2  # not empty


def test_cli_predict_and_eval_by_task(mt_run, cls_dir, capsys):
    from tunelab.cli import main

    out, report = mt_run
    assert main(["predict", str(out), "--task", "ner", "John Smith visited Paris ."]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["tokens"] == ["John", "Smith", "visited", "Paris", "."] and "entities" in rec
    assert main(["predict", str(out), "--task", "topic", "Shares fell 3 percent on Monday"]) == 0
    assert json.loads(capsys.readouterr().out)["label"] in ("business", "sport", "tech")
    assert main(["predict", str(out), "The team won"]) == 2
    assert "name one with --task" in capsys.readouterr().err
    assert main(["eval", str(out), "--task", "topic", "--data", str(cls_dir / "test.jsonl")]) == 0
    assert f"Accuracy {report['tasks']['topic']['test']['accuracy'] * 100:.2f}" in capsys.readouterr().out


def test_per_task_lora_adapters(tmp_path, conll_dir, cls_dir, tiny_model_dir):
    """Each task trains its own adapter (and head) on a frozen shared backbone; the adapters are switched by
    task name, and the export merges the task's adapter."""
    from safetensors.torch import load_file
    from transformers import AutoModelForTokenClassification

    from tunelab.cli import main
    from tunelab.data import read_file
    from tunelab.predict import Predictor

    out = tmp_path / "o"
    report = run(mt_overrides(conll_dir, cls_dir, tiny_model_dir, out, **{
        "tune.method": "lora", "tune.lora_r": 4, "train.epochs": 2, "multitask.mix": "all"}))
    assert report["tune"]["trainable_params"] < 0.2 * report["tune"]["total_params"]
    saved = load_file(str(out / "model.safetensors"))
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    for k, v in base.items():  # the backbone is bit-identical to the pretrained one
        key = "backbone." + k if "backbone." + k in saved else "backbone." + k.replace(".weight", ".base_layer.weight")
        if key in saved:
            assert torch.equal(saved[key], v), k
    ner_a = [k for k in saved if ".lora_A.ner." in k]
    topic_a = [k.replace(".ner.", ".topic.") for k in ner_a]
    assert ner_a and all(k in saved for k in topic_a)
    assert any(not torch.equal(saved[a], saved[b]) for a, b in zip(ner_a, topic_a))

    pred = Predictor(out, device="cpu")
    sents = read_file(conll_dir / "test.conll", "ner")
    assert pred.evaluate(sents, task="ner")["main"] == report["tasks"]["ner"]["test"]["main"]
    # switching to the other task's adapter changes what the NER head sees
    model = pred.model
    from tunelab.data.batching import collate

    feats = pred.tasks["ner"].encode(sents[:2], training=False)
    batch = collate(feats, pred.tasks["ner"].pad)
    with torch.no_grad():
        own = model.use("ner")(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        model.use("topic")
        other = model.heads["ner"](input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert not torch.allclose(own, other)

    assert main(["export", str(out), "--task", "ner", str(tmp_path / "ner")]) == 0
    plain = AutoModelForTokenClassification.from_pretrained(str(tmp_path / "ner")).eval()
    with torch.no_grad():
        merged = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(merged, own, atol=1e-5)


def test_generation_head_on_a_decoder_backbone(tmp_path, gen_dir, cls_dir, tiny_causal_dir):
    from transformers import AutoModelForCausalLM

    from tunelab.cli import main
    from tunelab.predict import Predictor

    out = tmp_path / "o"
    over = [f"{k}={v}" for k, v in {
        "task": "multitask", "model.name": tiny_causal_dir, "output_dir": out, "train.threads": 2,
        "train.epochs": 3, "train.batch_size": 8, "train.lr": 1e-2, "train.device": "cpu",
        "multitask.sampling": "proportional",
        "tasks.copy.task": "generate", "tasks.copy.data.train": gen_dir / "train.jsonl",
        "tasks.copy.data.dev": gen_dir / "dev.jsonl", "tasks.copy.data.test": gen_dir / "test.jsonl",
        "tasks.copy.data.max_target_length": 8,
        "tasks.topic.task": "classify", "tasks.topic.data.train": cls_dir / "train.jsonl",
        "tasks.topic.data.dev": cls_dir / "dev.jsonl"}.items()]
    report = run(over)
    model = Predictor(out, device="cpu").model
    assert model.heads["copy"].lm_head.weight is model.backbone.embed_tokens.weight  # still tied
    losses = [h["tasks"]["copy"] for h in report["history"] if "copy" in h["tasks"]]
    assert mean(losses[-3:]) < 0.8 * mean(losses[:3])
    assert report["tasks"]["copy"]["samples"] and "perplexity" in report["tasks"]["copy"]["test"]
    assert main(["export", str(out), "--task", "copy", str(tmp_path / "copy")]) == 0
    AutoModelForCausalLM.from_pretrained(str(tmp_path / "copy"))


def test_bad_multitask_configs(tmp_path, conll_dir, cls_dir, gen_dir, tiny_model_dir):
    base = mt_overrides(conll_dir, cls_dir, tiny_model_dir, tmp_path / "o")
    with pytest.raises(TunelabError, match="needs multitask.mix=all"):
        load(base + ["multitask.weighting=pcgrad"])
    with pytest.raises(TunelabError, match="at least two"):
        load([o for o in base if not o.startswith("tasks.topic")])
    with pytest.raises(TunelabError, match="unknown config key 'tasks.ner.wieght'"):
        load(base + ["tasks.ner.wieght=2"])
    with pytest.raises(TunelabError, match="needs a decoder"):
        run(base + ["tasks.gen.task=generate", f"tasks.gen.data.train={gen_dir / 'train.jsonl'}"])
    assert not (tmp_path / "o").exists()  # refused before anything was written



def test_resume_after_kill_gives_the_same_run(tmp_path, conll_dir, cls_dir, tiny_model_dir):
    """SIGKILL after the first checkpoint, --resume: the same final weights as an uninterrupted run (the
    sampler, batch streams and uncertainty weights all resume)."""
    from safetensors.torch import load_file

    from tests.conftest import kill_after_first_checkpoint
    from tunelab.cli import main

    extra = {"train.epochs": 2, "train.save_every": 3, "train.eval_every": 6, "multitask.sampling": "annealed",
             "multitask.weighting": "uncertainty"}
    full = tmp_path / "full"
    run(mt_overrides(conll_dir, cls_dir, tiny_model_dir, full, **extra))
    cut = tmp_path / "cut"
    over = mt_overrides(conll_dir, cls_dir, tiny_model_dir, cut, **extra)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("task: multitask\n")
    kill_after_first_checkpoint(recipe, over, tmp_path / "log.txt")
    assert not (cut / "model.safetensors").exists()
    assert main(["train", str(recipe), *over, "--resume"]) == 0
    a, b = load_file(str(full / "model.safetensors")), load_file(str(cut / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra = json.loads((full / "report.json").read_text())
    rb = json.loads((cut / "report.json").read_text())
    assert ra["final_weights"] == rb["final_weights"] and ra["final_weights"]["ner"] != 0.5
    assert [h["tasks"] for h in ra["history"]] == [h["tasks"] for h in rb["history"]]
