"""The shared training step (tunelab.train.step) and its seams: with no loss term and no perturbation it is
the loop the recipes ran before, bit for bit; a loss term of 0 changes nothing; loss terms and perturbations
are applied, logged and checkpointed; the per-epoch data seam is what an epoch trains on."""

import importlib.util
import json
import sys

import pytest
import torch
from conftest import checkpointing_recipe, kill_at_checkpoint

from tunelab.data import read_file
from tunelab.data.batching import collate
from tunelab.models import load_model, load_tokenizer
from tunelab.runtime import autocast
from tunelab.tasks import make_task
from tunelab.train.optim import build_optimizer, step as optimizer_step
from tunelab.train.step import Step, micro_batch


def _setup(model_dir, conll_dir, dropout=0.1):
    tok = load_tokenizer(model_dir)
    sents = read_file(conll_dir / "train.conll", "ner")[:24]
    labels = sorted({t for s in sents for t in s.tags})
    task = make_task("ner", tok, labels, 64)
    feats = task.encode(sents, training=True)
    torch.manual_seed(0)
    model = load_model(model_dir, "ner", labels, dropout)
    model.train()
    batches = [collate(feats[i:i + 4], task.pad) for i in range(0, 24, 4)]
    return model, batches


def _train(model, batches, run_micro, accum=2):
    """Three optimizer steps of `accum` micro-batches each, dropout on, seeded: the weights after."""
    torch.manual_seed(1)
    opt, sched = build_optimizer(model, 1e-3, 0.01, None, "linear", 1, 3)
    for k, batch in enumerate(batches):
        run_micro(model, batch, accum)
        if (k + 1) % accum == 0:
            optimizer_step(model, opt, sched, 1.0)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _before(model, batch, accum, bf16=False):
    """The supervised loop's micro-batch as it was written inline before the shared step."""
    device = torch.device("cpu")
    with autocast(device, bf16):
        output = model(**batch)
    loss = output.loss
    (loss / accum).backward()


def _assert_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), n


@pytest.mark.parametrize("bf16", [False, True])
def test_shared_step_is_bit_identical_to_the_inline_loop(tiny_model_dir, conll_dir, bf16):
    model, batches = _setup(tiny_model_dir, conll_dir)
    want = _train(model, batches, lambda m, b, a: _before(m, b, a, bf16))
    model, batches = _setup(tiny_model_dir, conll_dir)
    got = _train(model, batches, lambda m, b, a: micro_batch(m, m, b, device=torch.device("cpu"), bf16=bf16,
                                                              accum=a))
    _assert_equal(want, got)


class Zero:
    name = "zero"

    def __call__(self, mb):
        return mb.output.logits.sum() * 0.0


class Scaled:
    """A loss term that doubles the task loss: the gradient must be that of 2x the loss."""
    name = "again"

    def __call__(self, mb):
        return mb.output.loss


def test_a_zero_loss_term_changes_nothing_and_a_term_is_added_before_backward(tiny_model_dir, conll_dir):
    cpu = torch.device("cpu")
    model, batches = _setup(tiny_model_dir, conll_dir)
    want = _train(model, batches, lambda m, b, a: micro_batch(m, m, b, device=cpu, bf16=False, accum=a))
    model, batches = _setup(tiny_model_dir, conll_dir)
    results = []
    got = _train(model, batches, lambda m, b, a: results.append(
        micro_batch(m, m, b, device=cpu, bf16=False, accum=a, step=Step(terms=[Zero()]))))
    _assert_equal(want, got)
    assert all(r.terms == {"zero": 0.0} for r in results)

    model, batches = _setup(tiny_model_dir, conll_dir, dropout=0.0)
    model.zero_grad()
    r = micro_batch(model, model, batches[0], device=cpu, bf16=False, step=Step(terms=[Scaled()]))
    doubled = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model(**batches[0]).loss.backward()
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert torch.allclose(doubled[n], 2 * p.grad, rtol=1e-5, atol=1e-7), n
    assert r.objective == pytest.approx(2 * r.loss) and r.terms["again"] == pytest.approx(r.loss)


class Nudge:
    """A perturbation: one more forward/backward on the same batch with a shifted input embedding, restored
    afterwards (the shape of FGM)."""
    name = "nudge"

    def __init__(self):
        self.seen = None

    def __call__(self, mb, backward):
        emb = mb.model.get_input_embeddings()
        self.seen = emb.weight.detach().clone()
        with torch.no_grad():
            emb.weight.add_(0.01)
        loss = mb.forward(**mb.batch).loss
        backward(loss)
        with torch.no_grad():
            emb.weight.sub_(0.01)
        return {"loss": loss.item()}


