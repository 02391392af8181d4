"""PEFT on the real packaged models, small: LoRA on all-MiniLM-L6-v2 learns CoNLL-2003 entities, and LoRA on
SmolLM2-135M-Instruct (converted once from its GGUF package) learns to write BBC headlines on CPU."""

import pytest

from tunelab.config import load_config
from tunelab.data import load_splits
from tunelab.predict import Predictor
from tunelab.train import train


def test_minilm_lora_learns_conll(tmp_path):
    out = tmp_path / "out"
    cfg = load_config(None, [
        "task=ner", "model.name=all-MiniLM-L6-v2", "data.dataset=conll2003", "data.max_train_examples=3000",
        "data.max_eval_examples=300", "train.epochs=1", "train.batch_size=16", "train.lr=2e-3", "train.bf16=true",
        "train.threads=2", "train.device=cpu", "tune.method=lora", "tune.target_modules=[all-linear]",
        "tune.lora_dropout=0", f"output_dir={out}"])
    splits = load_splits(cfg.data, cfg.task)
    splits.test = splits.test[:300]
    report = train(cfg, splits=splits)
    assert report["tune"]["trainable_params"] < 0.02 * report["tune"]["total_params"]
    # One epoch on 3000 sentences: about 0.6 test F1 (full fine-tuning: about 0.7); all-O or a frozen head
    # stays near 0.
    assert report["test"]["main"] > 0.4, report["test"]["micro"]
    assert (out / "adapter_model.safetensors").stat().st_size < 2_000_000
    pred = Predictor(out, bf16=True)  # as the report's test metrics were computed (train.bf16=true)
    assert pred.task.metrics(splits.test, pred.predict(splits.test))["main"] == pytest.approx(report["test"]["main"])


def test_smollm2_lora_learns_headlines(tmp_path):
    out = tmp_path / "out"
    cfg = load_config(None, [
        "task=generate", "model.name=SmolLM2-135M-Instruct", "data.dataset=bbc_headlines",
        "data.prompt_suffix=\nHeadline:", "data.max_target_length=20", "model.max_length=128",
        "data.max_train_examples=80", "data.max_eval_examples=8", "train.epochs=1", "train.batch_size=8",
        "train.lr=2e-3", "train.warmup_ratio=0", "train.bf16=true", "train.threads=2", "train.device=cpu",
        "tune.method=lora", f"output_dir={out}"])
    splits = load_splits(cfg.data, cfg.task)
    splits.test = splits.test[:8]
    report = train(cfg, splits=splits)
    assert report["steps"] == 10 and report["tune"]["trainable_params"] == 460_800

    # The same test prompts under the pretrained model: 10 LoRA steps must lower the loss on headlines it
    # never saw by a wide margin (about 5 -> 3.5 per token here).
    import torch

    from tunelab.models import load_model, load_tokenizer, resolve_model_path
    from tunelab.predict import evaluate
    from tunelab.tasks import make_task

    path = resolve_model_path("SmolLM2-135M-Instruct")
    task = make_task("generate", load_tokenizer(path), [], 128, prompt_suffix="\nHeadline:", max_target_length=20)
    before = evaluate(task, load_model(path, "generate", []), splits.test, torch.device("cpu"), True)["loss"]
    assert report["test"]["loss"] < before - 1.0, (before, report["test"]["loss"])
    outputs = Predictor(out, bf16=True).predict(splits.test[:2])  # the report's samples were written under bf16
    assert outputs == [s["output"] for s in report["samples"][:2]] and all(outputs)


def test_minilm_multitask_ner_and_sentiment(tmp_path):
    """One MiniLM encoder learns CoNLL entities and Rotten Tomatoes sentiment together (slices, one epoch),
    and the exported NER task loads in plain transformers with its labels."""
    from transformers import AutoModelForTokenClassification

    from tunelab.multitask import train as train_multitask
    from tunelab.multitask.model import export
    from tunelab.predict import read_meta

    out = tmp_path / "out"
    cfg = load_config(None, [
        "task=multitask", "model.name=all-MiniLM-L6-v2", "model.max_length=128", f"output_dir={out}",
        "tasks.ner.task=ner", "tasks.ner.data.dataset=conll2003", "tasks.ner.data.max_train_examples=2000",
        "tasks.ner.data.max_eval_examples=300", "tasks.mood.task=classify", "tasks.mood.data.dataset=rt_sentiment",
        "tasks.mood.data.max_train_examples=2000", "tasks.mood.data.max_eval_examples=300",
        "multitask.sampling=proportional", "train.epochs=1", "train.batch_size=16", "train.lr=1e-4",
        "train.bf16=true", "train.threads=2", "train.device=cpu"])
    report = train_multitask(cfg)
    # One epoch on 2000 examples each: about 0.6 NER test F1 and 0.7 sentiment accuracy; an encoder that
    # learned nothing gives ~0 F1 and ~0.5 accuracy.
    assert report["tasks"]["ner"]["test"]["main"] > 0.45, report["tasks"]["ner"]["test"]["micro"]
    assert report["tasks"]["mood"]["test"]["accuracy"] > 0.6
    export(out, read_meta(out), "ner", tmp_path / "ner")
    plain = AutoModelForTokenClassification.from_pretrained(str(tmp_path / "ner"))
    assert set(plain.config.id2label.values()) == set(report["tasks"]["ner"]["labels"])
