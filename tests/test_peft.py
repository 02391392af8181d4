"""Parameter-efficient fine-tuning on a tiny random BERT: exactly the chosen parameters change, adapters save
and load in plain peft with the same outputs, merged models load in plain transformers, several adapters
switch on one base, bad targets fail clearly, and resume stays exact."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import kill_after_first_checkpoint, ner_overrides
from tunelab import cli
from tunelab import peft as tuning
from tunelab.config import TuneConfig, load_config
from tunelab.data.conll import read_conll
from tunelab.errors import TunelabError
from tunelab.models import load_model, load_tokenizer
from tunelab.predict import Predictor
from tunelab.train import train

NER_LABELS = ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"]


def tiny(tiny_model_dir, task="ner", labels=NER_LABELS):
    torch.manual_seed(0)
    return load_model(tiny_model_dir, task, labels)


def batch(tiny_model_dir, task):
    tok = load_tokenizer(tiny_model_dir)
    enc = tok(["Angela Merkel visited Paris .", "Reuters said so"], padding=True, return_tensors="pt")
    enc["labels"] = torch.randint(0, 3, enc["input_ids"].shape) if task == "ner" else torch.tensor([0, 2])
    return dict(enc)


CASES = [
    ("lora", {}), ("ia3", {}), ("prompt", {}), ("bitfit", {}), ("head", {}),
    ("full", {"freeze_embeddings": True, "freeze_layers": 1}),
    ("lora", {"lora_embeddings": True}), ("lora", {"freeze_layers": 1}),
]


@pytest.mark.parametrize("task", ["ner", "classify"])
@pytest.mark.parametrize("method,extra", CASES)
def test_exactly_the_chosen_parameters_change(tiny_model_dir, task, method, extra):
    labels = NER_LABELS if task == "ner" else ["a", "b", "c"]
    model = tuning.apply(tiny(tiny_model_dir, task, labels), TuneConfig(method=method, **extra), task, tiny_model_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    data = batch(tiny_model_dir, task)
    for _ in range(3):  # LoRA's B starts at zero, so A first moves on the second step
        model(**data).loss.backward()
        opt.step()
        opt.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable  # everything else is bit-identical

    # The head always trains; the method decides the rest.
    assert any("classifier" in n for n in trainable)
    rest = {n for n in trainable if "classifier" not in n}
    if method == "lora":
        assert rest and all("lora_" in n for n in rest)
        if extra.get("lora_embeddings"):
            assert any("word_embeddings.lora_embedding" in n for n in rest)
        if extra.get("freeze_layers"):
            assert not any("layer.0." in n for n in rest) and any("layer.1." in n for n in rest)
    elif method == "ia3":
        assert rest and all("ia3_" in n for n in rest)
    elif method == "prompt":
        assert rest == {"prompt_encoder.default.embedding.weight"}
    elif method == "bitfit":
        assert rest and all(n.endswith(".bias") for n in rest)
    elif method == "head":
        assert not rest
    else:  # full with the embeddings and layer 0 frozen
        assert not any("embeddings" in n or "layer.0." in n for n in rest)
        assert any("layer.1." in n for n in rest)
    n_train, n_total = tuning.count(model)
    assert n_train == sum(before[n].numel() for n in trainable) and n_train < n_total


def test_bad_target_lists_the_module_names(tiny_model_dir):
    with pytest.raises(TunelabError) as e:
        tuning.apply(tiny(tiny_model_dir), TuneConfig(method="lora", target_modules=["q_proj"]), "ner")
    msg = str(e.value)
    assert "'q_proj' matches no module" in msg and "query" in msg and "value" in msg and "intermediate" not in msg


def test_dotted_target_suffix_and_all_linear(tiny_model_dir):
    model = tuning.apply(tiny(tiny_model_dir), TuneConfig(method="lora", target_modules=["attention.output.dense"]),
                         "ner")
    names = {n for n, p in model.named_parameters() if p.requires_grad and "lora_A" in n}
    assert names and all("attention.output.dense" in n for n in names)
    model = tuning.apply(tiny(tiny_model_dir), TuneConfig(method="lora", target_modules=["all-linear"]), "ner")
    assert any("intermediate.dense.lora_A" in n for n, _ in model.named_parameters())


def test_prefix_on_an_encoder_fails_clearly(tiny_model_dir):
    with pytest.raises(TunelabError, match="prefix tuning needs a model that takes past_key_values"):
        tuning.apply(tiny(tiny_model_dir), TuneConfig(method="prefix"), "ner")


def test_prompt_tuning_token_logits_align_with_words(tiny_model_dir):
    """peft prepends virtual tokens to a token classifier's input; tunelab's hooks keep one logit row per real
    token and the loss on real tokens only."""
    model = tuning.apply(tiny(tiny_model_dir), TuneConfig(method="prompt", virtual_tokens=5), "ner", tiny_model_dir)
    data = batch(tiny_model_dir, "ner")
    out = model(**data)
    assert out.logits.shape[:2] == data["input_ids"].shape
    expected = torch.nn.functional.cross_entropy(out.logits.reshape(-1, len(NER_LABELS)), data["labels"].reshape(-1))
    assert torch.allclose(out.loss, expected, atol=1e-5)


def test_merge_config_rules():
    with pytest.raises(TunelabError, match="tune.merge"):
        load_config(None, ["data.dataset=conll2003", "tune.method=prompt", "tune.merge=true"])
    cfg = load_config(None, ["data.dataset=conll2003", "tune.method=lora", "tune.target_modules=[query,key]"])
    assert cfg.tune.target_modules == ["query", "key"]
    assert load_config(None, ["data.dataset=conll2003", "tune.target_modules=query"]).tune.target_modules == ["query"]


# --- saving and loading ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, conll_dir, tiny_model_dir):
    out = tmp_path_factory.mktemp("lora") / "out"
    report = train(load_config(None, ner_overrides(conll_dir, tiny_model_dir, out, **{
        "tune.method": "lora", "tune.merge": True, "train.lr": 1e-2, "train.epochs": 6})))
    return out, report


def test_lora_run_saves_a_small_adapter_and_learns(lora_run):
    out, report = lora_run
    files = {f.name for f in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "config.json", "tunelab.json", "merged"} <= files
    assert "model.safetensors" not in files
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert any("lora_A" in k for k in adapter) and any("classifier" in k for k in adapter)  # the head travels along
    assert report["tune"]["trainable_params"] < 0.05 * report["tune"]["total_params"]
    assert report["history"][-1]["loss"] < report["history"][0]["loss"] - 0.3
    assert json.loads((out / "config.json").read_text())["id2label"]["0"] == "O"


def test_adapter_plain_peft_and_merged_give_the_same_logits(lora_run, tiny_model_dir, conll_dir):
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForTokenClassification

    out, _ = lora_run
    tok = load_tokenizer(out)
    enc = tok(["Angela Merkel visited Paris .", "Reuters opened an office in Tokyo ."], padding=True,
              return_tensors="pt")
    ours = Predictor(out, device="cpu").model
    base = AutoModelForTokenClassification.from_pretrained(str(tiny_model_dir), config=AutoConfig.from_pretrained(out))
    plain = PeftModel.from_pretrained(base, str(out)).eval()
    merged = AutoModelForTokenClassification.from_pretrained(str(out / "merged")).eval()
    with torch.no_grad():
        a, b, c = (m(**enc).logits for m in (ours, plain, merged))
    assert torch.allclose(a, b, atol=1e-6)
    assert torch.allclose(a, c, atol=1e-5)
    assert merged.config.id2label[1] == "B-LOC"
    sentences = read_conll(conll_dir / "test.conll", labelled=False)
    ours, merged = Predictor(out).predict(sentences), Predictor(out / "merged").predict(sentences)
    assert [p[0] for p in ours] == [p[0] for p in merged]
    assert [x for p in ours for x in p[1]] == pytest.approx([x for p in merged for x in p[1]], abs=1e-5)


def test_adapters_switch_by_name_without_reloading(lora_run, tmp_path, conll_dir, tiny_model_dir):
    """A second adapter with other labels (PER only) on the same base; each adapter keeps its head."""
    per_dir = tmp_path / "per"
    per_dir.mkdir()
    for split in ("train", "dev", "test"):
        lines = (conll_dir / f"{split}.conll").read_text().splitlines()
        keep = [" ".join(ln.split()[:-1] + ["O" if "PER" not in ln.split()[-1] else ln.split()[-1]])
                if ln.strip() and not ln.startswith("-DOCSTART-") else ln for ln in lines]
        (per_dir / f"{split}.conll").write_text("\n".join(keep) + "\n")
    out_per = tmp_path / "out-per"
    train(load_config(None, ner_overrides(per_dir, tiny_model_dir, out_per, **{
        "tune.method": "lora", "train.lr": 1e-2, "train.epochs": 6})))
    out_all, _ = lora_run
    sentences = read_conll(conll_dir / "test.conll", labelled=False)

    both = Predictor(out_all)
    base_weights = {n: p for n, p in both.model.named_parameters() if "lora" not in n}
    both.add_adapter("per", out_per)
    assert all(p is dict(both.model.named_parameters())[n] for n, p in base_weights.items())  # base not reloaded
    alone_all, alone_per = Predictor(out_all).predict(sentences), Predictor(out_per).predict(sentences)
    assert alone_all != alone_per
    assert both.predict(sentences, adapter="per") == alone_per
    assert both.predict(sentences, adapter="default") == alone_all
    assert both.predict(sentences, adapter="per") == alone_per  # and back again
    with pytest.raises(TunelabError, match="no adapter named 'x'"):
        both.predict(sentences, adapter="x")
    with pytest.raises(TunelabError, match="already loaded"):
        both.add_adapter("per", out_per)


@pytest.mark.parametrize("method", ["ia3", "prompt", "bitfit"])
def test_other_methods_save_and_reload(tmp_path, conll_dir, tiny_model_dir, method):
    out = tmp_path / method
    report = train(load_config(None, ner_overrides(conll_dir, tiny_model_dir, out, **{
        "tune.method": method, "train.lr": 1e-2, "train.epochs": 2})))
    sentences = read_conll(conll_dir / "test.conll")
    pred = Predictor(out)
    assert pred.task.metrics(sentences, pred.predict(sentences))["main"] == pytest.approx(report["test"]["main"])
    assert (out / ("model.safetensors" if method == "bitfit" else "adapter_model.safetensors")).is_file()


def test_lora_with_bf16_and_early_stopping(tmp_path, conll_dir, tiny_model_dir):
    report = train(load_config(None, ner_overrides(conll_dir, tiny_model_dir, tmp_path / "o", **{
        "tune.method": "lora", "train.bf16": True, "train.patience": 1, "train.epochs": 30, "train.lr": 1e-2})))
    assert report["stopped_early"] and report["steps"] < report["total_steps"]
    assert report["dev"]["main"] == max(e["dev"] for e in report["evals"])


def test_lora_resume_after_sigkill_is_exact(tmp_path, conll_dir, tiny_model_dir):
    args = ner_overrides(conll_dir, tiny_model_dir, "X", **{"tune.method": "lora", "train.epochs": 3,
                                                           "train.batch_size": 4, "train.save_every": 1})
    recipe = tmp_path / "r.yaml"
    recipe.write_text("task: ner\n")
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    args_a = [a if not a.startswith("output_dir=") else f"output_dir={out_a}" for a in args]
    args_b = [a if not a.startswith("output_dir=") else f"output_dir={out_b}" for a in args]
    assert cli.main(["train", str(recipe), *args_a]) == 0
    kill_after_first_checkpoint(recipe, args_b, tmp_path / "b.log")
    ckpt = load_file(str(out_b / "checkpoint" / "model.safetensors"))
    assert ckpt and all("lora_" in k or "classifier" in k or "position_ids" in k or "token_type_ids" in k
                        for k in ckpt)  # only what trains (and buffers): not the frozen base
    assert cli.main(["train", str(recipe), *args_b, "--resume"]) == 0
    a, b = (load_file(str(o / "adapter_model.safetensors")) for o in (out_a, out_b))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_bad_target_exits_2(tmp_path, conll_dir, tiny_model_dir, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("task: ner\n")
    code = cli.main(["train", str(recipe), *ner_overrides(conll_dir, tiny_model_dir, tmp_path / "o", **{
        "tune.method": "lora", "tune.target_modules": "[nope]"})])
    assert code == 2
    err = capsys.readouterr().err
    assert "'nope' matches no module" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()  # nothing written for a mistake in the config


def test_lora_keeps_the_input_dtype_without_changing_the_result(tiny_model_dir):
    """tunelab stops peft from upcasting LoRA inputs to float32 (a saved copy per layer under autocast):
    the loss and every gradient under bf16 autocast stay bit-identical."""
    data = batch(tiny_model_dir, "ner")
    results = []
    for keep in (True, False):
        model = tuning.apply(tiny(tiny_model_dir), TuneConfig(method="lora", target_modules=["all-linear"],
                                                              lora_dropout=0.0), "ner")
        flags = [m.cast_input_dtype_enabled for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")]
        assert flags and not any(flags)
        if not keep:
            for m in model.modules():
                if hasattr(m, "cast_input_dtype_enabled"):
                    m.cast_input_dtype_enabled = True
        torch.manual_seed(1)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.1)  # LoRA's B starts at zero: make the adapter matter
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**data).loss
        loss.backward()
        results.append((loss.item(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (la, ga), (lb, gb) = results
    assert la == lb and ga.keys() == gb.keys() and all(torch.equal(ga[k], gb[k]) for k in ga)
