"""Supervised generation on tiny random decoder-only (Llama) and encoder-decoder (T5) models: the loss sits on
the reference only, training lowers it, outputs match plain transformers/peft, and every tuning method that
peft offers for generators works."""

import json

import pytest
import torch

from conftest import gen_overrides
from tunelab import cli
from tunelab import peft as tuning
from tunelab.config import TuneConfig, load_config
from tunelab.data import GenExample, read_file
from tunelab.data.batching import collate
from tunelab.errors import TunelabError
from tunelab.models import load_model, load_tokenizer
from tunelab.predict import Predictor, predict
from tunelab.tasks import make_task
from tunelab.train import train


def test_causal_encoding_puts_the_loss_on_the_reference_only(minilm_tokenizer):
    tok = minilm_tokenizer
    task = make_task("generate", tok, [], 32, prompt_suffix=" =>", max_target_length=4)
    (f,) = task.encode([GenExample("copy: red cat", "red cat")], training=True)
    prompt = tok("copy: red cat")["input_ids"] + tok(" =>", add_special_tokens=False)["input_ids"]
    target = tok(" red cat", add_special_tokens=False)["input_ids"] + [tok.sep_token_id]
    assert f["input_ids"] == prompt + target
    assert f["labels"] == [-100] * len(prompt) + target
    # a long target keeps its first max_target_length - 1 tokens and the end token
    (g,) = task.encode([GenExample("p", "one two three four five")], training=True)
    assert [x for x in g["labels"] if x != -100] == tok(" one two three", add_special_tokens=False)["input_ids"] + \
        [tok.sep_token_id]
    # a long prompt loses its end, never the suffix or the target
    long = GenExample(" ".join(["word"] * 100), "red")
    (h,) = task.encode([long], training=True)
    assert len(h["input_ids"]) == 32 and task.truncated == 1
    assert h["input_ids"][-len(target) + 1:] == tok(" red", add_special_tokens=False)["input_ids"] + [tok.sep_token_id]
    # prediction: the prompt and suffix alone
    (p,) = task.encode([GenExample("copy: red cat", None)], training=False)
    assert p["input_ids"] == prompt


def test_seq2seq_encoding_and_collate(minilm_tokenizer):
    tok = minilm_tokenizer
    task = make_task("generate", tok, [], 8, encoder_decoder=True, max_target_length=16)
    feats = task.encode([GenExample("copy: red cat dog bird sun moon tree", "red"),
                         GenExample("copy: a", "red cat dog")], training=True)
    assert len(feats[0]["input_ids"]) == 8 and feats[0]["input_ids"][-1] == tok.sep_token_id  # cut, still closed
    assert feats[1]["labels"] == tok("red cat dog", add_special_tokens=False)["input_ids"] + [tok.sep_token_id]
    batch = collate(feats, 0)
    assert batch["input_ids"].shape == (2, 8) and batch["labels"].shape == (2, 4)  # labels padded on their own
    assert batch["labels"][0].tolist() == feats[0]["labels"] + [-100] * 2


@pytest.fixture(scope="module")
def causal_run(tmp_path_factory, gen_dir, tiny_causal_dir):
    out = tmp_path_factory.mktemp("gen") / "out"
    report = train(load_config(None, gen_overrides(gen_dir, tiny_causal_dir, out, **{"train.epochs": 6})))
    return out, report


def test_causal_training_lowers_the_reference_loss(causal_run):
    out, report = causal_run
    first, last = report["evals"][0], report["evals"][-1]
    assert last["metrics"]["loss"] < first["metrics"]["loss"] - 0.5
    assert report["test"]["perplexity"] == pytest.approx(2.718281828 ** report["test"]["loss"], rel=1e-6)
    assert len(report["samples"]) == 8 and all(isinstance(s["output"], str) for s in report["samples"])
    md = (out / "report.md").read_text()
    assert "Sample outputs" in md and "perplexity" in md


