"""Speed and memory features: the contention warning (run.Pace), bucketed padding, and int8 export/serving.
No wall-clock asserts: Pace is fed made-up step records, and bucketing and quantisation are checked by their
outputs."""

import torch

from tunelab.train.run import Pace


def feed(pace, rates, tokens=1000, wall=None, cpu=None):
    """Step records at the given tokens/s; returns the warnings."""
    out = []
    for k, r in enumerate(rates):
        w = pace.update({"step": k + 1, "tokens": tokens, "seconds": tokens / r}, wall=wall or tokens / r,
                        cpu=cpu if cpu is not None else 2 * tokens / r)
        if w:
            out.append(w)
    return out


def test_pace_warns_once_when_a_competing_process_slows_training():
    pace = Pace(torch.device("cpu"), threads=2, load=lambda: 3.7, cores=2)
    warnings = feed(pace, [3000] * 13 + [2900] * 10 + [300] * 30)
    assert len(warnings) == 1
    w = warnings[0]
    # it speaks as soon as the last 10 steps' speed is under 0.4 of the start's (a mixed window here)
    assert "tokens/s from 3,000 at its start" in w and "3.7 on 2 cores" in w and "train.threads=1" in w


def test_pace_starved_process_counts_without_load_average():
    # the load average not (yet) above the cores, but the process got well under its threads' CPU time
    pace = Pace(torch.device("cpu"), threads=2, load=lambda: 1.0, cores=2)
    (w,) = feed(pace, [3000] * 13 + [500] * 10, cpu=0.5)  # 0.5 CPU-s per 2 s step
    assert "got 0.2 CPU-seconds per second for its 2 threads" in w


def test_pace_quiet_when_slow_without_contention_or_slightly_slower():
    idle = Pace(torch.device("cpu"), threads=2, load=lambda: 0.5, cores=2)
    assert feed(idle, [3000] * 13 + [500] * 30) == []  # its own reason (longer sequences), CPU fully used
    busy = Pace(torch.device("cpu"), threads=2, load=lambda: 4.0, cores=2)
    assert feed(busy, [3000] * 13 + [1800] * 30) == []  # above 0.4 of the reference: no warning
    gpu = Pace(torch.device("cuda"), threads=2, load=lambda: 9.0, cores=2)
    assert feed(gpu, [3000] * 13 + [30] * 30) == []


def test_pace_one_thread_suggests_no_thread_change():
    pace = Pace(torch.device("cpu"), threads=1, load=lambda: 5.0, cores=2)
    (w,) = feed(pace, [3000] * 13 + [200] * 10, cpu=1.0)
    assert "train.threads=1" not in w and "Stop the other job" in w


def test_gradient_checkpointing_trains_the_same(tmp_path, conll_dir, tiny_model_dir):
    from conftest import ner_overrides

    from tunelab.config import load_config
    from tunelab.models import load_model, recompute_activations
    from tunelab.train import train

    model = load_model(tiny_model_dir, "ner", ["O", "B-PER", "I-PER"])
    recompute_activations(model)
    assert model.is_activation_checkpointing
    reports = [train(load_config(None, ner_overrides(conll_dir, tiny_model_dir, tmp_path / str(on), **{
        "train.epochs": 1, "train.gradient_checkpointing": on}))) for on in (False, True)]
    plain, recomputed = ([h["loss"] for h in r["history"]] for r in reports)
    # recomputation replays the forward's dropout masks (non-reentrant checkpointing restores the RNG state)
    assert len(plain) > 3 and max(abs(a - b) for a, b in zip(plain, recomputed)) < 1e-5
    assert reports[0]["test"]["main"] == reports[1]["test"]["main"]


def test_gradient_checkpointing_refused_where_unsupported():
    import pytest

    from tunelab.config import load_config
    from tunelab.errors import TunelabError

    with pytest.raises(TunelabError, match="train.gradient_checkpointing"):
        load_config(None, ["task=rl", "train.gradient_checkpointing=true"])


# --- int8 ------------------------------------------------------------------------------------------------------


