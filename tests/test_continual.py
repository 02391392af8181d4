"""Continual learning: the strategies' components against hand computations, the accuracy matrix's
summary on a made-up matrix, the recipe end to end on a tiny model (task- and class-incremental, the saved
folders, `tunelab runs`), resume after kill -9 mid-sequence, and bad configs."""

import json
import math
import sys

import pytest
import torch

from conftest import kill_at_checkpoint
from tunelab.config import load_config
from tunelab.continual.metrics import transfer
from tunelab.continual.strategies import EWC, Distill, Reservoir, accumulate_fisher, fisher_diagonal, kl
from tunelab.errors import TunelabError


# ---- components ----

def tiny_mt(tiny_model_dir, heads=None):
    from tunelab.multitask import model as mtm

    torch.manual_seed(0)
    return mtm.build(tiny_model_dir, heads or {"ner": ("ner", ["O", "B-PER", "I-PER"]),
                                               "topic": ("classify", ["a", "b"])}, backbone_kind="classify")


def test_ewc_penalty_by_hand_and_zero_at_the_anchor(tiny_model_dir):
    model = tiny_mt(tiny_model_dir)
    params = dict(model.named_parameters())
    names = ["backbone.encoder.layer.0.attention.self.query.weight", "heads.ner.classifier.weight"]
    g = torch.Generator().manual_seed(1)
    fisher = {n: torch.rand(params[n].shape, generator=g) for n in names}
    emb = "backbone.embeddings.word_embeddings.weight"  # a table whose Fisher is 0 but for a few tokens' rows
    names.append(emb)
    fisher[emb] = torch.zeros(params[emb].shape)
    fisher[emb][[5, 17, 999]] = torch.rand(3, params[emb].shape[1], generator=g)
    anchor = {n: params[n].detach().clone() for n in names}
    term = EWC(model, fisher, anchor, lam=7.0)
    assert term().item() == 0.0  # at the anchor weights
    with torch.no_grad():
        for n in names:
            params[n].add_(torch.randn(params[n].shape, generator=g) * 0.1)
    hand = 0.5 * 7.0 * sum(float((fisher[n] * (params[n].detach() - anchor[n]) ** 2).sum()) for n in names)
    assert math.isclose(term().item(), hand, rel_tol=1e-5)
    term().backward()  # the gradient is lambda * F * (theta - theta*)
    for n in (names[0], emb):
        assert torch.allclose(params[n].grad, 7.0 * fisher[n] * (params[n].detach() - anchor[n]), atol=1e-6)
    assert params[emb].grad.any(1).nonzero().flatten().tolist() == [5, 17, 999]


def test_ewc_on_a_widened_head_compares_the_old_rows_only(tiny_model_dir):
    from tunelab.models import widen_head

    model = tiny_mt(tiny_model_dir)
    n = "heads.ner.classifier.weight"
    old = dict(model.named_parameters())[n].detach().clone()
    fisher = {n: torch.ones_like(old)}
    widen_head(model.heads["ner"], "ner", ["O", "B-PER", "I-PER", "B-ORG", "I-ORG"])
    term = EWC(model, fisher, {n: old}, lam=2.0)
    assert term().item() == 0.0  # new rows are free; old rows unchanged
    with torch.no_grad():
        dict(model.named_parameters())[n][3:] += 5.0
    assert term().item() == 0.0
    with torch.no_grad():
        dict(model.named_parameters())[n][0] += 0.5
    assert math.isclose(term().item(), 0.5 * 2.0 * 0.25 * old.shape[1], rel_tol=1e-5)
    grown = accumulate_fisher(fisher, {n: torch.full((5, old.shape[1]), 2.0)}, decay=0.5)
    assert torch.equal(grown[n][:3], torch.full((3, old.shape[1]), 2.5)) and torch.equal(grown[n][3:], torch.full((2, old.shape[1]), 2.0))