def test_causal_folder_loads_in_plain_transformers(causal_run, gen_dir):
    out, _ = causal_run
    examples = read_file(gen_dir / "test.jsonl", "generate")[:4]
    assert Predictor(out).predict(examples) == plain_greedy(out, examples, max_new_tokens=8)


def plain_greedy(folder, examples, max_new_tokens: int) -> list[str]:
    """Greedy outputs of the folder loaded with plain transformers, one prompt at a time (no padding)."""
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(folder)
    model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    plain = []
    for e in examples:  # one at a time, no padding: tunelab's batched left-padded decoding must agree
        ids = torch.tensor([tok(e.prompt)["input_ids"] + tok("\n", add_special_tokens=False)["input_ids"]])
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, eos_token_id=tok.sep_token_id,
                             pad_token_id=tok.pad_token_id)
        plain.append(tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return plain


def test_max_new_tokens_per_call(causal_run, gen_dir, minilm_tokenizer):
    """A call may ask for fewer new tokens than the model's bound (the server does, per request), without
    changing the task; more than the bound, or a bound for a task that does not generate, is an error."""
    out, _ = causal_run
    examples = read_file(gen_dir / "test.jsonl", "generate")[:4]
    pred = Predictor(out)
    assert pred.predict(examples, max_new_tokens=2) == plain_greedy(out, examples, max_new_tokens=2)
    assert pred.task.max_target_length == 8
    assert pred.predict(examples) == plain_greedy(out, examples, max_new_tokens=8)
    for bad in (0, 9):
        with pytest.raises(ValueError, match="max_target_length \\(8\\)"):
            pred.predict(examples, max_new_tokens=bad)
    with pytest.raises(ValueError, match="for generation"):
        predict(make_task("ner", minilm_tokenizer, ["O"], 32), None, [], "cpu", max_new_tokens=2)


@pytest.mark.parametrize("method", ["lora", "ia3", "prompt", "prefix"])
def test_causal_adapters(tmp_path, gen_dir, tiny_causal_dir, method):
    out = tmp_path / method
    report = train(load_config(None, gen_overrides(gen_dir, tiny_causal_dir, out, **{
        "tune.method": method, "train.epochs": 3, "tune.virtual_tokens": 4, "train.lr": 3e-2})))
    assert report["evals"][-1]["metrics"]["loss"] < report["evals"][0]["metrics"]["loss"] or \
        report["dev"]["loss"] < report["evals"][0]["metrics"]["loss"] + 1e-9
    assert report["tune"]["trainable_params"] < 0.2 * report["tune"]["total_params"]
    pred = Predictor(out)
    examples = read_file(gen_dir / "test.jsonl", "generate")
    assert pred.evaluate(examples)["loss"] == pytest.approx(report["test"]["loss"], rel=1e-5)


def test_causal_lora_keeps_the_lm_head_frozen(tiny_causal_dir):
    model = load_model(tiny_causal_dir, "generate", [])
    model = tuning.apply(model, TuneConfig(method="lora"), "generate")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_causal_lora_plain_peft_same_logits(tmp_path, gen_dir, tiny_causal_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "o"
    train(load_config(None, gen_overrides(gen_dir, tiny_causal_dir, out, **{
        "tune.method": "lora", "tune.merge": True, "train.epochs": 2})))
    ids = torch.tensor([load_tokenizer(out)("copy: red cat")["input_ids"]])
    ours = Predictor(out).model
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_causal_dir)), str(out)).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(out / "merged")).eval()
    with torch.no_grad():
        a, b, c = (m(input_ids=ids).logits for m in (ours, plain, merged))
    assert torch.allclose(a, b, atol=1e-6) and torch.allclose(a, c, atol=1e-5)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_seq2seq_training(tmp_path, gen_dir, tiny_t5_dir, method):
    out = tmp_path / method
    report = train(load_config(None, gen_overrides(gen_dir, tiny_t5_dir, out, **{
        "tune.method": method, "train.epochs": 4})))
    assert report["dev"]["loss"] < report["history"][0]["loss"]
    assert report["evals"][-1]["metrics"]["loss"] < report["evals"][0]["metrics"]["loss"]
    examples = read_file(gen_dir / "test.jsonl", "generate")
    pred = Predictor(out)
    assert pred.evaluate(examples)["loss"] == pytest.approx(report["test"]["loss"], rel=1e-5)
    assert [s["output"] for s in report["samples"]] == pred.predict(examples[:8])


