"""The robust.augment config section: validated where it is written, turned into the recipes' per-epoch data
(tunelab.robust.augmenter_from_config), and so what each epoch trains on."""

import pytest
from conftest import ner_overrides

from tunelab.config import AUGMENTATIONS, load_config
from tunelab.errors import TunelabError
from tunelab.robust.augment import OPS
from tunelab.train import train


def test_the_config_names_the_registry_of_operations():
    assert tuple(OPS) == AUGMENTATIONS


def test_augment_section_is_checked_where_it_is_written(tmp_path):
    cfg = load_config(None, ["task=ner", "data.train=x.conll", "robust.augment.swap=0.5",
                             "robust.augment.mentions=1"])
    assert cfg.robust.augment == {"swap": 0.5, "mentions": 1.0}
    with pytest.raises(TunelabError, match="'robust.augment.typo': no augmentation 'typo'; one of char_noise"):
        load_config(None, ["task=ner", "data.train=x.conll", "robust.augment.typo=0.1"])
    recipe = tmp_path / "r.yaml"
    recipe.write_text("task: ner\ndata: {train: x.conll}\nrobust:\n  augment:\n    swap: 0\n")
    with pytest.raises(TunelabError, match=r"r.yaml:5: config key 'robust.augment.swap': 0.0 is out of range"):
        load_config(recipe)
    with pytest.raises(TunelabError, match="task: rl has no robust"):
        load_config(None, ["task=rl", "data.train=p.jsonl", "rl.rewards.length=1", "robust.augment.swap=0.5"])


def test_each_epoch_trains_on_augmented_data(tmp_path, conll_dir, tiny_model_dir):
    common = {"train.epochs": 2, "data.dev": "null", "data.test": "null"}
    plain = train(load_config(None, ner_overrides(conll_dir, tiny_model_dir, tmp_path / "plain", **common)))
    # every sentence loses O words each epoch: fewer tokens, the same sentences (and steps)
    deleted = train(load_config(None, ner_overrides(conll_dir, tiny_model_dir, tmp_path / "del", **common, **{
        "robust.augment.delete": 1, "robust.augment_intensity": 0.5})))
    assert deleted["steps"] == plain["steps"]
    assert deleted["train_tokens"] < plain["train_tokens"]
    again = train(load_config(None, ner_overrides(conll_dir, tiny_model_dir, tmp_path / "again", **common, **{
        "robust.augment.delete": 1, "robust.augment_intensity": 0.5})))
    assert [h["loss"] for h in again["history"]] == [h["loss"] for h in deleted["history"]]  # seeded
    mentions = train(load_config(None, ner_overrides(conll_dir, tiny_model_dir, tmp_path / "ment", **common, **{
        "robust.augment.mentions": 1, "robust.augment.neighbours": 0.5, "robust.augment.char_noise": 0.5})))
    assert mentions["steps"] == plain["steps"]


def test_multitask_augmentation_keeps_each_task_stream_the_same_size(tmp_path, conll_dir, cls_dir, tiny_model_dir):
    from tunelab.multitask import train as mt_train

    over = {"task": "multitask", "model.name": tiny_model_dir, "output_dir": tmp_path / "mt", "train.threads": 2,
            "train.epochs": 2, "train.batch_size": 8, "train.device": "cpu", "robust.augment.insert": 1,
            "robust.augment.swap": 1, "tasks.ner.task": "ner", "tasks.ner.data.train": conll_dir / "train.conll",
            "tasks.ner.data.dev": conll_dir / "dev.conll", "tasks.topic.task": "classify",
            "tasks.topic.data.train": cls_dir / "train.jsonl", "tasks.topic.data.dev": cls_dir / "dev.jsonl"}
    report = mt_train(load_config(None, [f"{k}={v}" for k, v in over.items()]))
    assert report["steps"] == report["total_steps"] and report["robust"]["augment"] == {"insert": 1.0, "swap": 1.0}


def test_generation_has_no_augmentation(tmp_path, gen_dir, tiny_causal_dir, capsys):
    from conftest import gen_overrides

    from tunelab import cli

    recipe = tmp_path / "r.yaml"
    recipe.write_text("task: generate\n")
    assert cli.main(["train", str(recipe), *gen_overrides(gen_dir, tiny_causal_dir, tmp_path / "g"),
                     "robust.augment.swap=0.5"]) == 2
    assert "a generate task's examples have none of its operations" in capsys.readouterr().err