def test_fisher_is_the_mean_squared_per_example_gradient(tiny_model_dir, minilm_tokenizer):
    from tunelab.tasks import make_task

    from tunelab.data.examples import TextExample

    model = tiny_mt(tiny_model_dir)
    task = make_task("classify", minilm_tokenizer, ["a", "b"], 64)
    feats = task.encode([TextExample("good film", "a"), TextExample("a very bad and long film", "b"),
                         TextExample("fine", "a")], training=True)
    fisher = fisher_diagonal(model, lambda **b: model("topic", **b), feats, task.pad, "cpu", False, 10, seed=0)
    model.eval()
    n = "heads.topic.classifier.weight"
    p = dict(model.named_parameters())[n]
    hand = torch.zeros_like(p)
    for f in feats:
        model.zero_grad()
        out = model("topic", input_ids=torch.tensor([f["input_ids"]]), attention_mask=torch.ones(1, len(f["input_ids"]), dtype=torch.long),
                    labels=torch.tensor([f["labels"]]))
        out.loss.backward()
        hand += p.grad ** 2
    assert torch.allclose(fisher[n], hand / 3, rtol=1e-4, atol=1e-10)
    assert "heads.ner.classifier.weight" not in fisher  # no gradient from another head's examples


def test_lwf_targets_come_from_the_frozen_previous_model(tiny_model_dir, minilm_tokenizer):
    import copy

    from tunelab.train.step import MicroBatch

    model = tiny_mt(tiny_model_dir)
    previous = copy.deepcopy(model)
    model.eval()  # dropout off: the same weights give the same outputs
    term = Distill(model, previous, {"ner": (3, True), "topic": (2, False)}, weight=1.0, temperature=2.0,
                   device="cpu", bf16=False)
    assert not any(p.requires_grad for p in previous.parameters()) and not previous.training
    enc = dict(minilm_tokenizer(["Angela Merkel visited Paris", "Reuters"], padding=True, return_tensors="pt"))
    out = model("topic", **enc)
    mb = MicroBatch(model.heads["topic"], enc, out, None)
    assert term(mb).item() < 1e-6  # the model still is the previous one
    with torch.no_grad():
        model.heads["ner"].classifier.weight.add_(0.5)
        model.heads["topic"].classifier.bias.add_(torch.tensor([1.0, -1.0]))
    out = model("topic", **enc)
    value = term(MicroBatch(model.heads["topic"], enc, out, None))
    with torch.no_grad():  # by hand: T^2 KL per head, token-level averaged over real tokens
        hand = 0.0
        for head, token in (("ner", True), ("topic", False)):
            old, new = previous(head, **enc).logits, model(head, **enc).logits
            p = torch.softmax(old / 2, -1)
            per = (p * (torch.log_softmax(old / 2, -1) - torch.log_softmax(new / 2, -1))).sum(-1) * 4
            hand += float((per * enc["attention_mask"]).sum() / enc["attention_mask"].sum()) if token else float(per.mean())
    assert value.item() > 1e-3 and math.isclose(value.item(), hand, rel_tol=1e-4)
    value.backward()
    assert model.heads["ner"].classifier.weight.grad is not None and previous.heads["ner"].classifier.weight.grad is None
    # a widened head is distilled on its old labels only
    assert kl(torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 2.0, 9.0]])[..., :2], 2.0).item() == 0.0


def test_reservoir_keeps_a_uniform_sample_within_its_bound():
    counts = [0] * 60
    for seed in range(3000):
        r = Reservoir(12, seed)
        r.add("a", 25)
        r.add("b", 35)
        assert len(r.items) == 12 and len(set(r.items)) == 12 and r.seen == 60
        for e, i in r.items:
            counts[i if e == "a" else 25 + i] += 1
    expected = 3000 * 12 / 60
    chi2 = sum((c - expected) ** 2 / expected for c in counts)
    assert chi2 < 100.9, chi2  # 59 degrees of freedom: p = 0.0005
    again = Reservoir(12, 7)
    again.add("a", 25)
    again.add("b", 35)
    first = Reservoir(12, 7)
    first.add("a", 25)
    restored = Reservoir(0, 0)
    restored.load_state_dict(json.loads(json.dumps(first.state_dict())))
    restored.add("b", 35)
    assert restored.items == again.items  # a pure function of the seed and what was offered, through JSON
    assert again.of("a") == sorted(i for e, i in again.items if e == "a")