def outlier_copy(folder, dest):
    """A copy of a NER folder whose float predictions are unchanged but whose int8 version is broken: the last
    layer's output gets one huge hidden dimension (LayerNorm bias 1e4) that the classifier ignores (weights 0).
    Dynamic int8 quantises a Linear layer's input with one scale for the whole tensor, so that dimension
    crushes every other to 0, the outlier-activation failure known from large models' int8 inference."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(folder, dest)
    weights = load_file(str(dest / "model.safetensors"))
    ln = max(k for k in weights if k.endswith("output.LayerNorm.bias") and ".attention." not in k)
    weights[ln][0] = 1e4
    weights["classifier.weight"][:, 0] = 0.0
    save_file(weights, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return dest


def test_int8_predictor_agrees_with_float(ner_run, conll_dir):
    from tunelab.data.conll import read_conll
    from tunelab.predict import Predictor

    folder = ner_run[0]
    float_p = Predictor(folder, device="cpu")
    int8_p = Predictor(folder, device="cpu", quantize="int8")
    (doc,) = int8_p.quantized.values()
    assert doc["agreement"] >= 0.98 and doc["positions"] > 100
    int8_linear = torch.ao.nn.quantized.dynamic.Linear
    assert any(isinstance(m, int8_linear) for m in int8_p.model.modules())
    assert not any(isinstance(m, int8_linear) for m in float_p.model.modules())
    test = read_conll(conll_dir / "test.conll")
    a, b = float_p.predict(test), int8_p.predict(test)
    same = sum(x == y for (p, _), (q, _) in zip(a, b) for x, y in zip(p, q)) / sum(len(p) for p, _ in a)
    assert same >= 0.97
    assert abs(float_p.evaluate(test)["main"] - int8_p.evaluate(test)["main"]) < 0.05


def test_int8_refuses_a_model_that_does_not_quantise(ner_run, tmp_path, capsys):
    import pytest

    from tunelab import cli
    from tunelab.errors import TunelabError
    from tunelab.predict import Predictor

    bad = outlier_copy(ner_run[0], tmp_path / "outlier")
    text = tmp_path / "in.txt"
    text.write_text("John Smith works for Google in London .\n")
    # the float model tags as the original folder does: only its int8 version is broken
    from tunelab.data.examples import TextExample

    good, odd = Predictor(ner_run[0], device="cpu"), Predictor(bad, device="cpu")
    examples, _ = good.task.text_examples([TextExample("John Smith works for Google in London .")])
    assert [tags for tags, _ in odd.predict(examples)] == [tags for tags, _ in good.predict(examples)]
    with pytest.raises(TunelabError, match="agree with the float model's on only"):
        Predictor(bad, device="cpu", quantize="int8")
    assert cli.main(["predict", str(bad), str(text), "--quantize", "int8"]) != 0
    assert "do not quantise well" in capsys.readouterr().err
    Predictor(bad, device="cpu", quantize="int8", min_agreement=0.0)  # the user may accept it knowingly
    out = tmp_path / "onnx"
    assert cli.main(["export", str(bad), str(out), "--onnx", "--quantize", "int8"]) != 0
    assert not out.exists() or not any(out.iterdir())  # nothing written


def test_int8_onnx_export(ner_run, tmp_path, capsys):
    import json

    import numpy as np
    import onnxruntime as ort

    from tunelab import cli
    from tunelab.predict import Predictor

    folder, out = ner_run[0], tmp_path / "onnx8"
    assert cli.main(["export", str(folder), str(out), "--onnx", "--quantize", "int8"]) == 0
    printed = capsys.readouterr().out
    assert "int8: its predictions agree" in printed
    doc = json.loads((out / "onnx.json").read_text())
    q = doc["quantized"]
    assert q["agreement"] >= 0.98 and q["bytes"] < q["float_bytes"]
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert any(n.op_type in ("DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul")
               for n in __import__("onnx").load(str(out / "model.onnx")).graph.node)
    pred = Predictor(folder, device="cpu")
    t, model = pred.use()
    from tunelab.data.examples import TextExample
    from tunelab.inference import feature_logits

    examples, _ = t.text_examples([TextExample("John Smith works for Google in London .")])
    (f,) = t.encode(examples, training=False)
    (want,) = feature_logits(model, [f], t.pad, pred.device)
    (got,) = session.run(["logits"], {"input_ids": np.array([f["input_ids"]]),
                                      "attention_mask": np.ones((1, len(f["input_ids"])), dtype=np.int64)})
    assert (got[0].argmax(-1) == want.argmax(-1)).mean() >= 0.9


def test_int8_serve_refusals(ner_run):
    import pytest

    from tunelab.errors import TunelabError
    from tunelab.serve import ServeOptions, load_service

    with pytest.raises(TunelabError, match="do not go together"):
        load_service(ServeOptions(str(ner_run[0]), device="cpu", bf16=True, quantize="int8"))
    service = load_service(ServeOptions(str(ner_run[0]), device="cpu", quantize="int8"))
    assert service.describe()["quantized"]["ner"]["agreement"] >= 0.98


# --- bucketed padding --------------------------------------------------------------------------------------------


def test_bucketed_padding_keeps_outputs(ner_run, conll_dir):
    from tunelab.data.batching import collate, model_inputs
    from tunelab.data.conll import read_conll
    from tunelab.predict import Predictor

    pred = Predictor(ner_run[0], device="cpu")
    task, model = pred.use()
    feats = task.encode(read_conll(conll_dir / "test.conll")[:16], training=True)
    plain, bucketed = collate(feats, task.pad), collate(feats, task.pad, 16)
    n = plain["input_ids"].shape[1]
    assert bucketed["input_ids"].shape[1] % 16 == 0 and bucketed["input_ids"].shape[1] > n
    assert (bucketed["attention_mask"][:, n:] == 0).all() and (bucketed["labels"][:, n:] == -100).all()
    assert (bucketed["input_ids"][:, n:] == task.pad).all()
    with torch.no_grad():
        a = model(**model_inputs(plain)).logits
        b = model(**model_inputs(bucketed)).logits[:, :n]
        real = plain["attention_mask"].bool()
        torch.testing.assert_close(a[real], b[real], atol=1e-5, rtol=1e-5)
        assert torch.equal(a[real].argmax(-1), b[real].argmax(-1))
        # and the loss the training step differentiates is the same
        torch.testing.assert_close(model(**plain).loss, model(**bucketed).loss, atol=1e-6, rtol=1e-6)


def test_training_with_bucketed_padding(tmp_path, conll_dir, tiny_model_dir):
    from conftest import ner_overrides

    from tunelab.config import load_config
    from tunelab.train import train

    # without dropout: its masks are drawn for the padded shape, so with it a bucketed run is another draw
    reports = [train(load_config(None, ner_overrides(conll_dir, tiny_model_dir, tmp_path / str(m), **{
        "train.epochs": 1, "train.pad_to_multiple_of": m, "model.dropout": 0.0}))) for m in (1, 8)]
    plain, bucketed = ([h["loss"] for h in r["history"]] for r in reports)
    assert max(abs(a - b) for a, b in zip(plain, bucketed)) < 1e-4
    assert reports[0]["test"]["main"] == reports[1]["test"]["main"]
    assert reports[1]["padding_share"] > reports[0]["padding_share"]  # the extra padding is counted


# --- train.bf16: auto ----------------------------------------------------------------------------------------


def test_bf16_auto_follows_the_hardware(monkeypatch):
    import pytest

    from tunelab import runtime
    from tunelab.config import load_config
    from tunelab.errors import TunelabError

    data = ["data.dataset=conll2003", "train.device=cpu"]
    for flags, want in ((["avx512f", "avx512_bf16"], True), (["amx_bf16"], True), (["avx512f", "avx2"], False),
                        ([], False)):
        monkeypatch.setattr(runtime, "cpu_flags", lambda flags=flags: flags)
        assert runtime.fast_bf16("cpu") is want
        assert load_config(None, data).train.bf16 is want  # auto is the default, resolved at load
        assert load_config(None, data + ["train.bf16=auto"]).train.bf16 is want
        assert load_config(None, data + ["train.bf16=false"]).train.bf16 is False
        assert load_config(None, data + ["train.bf16=true"]).train.bf16 is True
    with pytest.raises(TunelabError, match="use true, false or auto"):
        load_config(None, data + ["train.bf16=fast"])


# --- train.loss_weighting: tokens --------------------------------------------------------------------------------


def test_token_weights_give_every_labelled_token_the_same_weight():
    import pytest

    from tunelab.distributed import batch_weights

    feats = [{"labels": [-100] + [1] * n + [-100]} for n in (1, 1, 1, 1, 5, 5, 5, 5)]
    w = batch_weights(feats, [[0, 1, 2, 3], [4, 5, 6, 7]])  # 4 and 20 labelled tokens, mean 12
    assert w == [4 / 12, 20 / 12]
    # a step's gradient is sum_b w_b * mean_b = sum over tokens / mean units: each token weighs the same
    per_token = [wb / sum(len(f["labels"]) - 2 for f in fs) for wb, fs in zip(w, (feats[:4], feats[4:]))]
    assert per_token == pytest.approx([1 / 12] * 2)
    assert batch_weights([{"labels": 3}] * 6, [[0, 1, 2], [3, 4, 5]]) == [1.0, 1.0]  # classes: one unit each


def test_token_weighted_training_logs_the_plain_loss(tmp_path, conll_dir, tiny_model_dir):
    from conftest import ner_overrides

    from tunelab.config import load_config
    from tunelab.train import train

    reports = [train(load_config(None, ner_overrides(conll_dir, tiny_model_dir, tmp_path / w, **{
        "train.epochs": 1, "train.loss_weighting": w, "model.dropout": 0.0, "train.max_grad_norm": 0}))) for w in
        ("batch", "tokens")]  # (no clipping: a clipped gradient has its norm, whatever the batch's weight)
    plain, weighted = ([h["loss"] for h in r["history"]] for r in reports)
    assert abs(plain[0] - weighted[0]) < 1e-6  # the same first batch and weights: the same (unweighted) loss
    assert max(abs(a - b) for a, b in zip(plain[1:], weighted[1:])) > 1e-4  # then the updates differ


def test_int8_only_where_its_check_means_something():
    from types import SimpleNamespace

    import pytest

    from tunelab.errors import TunelabError
    from tunelab.quantize import refuse_unsupported

    for kind in ("ner", "classify", "relation"):
        refuse_unsupported(SimpleNamespace(kind=kind, predicts=True), torch.device("cpu"))
    for kind in ("regress", "multilabel", "qa", "generate", "pretrain"):
        with pytest.raises(TunelabError, match=f"not a {kind} model"):
            refuse_unsupported(SimpleNamespace(kind=kind, predicts=kind != "pretrain"), torch.device("cpu"))
    with pytest.raises(TunelabError, match="runs on the CPU"):
        refuse_unsupported(SimpleNamespace(kind="ner", predicts=True), torch.device("cuda"))
