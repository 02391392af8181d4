"""Re-fine-tuning a saved model on new data: a full folder keeps its head (widened for new labels, old rows
exactly kept), an adapter folder trains on as the same adapter (or merged, as a full model), and the
data options that carve experiences out of one corpus (only_labels, skip_train_examples)."""

import json

import pytest
import torch

from conftest import ner_overrides
from tunelab.config import load_config
from tunelab.data import load_splits
from tunelab.errors import TunelabError
from tunelab.models import load_model, load_tokenizer, widen_head
from tunelab.train import train


def test_widening_keeps_the_old_rows_and_their_logits(ner_run):
    src, _ = ner_run
    labels = json.loads((src / "tunelab.json").read_text())["labels"]
    model = load_model(src, "ner", labels).eval()
    tok = load_tokenizer(src)
    enc = tok(["Angela Merkel visited Paris .", "Reuters said so"], padding=True, return_tensors="pt")
    with torch.no_grad():
        before = model(**enc).logits
    wider = labels + ["B-MISC", "I-MISC"]
    grown = load_model(src, "ner", wider).eval()  # the folder's head is widened, not replaced
    with torch.no_grad():
        after = grown(**enc).logits
    assert after.shape[-1] == len(wider) and grown.config.id2label == dict(enumerate(wider))
    assert torch.equal(after[..., :len(labels)], before)  # old labels' logits are bit-identical
    assert torch.equal(before.argmax(-1), after[..., :len(labels)].argmax(-1))
    assert not torch.equal(grown.classifier.weight[len(labels):], torch.zeros_like(grown.classifier.weight[len(labels):]))
    with pytest.raises(TunelabError, match="first of"):
        widen_head(model, "ner", ["O", "B-X", "I-X"] + labels)


def test_classification_head_with_a_dense_layer_widens_its_output_layer():
    """RoBERTa's head (dense + out_proj): the output projection is widened, the dense layer left alone."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    from tunelab.tasks import task_type

    cfg = RobertaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=40)
    task_type("classify").configure(cfg, ["neg", "pos"])
    torch.manual_seed(0)
    model = RobertaForSequenceClassification(cfg).eval()
    ids = torch.tensor([[0, 5, 6, 7, 2]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    widen_head(model, "classify", ["neg", "pos", "neutral"])
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert model.classifier.dense.out_features == 16 and model.classifier.out_proj.out_features == 3
    assert torch.equal(after[:, :2], before) and model.config.num_labels == 3


def test_continued_training_on_new_entity_types(tmp_path, conll_dir, tiny_model_dir):
    """Experience 1 knows PER and LOC; training on from its folder with ORG-only data widens the head, keeps
    PER/LOC rows in place, and the new folder predicts all three types (plain transformers loads it)."""
    from transformers import AutoModelForTokenClassification

    first = tmp_path / "first"
    train(load_config(None, ner_overrides(conll_dir, tiny_model_dir, first, **{
        "data.only_labels": "[PER,LOC]", "train.epochs": 6})))
    meta1 = json.loads((first / "tunelab.json").read_text())
    assert meta1["labels"] == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    second = tmp_path / "second"
    report = train(load_config(None, ner_overrides(conll_dir, first, second, **{
        "data.only_labels": "[ORG]", "train.epochs": 6})))
    assert report["labels"] == meta1["labels"] + ["B-ORG", "I-ORG"]
    plain = AutoModelForTokenClassification.from_pretrained(str(second))
    assert list(plain.config.id2label.values()) == report["labels"]
    # the ORG-only test split scores ORG; with a new head (model.head=new) the old labels are gone
    gold_types = {t for t, v in report["test"]["per_type"].items() if v["support"]}
    assert gold_types == {"ORG"}  # the test split was cut to ORG too
    fresh = train(load_config(None, ner_overrides(conll_dir, first, tmp_path / "fresh", **{
        "data.only_labels": "[ORG]", "train.epochs": 1, "model.head": "new"})))
    assert fresh["labels"] == ["O", "B-ORG", "I-ORG"]


def test_only_labels_and_windows(conll_dir, cls_dir):
    from tunelab.config import DataConfig

    full = load_splits(DataConfig(train=str(conll_dir / "train.conll"), test=str(conll_dir / "test.conll")), "ner")
    some = load_splits(DataConfig(train=str(conll_dir / "train.conll"), test=str(conll_dir / "test.conll"),
                                  only_labels=["ORG"]), "ner")
    assert len(some.train) == len(full.train)
    for a, b in zip(full.test, some.test):
        assert a.words == b.words and b.tags == [t if t.endswith("ORG") else "O" for t in a.tags]
    window = load_splits(DataConfig(train=str(conll_dir / "train.conll"), skip_train_examples=10,
                                    max_train_examples=5), "ner")
    assert [s.words for s in window.train] == [s.words for s in full.train[10:15]]
    with pytest.raises(TunelabError, match="entity types"):
        load_splits(DataConfig(train=str(conll_dir / "train.conll"), only_labels=["B-ORG"]), "ner")
    cls = load_splits(DataConfig(train=str(cls_dir / "train.jsonl"), dev=str(cls_dir / "dev.jsonl"),
                                 only_labels=["sport", "tech"]), "classify")
    assert {e.label for e in cls.train} == {e.label for e in cls.dev} == {"sport", "tech"}
    with pytest.raises(TunelabError, match="skips every"):
        load_splits(DataConfig(train=str(conll_dir / "train.conll"), skip_train_examples=10**6), "ner")


def test_an_adapter_folder_trains_on(tmp_path, conll_dir, tiny_model_dir):
    """A LoRA folder as model.name: tune.method=lora trains the same adapter on (saved onto the original
    base, plain peft loads it); new labels need tune.method=full, which merges it and widens the head."""
    from peft import PeftModel
    from safetensors.torch import load_file

    first = tmp_path / "lora1"
    lora = {"tune.method": "lora", "tune.lora_r": 4, "train.epochs": 2}
    train(load_config(None, ner_overrides(conll_dir, tiny_model_dir, first, **lora, **{"data.only_labels": "[PER,LOC]"})))
    second = tmp_path / "lora2"
    train(load_config(None, ner_overrides(conll_dir, first, second, **lora, **{"data.only_labels": "[PER,LOC]"})))
    meta = json.loads((second / "tunelab.json").read_text())
    assert meta["base_model"] == str(tiny_model_dir.resolve()) and meta["adapter"]
    a, b = load_file(str(first / "adapter_model.safetensors")), load_file(str(second / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)  # the same adapter, trained on
    base = load_model(tiny_model_dir, "ner", meta["labels"])
    PeftModel.from_pretrained(base, str(second))
    with pytest.raises(TunelabError, match="tune.method=full"):
        train(load_config(None, ner_overrides(conll_dir, first, tmp_path / "bad", **lora)))
    merged = train(load_config(None, ner_overrides(conll_dir, first, tmp_path / "full", **{"train.epochs": 1})))
    assert merged["labels"] == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER", "B-ORG", "I-ORG"]
    assert (tmp_path / "full" / "model.safetensors").is_file()