def test_transfer_metrics_on_a_made_up_matrix():
    m = [[0.90, None, None],
         [0.70, 0.80, None],
         [0.60, 0.75, 0.85]]
    s = transfer(m, reference=[None, 0.70, 0.90])
    assert math.isclose(s["average"], (0.60 + 0.75 + 0.85) / 3)
    assert math.isclose(s["backward_transfer"], ((0.60 - 0.90) + (0.75 - 0.80)) / 2)
    assert math.isclose(s["forgetting"], ((0.90 - 0.60) + (0.80 - 0.75)) / 2)
    assert math.isclose(s["forward_transfer"], ((0.80 - 0.70) + (0.85 - 0.90)) / 2)
    assert s["newest"] == 0.85
    m2 = [[0.5, None], [0.7, 0.6]]  # an earlier experience improved later: negative forgetting
    assert math.isclose(transfer(m2)["forgetting"], -0.2) and transfer(m2)["forward_transfer"] is None
    m3 = [[0.9, None, None], [0.95, 0.8, None], [0.9, 0.8, 0.7]]  # forgetting counts from the best, not the first
    assert math.isclose(transfer(m3)["forgetting"], (0.05 + 0.0) / 2)
    with pytest.raises(ValueError):
        transfer([[0.5, None], [None, 0.6]])


# ---- the recipe ----

def continual_overrides(conll_dir, cls_dir, model_dir, out, **extra) -> list[str]:
    values = {
        "task": "continual", "output_dir": out, "model.name": model_dir,
        "experiences.perloc.task": "ner", "experiences.perloc.head": "ner",
        "experiences.perloc.data.train": conll_dir / "train.conll", "experiences.perloc.data.dev": conll_dir / "dev.conll",
        "experiences.perloc.data.test": conll_dir / "test.conll", "experiences.perloc.data.only_labels": "[PER,LOC]",
        "experiences.topic.task": "classify", "experiences.topic.data.train": cls_dir / "train.jsonl",
        "experiences.topic.data.dev": cls_dir / "dev.jsonl", "experiences.topic.data.test": cls_dir / "test.jsonl",
        "experiences.org.task": "ner", "experiences.org.head": "ner",
        "experiences.org.data.train": conll_dir / "train.conll", "experiences.org.data.dev": conll_dir / "dev.conll",
        "experiences.org.data.test": conll_dir / "test.conll", "experiences.org.data.only_labels": "[ORG]",
        "train.epochs": 6, "train.batch_size": 4, "train.lr": 5e-3, "train.warmup_ratio": 0.1, "train.bf16": False,
        "train.device": "cpu", "train.threads": 1, "continual.replay_size": 16, "continual.fisher_samples": 16}
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


@pytest.fixture(scope="module")
def cl_run(tmp_path_factory, conll_dir, cls_dir, tiny_model_dir):
    import importlib

    train = importlib.import_module("tunelab.continual.train").train
    out = tmp_path_factory.mktemp("continual") / "out"
    report = train(load_config(None, continual_overrides(conll_dir, cls_dir, tiny_model_dir, out,
                                                         **{"continual.strategy": "ewc+replay+lwf",
                                                            "continual.reference": "true"})))
    return out, report


