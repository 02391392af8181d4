"""model.crf: the CRF's likelihood and decoding, its joint training, and where its transitions travel (saved
folder, Predictor, ONNX export)."""

import itertools
import json

import numpy as np
import pytest
import torch

from tunelab.errors import TunelabError

LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]


def random_crf(seed=0):
    from tunelab.models.crf import CRF

    torch.manual_seed(seed)
    crf = CRF(LABELS)
    with torch.no_grad():
        crf.transitions.normal_(0, 2)
        crf.start.normal_(0, 2)
        crf.end.normal_(0, 2)
    return crf


def path_score(crf, emissions, path):
    """A path's score written out: start + emissions + transitions (forbidden moves at -1e4) + end."""
    from tunelab.models.crf import FORBIDDEN
    from tunelab.tasks.ner import iob2_transitions

    allowed, _ = iob2_transitions(LABELS)
    s = crf.start[path[0]] + emissions[0, path[0]]
    for t in range(1, len(path)):
        a, b = path[t - 1], path[t]
        s = s + (crf.transitions[a, b] if allowed[a, b] else FORBIDDEN) + emissions[t, b]
    return s + crf.end[path[-1]]


def valid_iob2(tags: list[str]) -> bool:
    prev = "O"
    for t in tags:
        if t.startswith("I-") and prev[2:] != t[2:]:
            return False
        prev = t
    return True


def test_log_likelihood_equals_the_brute_force_sum_over_all_paths():
    crf = random_crf()
    emissions = torch.randn(2, 4, len(LABELS))
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    tags = torch.tensor([[1, 2, 0, 3], [3, 4, 0, 0]])
    nll = crf.nll(emissions, tags, mask)
    for b, n in ((0, 4), (1, 3)):
        with torch.no_grad():
            log_z = torch.logsumexp(torch.stack([path_score(crf, emissions[b], p)
                                                 for p in itertools.product(range(len(LABELS)), repeat=n)]), 0)
            want = log_z - path_score(crf, emissions[b], tags[b, :n].tolist())
        assert float(nll[b].detach()) == pytest.approx(float(want), rel=1e-5, abs=1e-4)
    # a row without words costs nothing; gradients reach every score
    empty = crf.nll(emissions[:1], tags[:1], torch.zeros(1, 4, dtype=torch.bool))
    assert float(empty.detach()) == 0.0
    nll.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in crf.parameters())


def test_decoding_finds_the_best_valid_path_and_never_an_invalid_one():
    from tunelab.tasks.ner import iob2_transitions, viterbi

    allowed, start = iob2_transitions(LABELS)
    rng = np.random.default_rng(0)
    for trial in range(60):
        crf = random_crf(trial)
        with torch.no_grad():  # learnt scores that love forbidden moves must not matter
            crf.transitions[0, 2] = 50.0  # O -> I-PER
            crf.transitions[1, 4] = 50.0  # B-PER -> I-LOC
            crf.start[2] = 50.0  # I-PER first
        sc = crf.scores()
        n = int(rng.integers(1, 6))
        emissions = rng.normal(0, 3, (n, len(LABELS))).astype(np.float32)
        path = viterbi(emissions, allowed, start, sc["transitions"], sc["start"], sc["end"])
        assert valid_iob2([LABELS[k] for k in path])
        valid = [p for p in itertools.product(range(len(LABELS)), repeat=n) if valid_iob2([LABELS[k] for k in p])]
        with torch.no_grad():
            best = max(valid, key=lambda p: float(path_score(crf, torch.from_numpy(emissions), p)))
        assert path == list(best)


def test_word_loss_reads_only_the_words_first_pieces():
    crf = random_crf()
    logits = torch.randn(2, 7, len(LABELS))
    # row 0: [CLS] w0 w0' ctx w1 w2 [SEP]; row 1: [CLS] w0 [SEP] pad ...
    labels = torch.tensor([[-100, 1, -100, -100, 2, 0, -100], [-100, 3, -100, -100, -100, -100, -100]])
    got = crf.word_loss(logits, labels)
    first = crf.nll(logits[0, [1, 4, 5]][None], torch.tensor([[1, 2, 0]]), torch.ones(1, 3, dtype=torch.bool))
    second = crf.nll(logits[1, [1]][None], torch.tensor([[3]]), torch.ones(1, 1, dtype=torch.bool))
    assert float(got) == pytest.approx(float((first + second) / 4), rel=1e-6)