def test_a_perturbation_adds_its_backward_and_restores(tiny_model_dir, conll_dir):
    cpu = torch.device("cpu")
    model, batches = _setup(tiny_model_dir, conll_dir, dropout=0.0)
    nudge = Nudge()
    r = micro_batch(model, model, batches[0], device=cpu, bf16=False, step=Step(perturbation=nudge), accum=2)
    both = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert torch.allclose(model.get_input_embeddings().weight, nudge.seen, atol=1e-7)  # restored
    assert r.logs["loss"] > 0

    model.zero_grad()
    (model(**batches[0]).loss / 2).backward()
    clean = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    with torch.no_grad():
        model.get_input_embeddings().weight.add_(0.01)
    (model(**batches[0]).loss / 2).backward()
    with torch.no_grad():
        model.get_input_embeddings().weight.sub_(0.01)
    for n in clean:
        assert torch.allclose(both[n], clean[n] + model.get_parameter(n).grad, rtol=1e-4, atol=1e-6), n


# --- stateful components: checkpointed, exact after kill -9 + resume --------------------------------------

SCRIPT = '''
"""A supervised run with a stateful loss term (its running mean of the loss shapes every gradient)."""
import sys

import torch

from tunelab.config import load_config
from tunelab.train import train
from tunelab.train.step import Step


class RunningMean:
    name = "running_mean"

    def __init__(self):
        self.mean, self.calls = torch.zeros(()), 0

    def __call__(self, mb):
        value = 0.5 * self.mean * mb.output.loss
        self.mean = 0.7 * self.mean + 0.3 * mb.output.loss.detach().float()
        self.calls += 1
        return value

    def state_dict(self):
        return {"mean": self.mean, "calls": self.calls}

    def load_state_dict(self, state):
        self.mean, self.calls = state["mean"], state["calls"]


def run(recipe, out, resume=False, term=None):
    term = term or RunningMean()
    report = train(load_config(recipe, [f"output_dir={out}"]), resume=resume, step=Step(terms=[term]))
    return report, term


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2])
'''


def test_stateful_loss_term_survives_sigkill_and_resume_exactly(tmp_path, conll_dir, tiny_model_dir):
    from tunelab.train import checkpoint
    from safetensors.torch import load_file

    recipe = checkpointing_recipe(tmp_path / "recipe.yaml", conll_dir, tiny_model_dir, 2)
    script = tmp_path / "stateful_run.py"
    script.write_text(SCRIPT)
    spec = importlib.util.spec_from_file_location("stateful_run", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    report_a, term_a = mod.run(recipe, tmp_path / "a")
    assert term_a.calls == report_a["steps"] == 24
    assert all("term/running_mean" in h for h in report_a["history"])

    out_b = tmp_path / "b"
    kill_at_checkpoint([sys.executable, str(script), str(recipe), str(out_b)], out_b, tmp_path / "b.log")
    killed_at = json.loads((checkpoint.find(out_b) / "state.json").read_text())["step"]
    assert 1 <= killed_at < 24

    report_b, term_b = mod.run(recipe, out_b, resume=True)
    assert term_b.calls == 24  # the resumed term counted on from the checkpoint, not from 0
    assert [h["loss"] for h in report_b["history"]] == [h["loss"] for h in report_a["history"]]
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(out_b / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_per_epoch_data_seam_decides_what_each_epoch_trains_on(tmp_path, conll_dir, tiny_model_dir):
    from tunelab.config import load_config
    from tunelab.train import train

    seen = []
    cfg = load_config(None, ["task=ner", f"model.name={tiny_model_dir}", f"data.train={conll_dir / 'train.conll'}",
                             "train.epochs=2", "train.batch_size=8", "train.device=cpu", "train.threads=2",
                             f"output_dir={tmp_path / 'run'}"])

    def epoch_data(seed, epoch):
        seen.append((seed, epoch))
        from tunelab.data import load_splits
        from tunelab.tasks import make_task

        sents = load_splits(cfg.data, "ner").train
        labels = sorted({t for s in sents for t in s.tags})
        # after the first epoch only 4 sentences: one batch of 4 rows an epoch
        keep = sents if epoch == 0 else sents[:4]
        return make_task("ner", load_tokenizer(tiny_model_dir), labels, 64).encode(keep, training=True)

    report = train(cfg, epoch_data=epoch_data)
    assert len(read_file(conll_dir / "train.conll", "ner")) == 48  # 6 batches of 8 in the first epoch
    assert report["total_steps"] == 12
    assert [h["samples"] for h in report["history"]] == [8] * 6 + [4] * 6
    assert seen == [(42, e) for e in range(7)]