def test_sequence_report_matrix_and_folders(cl_run):
    out, r = cl_run
    assert [e["name"] for e in r["experiences"]] == ["perloc", "topic", "org"]
    m = r["matrix"]
    assert len(m) == 3 and m[0][1:] == [None, None] and m[1][2] is None and all(v is not None for v in m[2])
    assert r["summary"] == transfer(m, r["reference"]) and r["reference"][0] is None and r["reference"][2] is not None
    assert r["summary"]["forward_transfer"] is not None
    assert r["buffer_size"] == 16
    kept = [json.loads(line) for line in (out / "experiences" / "02-org" / "replay.jsonl").read_text().splitlines()]
    state = json.loads((out / "continual.json").read_text())["buffer"]
    assert sorted([k["experience"], k["index"]] for k in kept) == sorted(state["items"]) and len(kept) == 16
    assert {k["head"] for k in kept} <= {"ner", "topic"} and all("tags" in k["example"] or "label" in k["example"] for k in kept)
    for phase in r["phases"][1:]:  # every later experience trained with the EWC and LwF terms
        assert set(phase["terms"]) == {"term/ewc", "term/lwf"} and phase["terms"]["term/lwf"] >= 0
    assert "term/ewc" not in r["phases"][0]["terms"]
    # the folders: after each experience, and the final one in output_dir (a multi-task folder)
    metas = [json.loads((out / "experiences" / f"{i:02d}-{n}" / "tunelab.json").read_text())
             for i, n in enumerate(["perloc", "topic", "org"])]
    assert list(metas[0]["tasks"]) == ["ner"] and list(metas[1]["tasks"]) == ["ner", "topic"]
    assert metas[1]["tasks"]["ner"]["labels"] == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    assert metas[2]["tasks"]["ner"]["labels"] == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER", "B-ORG", "I-ORG"]
    assert json.loads((out / "tunelab.json").read_text())["tasks"] == metas[2]["tasks"]
    assert (out / "matrix.png").stat().st_size > 5000 and "## Accuracy matrix" in (out / "report.md").read_text()
    assert not list(out.glob("experiences/*/checkpoint")) and not (out / "reference").exists()


def test_matrix_cells_are_what_the_saved_folders_score(cl_run, conll_dir, cls_dir):
    """Each cell equals an independent evaluation of the folder after that experience, with the
    experience's own labels (the org column: ORG entities only, other types restricted away)."""
    from tunelab.config import DataConfig
    from tunelab.data import load_splits
    from tunelab.metrics import entity_metrics
    from tunelab.predict import Predictor
    from tunelab.tasks.ner import NerTask

    out, r = cl_run
    org = load_splits(DataConfig(train=str(conll_dir / "train.conll"), test=str(conll_dir / "test.conll"),
                                 only_labels=["ORG"]), "ner").test
    perloc = load_splits(DataConfig(train=str(conll_dir / "train.conll"), test=str(conll_dir / "test.conll"),
                                    only_labels=["PER", "LOC"]), "ner").test
    final = Predictor(out)
    for examples, types, col in ((perloc, ["PER", "LOC"], 0), (org, ["ORG"], 2)):
        preds = NerTask.restrict_predictions(final.predict(examples, task="ner"), ["O"] + [f"B-{t}" for t in types])
        f1 = entity_metrics([s.tags for s in examples], [p[0] for p in preds])["main"]
        assert math.isclose(f1, r["matrix"][2][col], abs_tol=1e-9)
    topic = load_splits(DataConfig(train=str(cls_dir / "train.jsonl"), test=str(cls_dir / "test.jsonl")), "classify").test
    after_topic = Predictor(out / "experiences" / "01-topic")
    assert math.isclose(after_topic.evaluate(topic, task="topic")["main"], r["matrix"][1][1], abs_tol=1e-9)


def test_runs_lists_a_continual_run(cl_run, capsys):
    from tunelab.cli import main

    out, r = cl_run
    assert main(["runs", str(out.parent)]) == 0
    shown = capsys.readouterr().out
    assert "continual" in shown and "ewc+replay+lwf" in shown and "average" in shown


def test_adapters_isolate_each_experience_and_joint_trains_once(tmp_path, conll_dir, cls_dir, tiny_model_dir):
    """Per-experience adapters with their own heads: the backbone is frozen and an earlier head's scores
    never change (zero forgetting, exactly). joint: one phase over all data, one matrix row."""
    import importlib

    train = importlib.import_module("tunelab.continual.train").train
    base = continual_overrides(conll_dir, cls_dir, tiny_model_dir, tmp_path / "a", **{
        "continual.strategy": "adapters", "tune.method": "lora", "tune.lora_r": 4,
        "experiences.org.head": "org", "experiences.org.data.only_labels": "[ORG]"})
    r = train(load_config(None, base))
    m = r["matrix"]
    assert m[1][0] == m[0][0] and m[2][0] == m[0][0] and m[2][1] == m[1][1]
    assert r["summary"]["forgetting"] == 0.0
    meta = json.loads((tmp_path / "a" / "tunelab.json").read_text())
    assert set(meta["tasks"]) == {"ner", "topic", "org"} and meta["adapters"]["r"] == 4
    joint = train(load_config(None, continual_overrides(conll_dir, cls_dir, tiny_model_dir, tmp_path / "j", **{
        "continual.strategy": "joint"})))
    assert len(joint["matrix"]) == 1 and len(joint["phases"]) == 1 and joint["summary"]["forgetting"] is None