@pytest.fixture(scope="module")
def crf_run(tmp_path_factory, conll_dir, tiny_model_dir):
    from tunelab.config import load_config
    from tunelab.train import train

    from conftest import ner_overrides

    out = tmp_path_factory.mktemp("crf-run") / "out"
    report = train(load_config(None, ner_overrides(conll_dir, tiny_model_dir, out, **{
        "train.epochs": 8, "model.crf": True})))
    return out, report


def test_a_crf_run_trains_jointly_and_saves_its_transitions_beside_the_weights(crf_run):
    from safetensors import safe_open
    from transformers import AutoModelForTokenClassification

    out, report = crf_run
    assert report["test"]["main"] > 0.5  # it learned (the tiny model on the made-up data)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert not any(k.startswith("crf") for k in f.keys())
    with safe_open(str(out / "crf.safetensors"), "pt") as f:
        moves = f.get_tensor("transitions")
        assert json.loads(f.metadata()["labels"]) == json.loads((out / "tunelab.json").read_text())["labels"]
    assert moves.abs().max() > 0.05  # the CRF's scores moved from 0 (they train at model.crf_lr)
    assert json.loads((out / "tunelab.json").read_text())["options"] == {"crf": True}
    _, info = AutoModelForTokenClassification.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_the_predictor_decodes_with_the_saved_transitions(crf_run, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from tunelab.data.examples import TextExample
    from tunelab.predict import Predictor
    from tunelab.tasks.ner import NerTask

    out, _ = crf_run
    pred = Predictor(out, "cpu")
    assert pred.task.crf and pred.model.crf is not None
    # a copy whose CRF insists that every sentence starts with B-LOC and never leaves a location
    rigged = tmp_path / "rigged"
    shutil.copytree(out, rigged)
    state = load_file(str(out / "crf.safetensors"))
    labels = json.loads((out / "tunelab.json").read_text())["labels"]
    state["start"][labels.index("B-LOC")] = 1e3
    state["transitions"][labels.index("B-LOC"), labels.index("I-LOC")] = 1e3
    state["transitions"][labels.index("I-LOC"), labels.index("I-LOC")] = 1e3
    save_file(state, str(rigged / "crf.safetensors"))
    examples, _ = NerTask.text_examples([TextExample("John lives in Paris now", None, "x", 1)])
    rigged_pred = Predictor(rigged, "cpu")
    tags = rigged_pred.predict(examples)[0][0]
    assert tags == ["B-LOC"] + ["I-LOC"] * 4
    assert pred.predict(examples)[0][0] != tags
    # the server answers through the same decoding
    from test_serve import live

    with live(rigged_pred) as srv:
        body = srv.predict({"texts": ["John lives in Paris now"]}).json()
    assert body["results"][0]["tags"] == tags
    (rigged / "crf.safetensors").unlink()
    with pytest.raises(TunelabError, match="crf.safetensors is missing"):
        Predictor(rigged, "cpu")


def test_onnx_export_carries_the_crf(crf_run, tmp_path):
    pytest.importorskip("onnxruntime")
    from tunelab.onnx_export import export_onnx

    out, _ = crf_run
    doc = export_onnx(out, tmp_path / "onnx")
    assert (tmp_path / "onnx" / "crf.safetensors").is_file() and "Viterbi" in doc["crf"]["decode"]


@pytest.mark.parametrize("overrides, key", [
    (["task=classify", "model.crf=true"], "model.crf"),
    (["task=ner", "model.crf=true", "tune.method=lora"], "model.crf"),
    (["task=multitask", "model.trim_vocab=true"], "model.trim_vocab"),
])
def test_config_refuses_a_crf_or_trimming_where_it_cannot_work(overrides, key):
    from tunelab.config import load_config

    with pytest.raises(TunelabError, match=key.replace(".", r"\.")):
        load_config(None, ["data.dataset=conll2003", *overrides])