def test_cli_generate_predict_and_eval(causal_run, gen_dir, tmp_path, capsys):
    out, report = causal_run
    assert cli.main(["predict", str(out), "copy: red cat dog"]) == 0
    rec = json.loads(capsys.readouterr().out.strip())
    assert rec["prompt"] == "copy: red cat dog" and isinstance(rec["output"], str)
    assert cli.main(["eval", str(out), "--data", str(gen_dir / "test.jsonl"), "-o", str(tmp_path / "m.json"),
                     "--predictions", str(tmp_path / "p.jsonl")]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["loss"] == pytest.approx(report["test"]["loss"], rel=1e-5)
    lines = (tmp_path / "p.jsonl").read_text().splitlines()
    assert len(lines) == 16 and json.loads(lines[0])["reference"]


def test_generation_data_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "target": "b"}\n{"prompt": "a", "answer": "b"}\n')
    with pytest.raises(TunelabError, match=r"bad.jsonl:2: no field 'target'"):
        read_file(bad, "generate")
    bad.write_text('{"prompt": "a", "target": ""}\n')
    with pytest.raises(TunelabError, match=r"bad.jsonl:1: field 'target' must be a non-empty string"):
        read_file(bad, "generate")
    with pytest.raises(TunelabError, match="generation data must be JSONL or CSV"):
        read_file(tmp_path / "x.conll", "generate")
    with pytest.raises(TunelabError, match="is an NER set, but task=generate"):
        from tunelab.data import load_splits

        load_splits(load_config(None, ["task=generate", "data.dataset=conll2003"]).data, "generate")


def test_text_overrides_keep_their_text():
    cfg = load_config(None, ["task=generate", "data.dataset=bbc_headlines", "data.prompt_suffix=\nHeadline:"])
    assert cfg.data.prompt_suffix == "\nHeadline:"


def test_bbc_headlines_is_bbc_news_with_titles():
    from tunelab.data.packaged import bbc_headlines, bbc_news

    heads, news = bbc_headlines(), bbc_news()
    for split in ("train", "dev", "test"):
        assert [e.source for e in getattr(heads, split)] == [e.source for e in getattr(news, split)]
    e = heads.test[0]
    assert e.prompt.startswith("Article: ") and e.target and e.target not in e.prompt
    assert len(e.prompt.split()) <= 122


def test_python_api_in_memory_generation(tmp_path, tiny_causal_dir):
    import datasets

    import tunelab
    from conftest import make_gen_records

    recs = make_gen_records(7, 16)
    report = tunelab.finetune(None, ["train.epochs=1", "train.batch_size=8", "train.threads=2", "train.device=cpu",
                                     "data.max_target_length=8"], task="generate",
                              model={"name": str(tiny_causal_dir)}, output_dir=str(tmp_path / "o"),
                              train=datasets.Dataset.from_list(recs), dev=recs[:4], test=[(r["prompt"], r["target"])
                                                                                          for r in recs[4:8]])
    assert report["sizes"] == {"train": 16, "dev": 4, "test": 4} and report["steps"] == 2
    assert report["test"]["loss"] > 0
    with pytest.raises(TunelabError, match="record 0: target must be a non-empty string"):
        from tunelab.data import from_records

        from_records([{"prompt": "a", "target": ""}], "generate")