def test_resume_after_kill_mid_sequence_is_exact(tmp_path, conll_dir, cls_dir, tiny_model_dir):
    """SIGKILL inside the second experience (after its first step checkpoint), --resume: the same final
    weights, matrix, buffer and EWC state as an uninterrupted run."""
    import importlib

    from safetensors.torch import load_file

    from tunelab.cli import main

    train = importlib.import_module("tunelab.continual.train").train
    extra = {"continual.strategy": "ewc+replay+lwf", "train.save_every": 1}
    full = tmp_path / "full"
    ra = train(load_config(None, continual_overrides(conll_dir, cls_dir, tiny_model_dir, full, **extra)))
    cut = tmp_path / "cut"
    over = continual_overrides(conll_dir, cls_dir, tiny_model_dir, cut, **extra)
    kill_at_checkpoint([sys.executable, "-m", "tunelab", "train", *_recipe(tmp_path), *over],
                       cut / "experiences" / "01-topic", tmp_path / "log.txt")
    assert json.loads((cut / "continual.json").read_text())["done"] == 1 and not (cut / "report.json").exists()
    assert main(["train", *_recipe(tmp_path), *over, "--resume"]) == 0
    rb = json.loads((cut / "report.json").read_text())
    assert rb["matrix"] == ra["matrix"] and rb["summary"] == ra["summary"]
    a, b = load_file(str(full / "model.safetensors")), load_file(str(cut / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ea, eb = load_file(str(full / "ewc.safetensors")), load_file(str(cut / "ewc.safetensors"))
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    sa, sb = (json.loads((d / "continual.json").read_text()) for d in (full, cut))
    assert sa["buffer"] == sb["buffer"]
    assert [p["loss"] for p in ra["phases"]] == [p["loss"] for p in rb["phases"]]


def _recipe(tmp_path) -> list[str]:
    recipe = tmp_path / "continual.yaml"
    recipe.write_text("task: continual\n")
    return [str(recipe)]


def test_bad_continual_configs(tmp_path, conll_dir, cls_dir, tiny_model_dir):
    def cfg(**extra):
        return load_config(None, continual_overrides(conll_dir, cls_dir, tiny_model_dir, tmp_path / "x", **extra))

    with pytest.raises(TunelabError, match="continual.strategy"):
        cfg(**{"continual.strategy": "ewc+magic"})
    with pytest.raises(TunelabError, match="continual.strategy"):
        cfg(**{"continual.strategy": "joint+ewc"})
    with pytest.raises(TunelabError, match="perloc and org share head 'ner'"):
        cfg(**{"continual.strategy": "adapters", "tune.method": "lora"})
    with pytest.raises(TunelabError, match="tune.method=lora"):
        cfg(**{"continual.strategy": "adapters", "experiences.org.head": "org"})
    with pytest.raises(TunelabError, match="tune.method=full"):
        cfg(**{"tune.method": "lora"})
    with pytest.raises(TunelabError, match="is a ner head"):
        cfg(**{"experiences.topic.head": "ner"})
    with pytest.raises(TunelabError, match="'experiences' is for task: continual"):
        load_config(None, ["task=ner", f"data.train={conll_dir / 'train.conll'}",
                           f"experiences.a.data.train={conll_dir / 'train.conll'}"])
    with pytest.raises(TunelabError, match="at least two"):
        load_config(None, ["task=continual", f"experiences.a.data.train={conll_dir / 'train.conll'}"])
    with pytest.raises(TunelabError, match="experiences.org: data.only_labels"):
        import importlib

        importlib.import_module("tunelab.continual.train").train(cfg(**{"experiences.org.data.only_labels": "[ORGS]"}))


def test_a_head_exports_as_a_plain_transformers_model(cl_run, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    from tunelab.cli import main

    out, r = cl_run
    assert main(["export", str(out), "--task", "ner", str(tmp_path / "ner")]) == 0
    ner = AutoModelForTokenClassification.from_pretrained(str(tmp_path / "ner"))
    assert list(ner.config.id2label.values()) == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER", "B-ORG", "I-ORG"]
    assert main(["export", str(out / "experiences" / "01-topic"), "--task", "topic", str(tmp_path / "topic")]) == 0
    topic = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "topic"))
    assert topic.config.num_labels == 3


def test_domain_incremental_shares_a_head_without_widening(tmp_path, conll_dir, tiny_model_dir):
    """The same labels on new data (two windows of one corpus) train one head on: nothing to widen, and
    the second experience starts from the first's weights."""
    import importlib

    train = importlib.import_module("tunelab.continual.train").train
    common = {"task": "ner", "head": "ner", "data.train": conll_dir / "train.conll", "data.dev": conll_dir / "dev.conll",
              "data.test": conll_dir / "test.conll"}
    over = [f"{k}={v}" for k, v in {"task": "continual", "output_dir": tmp_path / "d", "model.name": tiny_model_dir,
                                      "train.epochs": 2, "train.batch_size": 4, "train.lr": 5e-3, "train.bf16": False,
                                      "train.device": "cpu", "train.threads": 1}.items()]
    for name, window in (("early", 0), ("late", 24)):
        over += [f"experiences.{name}.{k}={v}" for k, v in common.items()]
        over += [f"experiences.{name}.data.skip_train_examples={window}", f"experiences.{name}.data.max_train_examples=24"]
    r = train(load_config(None, over))
    metas = [json.loads((tmp_path / "d" / "experiences" / f).read_text()) for f in ("00-early/tunelab.json", "01-late/tunelab.json")]
    assert metas[0]["tasks"]["ner"]["labels"] == metas[1]["tasks"]["ner"]["labels"] == r["experiences"][1]["labels"]
    assert r["experiences"][0]["sizes"]["train"] == r["experiences"][1]["sizes"]["train"] == 24
    assert len(r["matrix"]) == 2 and r["matrix"][1][0] is not None


def test_pseudo_labels_fill_in_only_the_unannotated_words():
    from tunelab.data.examples import Sentence
    from tunelab.tasks.ner import NerTask

    s = Sentence("Angela Merkel met Siemens in Berlin today".split(), ["O", "O", "O", "B-ORG", "O", "O", "O"])
    pred = (["B-PER", "I-PER", "O", "B-LOC", "O", "B-LOC", "O"], None)  # the old tagger: PER, LOC (wrong on Siemens)
    (merged,) = NerTask.merge_predictions([s], [pred])
    assert merged.tags == ["B-PER", "I-PER", "O", "B-ORG", "O", "B-LOC", "O"]  # the annotation wins on Siemens
    cut = Sentence(["a", "b", "c"], ["O", "B-ORG", "O"])
    (m2,) = NerTask.merge_predictions([cut], [(["B-PER", "I-PER", "I-PER"], None)])
    assert m2.tags == ["B-PER", "B-ORG", "B-PER"]  # valid IOB2 around the annotated entity
    untouched = Sentence(["x"], ["O"])
    assert NerTask.merge_predictions([untouched], [(["O"], None)])[0] is untouched


def test_pseudo_strategy_trains_on_the_filled_in_labels(tmp_path, conll_dir, cls_dir, tiny_model_dir, capsys):
    import importlib
    import re

    train = importlib.import_module("tunelab.continual.train").train
    over = [o for o in continual_overrides(conll_dir, cls_dir, tiny_model_dir, tmp_path / "p",
                                           **{"continual.strategy": "pseudo"}) if not o.startswith("experiences.topic")]
    r = train(load_config(None, over))
    filled = re.search(r"org: the previous model's labels filled in (\d+) of 48", capsys.readouterr().err)
    assert filled and int(filled.group(1)) > 10  # the PER/LOC tagger found its entities in the ORG-only data
    assert r["matrix"][1][0] > 0.5  # and so the tagger kept them
    with pytest.raises(TunelabError, match="no two experiences here share a head"):
        load_config(None, continual_overrides(conll_dir, cls_dir, tiny_model_dir, tmp_path / "x", **{
            "continual.strategy": "pseudo", "experiences.org.head": "org"}))
