"""Robust fine-tuning (tunelab.robust): FGM/PGD/FreeLB perturb the input embeddings by the requested amount,
train on the perturbed input and leave the model as they found it; R-Drop's term is the symmetric KL of two
dropout passes; the `robust:` section drives the recipes end to end, resumes exactly, and RL refuses it."""

import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import checkpointing_recipe, kill_after_first_checkpoint, ner_overrides
from safetensors.torch import load_file

from tunelab import cli
from tunelab.config import load_config
from tunelab.data import read_file
from tunelab.data.batching import collate
from tunelab.errors import TunelabError
from tunelab.models import load_model, load_tokenizer
from tunelab.robust import FGM, PGD, FreeLB, RDrop
from tunelab.robust.adversarial import shifted
from tunelab.tasks import make_task
from tunelab.train import checkpoint, train
from tunelab.train.step import MicroBatch, Step, micro_batch

CPU = torch.device("cpu")


def _batch(kind, model_dir, data_path, dropout=0.0, n=4):
    """A tiny model of `kind` in train mode and one collated batch of n examples (kind t5: generation with an
    encoder-decoder)."""
    seq2seq = kind == "t5"
    kind = "generate" if seq2seq else kind
    tok = load_tokenizer(model_dir)
    examples = read_file(data_path, kind)[:n]
    labels = sorted({t for e in examples for t in e.tags}) if kind == "ner" else \
        sorted({e.label for e in examples}) if kind == "classify" else []
    options = {"max_target_length": 8, "encoder_decoder": seq2seq} if kind == "generate" else {}
    task = make_task(kind, tok, labels, 64, **options)
    torch.manual_seed(0)
    model = load_model(model_dir, kind, labels, None if seq2seq else dropout)  # (model.dropout misses T5's key)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = dropout
        elif isinstance(getattr(m, "dropout", None), float):  # functional dropout (T5's attention)
            m.dropout = dropout
    model.train()
    return model, collate(task.encode(examples, training=True), task.pad)


@pytest.fixture(params=["ner", "classify", "generate", "t5"])
def kind_batch(request, tiny_model_dir, tiny_causal_dir, tiny_t5_dir, conll_dir, cls_dir, gen_dir):
    where = {"ner": (tiny_model_dir, conll_dir / "train.conll"), "classify": (tiny_model_dir, cls_dir / "train.jsonl"),
             "generate": (tiny_causal_dir, gen_dir / "train.jsonl"),
             "t5": (tiny_t5_dir, gen_dir / "train.jsonl")}[request.param]
    return request.param, where


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _hooks(model) -> list:
    return [(name, list(m._forward_hooks)) for name, m in model.named_modules() if m._forward_hooks]


def _embeds(model, batch, delta):
    """A hand forward: inputs_embeds = the input embeddings + delta, the rest of the batch as is."""
    rest = {k: v for k, v in batch.items() if k != "input_ids"}
    return model(inputs_embeds=model.get_input_embeddings()(batch["input_ids"]) + delta, **rest)


def _norms(delta):
    return delta.flatten(1).norm(dim=1)


def test_fgm_perturbs_by_epsilon_trains_on_it_and_restores(kind_batch):
    kind, (model_dir, path) = kind_batch
    model, batch = _batch(kind, model_dir, path)
    before = _params(model)
    fgm = FGM(epsilon=0.5)
    r = micro_batch(model, model, batch, device=CPU, bf16=False, step=Step(perturbation=fgm), accum=2)
    both = _grads(model)
    assert torch.allclose(_norms(fgm.last), torch.full((len(batch["input_ids"]),), 0.5), atol=1e-5)
    assert torch.all(fgm.last[batch["attention_mask"] == 0] == 0)  # no perturbation on padding
    after = _params(model)
    assert all(torch.equal(before[n], after[n]) for n in before)  # bit-identical: only .grad changed
    assert not _hooks(model)

    model.zero_grad()
    adv = _embeds(model, batch, fgm.last).loss
    assert adv.item() == pytest.approx(r.logs["loss"], rel=1e-5)
    assert r.logs["delta_norm"] == pytest.approx(0.5, rel=1e-5)
    (adv / 2).backward()
    adv_grad = _grads(model)
    model.zero_grad()
    (model(**batch).loss / 2).backward()
    for n, g in _grads(model).items():
        assert torch.allclose(both[n], g + adv_grad[n], rtol=1e-4, atol=1e-6), n


def _embedding_calls(model) -> list:
    """Counts the input-embedding module's forward calls (a list that grows by one per call)."""
    from tunelab.robust.adversarial import input_embedding

    calls = []
    input_embedding(model).register_forward_hook(lambda *a: calls.append(1))
    return calls


def _hand_direction(model, batch, eps):
    """eps * the per-example unit gradient of the clean loss w.r.t. the input embeddings, padding masked."""
    zero = torch.zeros((*batch["input_ids"].shape, model.get_input_embeddings().embedding_dim), requires_grad=True)
    g, = torch.autograd.grad(_embeds(model, batch, zero).loss, zero)
    g = g * batch["attention_mask"].unsqueeze(-1)
    return eps * g / _norms(g).view(-1, 1, 1)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_fgm_direction_is_the_clean_gradient_taken_from_the_clean_pass(method, tiny_model_dir, conll_dir):
    """With trainable embeddings FGM reads its direction off the clean backward (2 forward passes in all);
    with frozen ones (LoRA) it takes a pass of its own (3); the direction is the same either way."""
    from tunelab.peft import apply

    model, batch = _batch("ner", tiny_model_dir, conll_dir / "train.conll")
    if method == "lora":
        model = apply(model, load_config(None, ["task=ner", "data.train=x", "tune.method=lora"]).tune, "ner",
                      tiny_model_dir)
        model.train()
    want = _hand_direction(model, batch, 0.7)
    calls = _embedding_calls(model)
    fgm = FGM(epsilon=0.7)
    micro_batch(model, model, batch, device=CPU, bf16=False, step=Step(perturbation=fgm))
    assert len(calls) == (2 if method == "full" else 3)
    assert torch.allclose(fgm.last, want, atol=1e-6)
    assert fgm.grad is None  # consumed: a later batch never sees this one's gradient

    calls.clear()
    pgd = PGD(epsilon=1.0, alpha=0.25, steps=2)  # the first ascent step is the clean gradient too
    micro_batch(model, model, batch, device=CPU, bf16=False, step=Step(perturbation=pgd))
    assert len(calls) == (3 if method == "full" else 4)


def test_perturbed_losses_are_weighted_as_the_clean_loss(tiny_model_dir, conll_dir):
    """Multi-task weighting: FGM's loss gets the task's factor (fixed weight w: every gradient scales by w),
    and uncertainty weighting's additive ½·s is counted once, for the clean loss."""
    model, batch = _batch("ner", tiny_model_dir, conll_dir / "train.conll")
    grads = {}
    for w in (1.0, 3.0):
        model.zero_grad()
        micro_batch(model, model, batch, device=CPU, bf16=False, step=Step(perturbation=FGM(0.5)),
                    weigh=lambda loss, w=w: w * loss)
        grads[w] = _grads(model)
    for name, g in grads[1.0].items():
        assert torch.allclose(grads[3.0][name], 3 * g, rtol=1e-4, atol=1e-7), name

    s = torch.nn.Parameter(torch.tensor(0.4))
    model.zero_grad()
    r = micro_batch(model, model, batch, device=CPU, bf16=False, step=Step(perturbation=FGM(0.5)),
                    weigh=lambda loss: 0.5 * torch.exp(-s) * loss + 0.5 * s)
    # d/ds [½e^-s L + ½s + ½e^-s L_adv] = -½e^-s (L + L_adv) + ½
    want = -0.5 * math.exp(-0.4) * (r.loss + r.logs["loss"]) + 0.5
    assert s.grad.item() == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("method", ["lora", "prompt"])
def test_fgm_on_a_peft_model_perturbs_the_frozen_base_embeddings(method, tiny_model_dir, conll_dir):
    from tunelab.peft import apply

    model, batch = _batch("ner", tiny_model_dir, conll_dir / "train.conll")
    tune = load_config(None, ["task=ner", "data.train=x", f"tune.method={method}"]).tune
    model = apply(model, tune, "ner", tiny_model_dir)
    model.train()
    before, hooks = _params(model), _hooks(model)  # (peft's prompt tuning has hooks of its own)
    fgm = FGM(epsilon=0.5)
    r = micro_batch(model, model, batch, device=CPU, bf16=False, step=Step(perturbation=fgm))
    assert torch.allclose(_norms(fgm.last), torch.full((4,), 0.5), atol=1e-5) and math.isfinite(r.logs["loss"])
    assert r.logs["loss"] != pytest.approx(r.loss)  # the perturbed input changed the loss
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters()) and _hooks(model) == hooks


def test_pgd_stays_in_the_ball_and_reaches_it_with_large_steps(tiny_model_dir, conll_dir):
    model, batch = _batch("ner", tiny_model_dir, conll_dir / "train.conll")
    before = _params(model)
    small = PGD(epsilon=1.0, alpha=0.1, steps=3)
    r = micro_batch(model, model, batch, device=CPU, bf16=False, step=Step(perturbation=small))
    assert torch.all(_norms(small.last) <= 0.3 + 1e-5)  # K steps of alpha never leave the ball
    assert r.logs["loss"] == pytest.approx(_embeds(model, batch, small.last).loss.item(), rel=1e-5)
    large = PGD(epsilon=0.5, alpha=10.0, steps=3)
    micro_batch(model, model, batch, device=CPU, bf16=False, step=Step(perturbation=large))
    assert torch.allclose(_norms(large.last), torch.full((4,), 0.5), atol=1e-5)  # projected onto the sphere
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters()) and not _hooks(model)


def test_freelb_accumulates_the_hand_computed_gradient(tiny_model_dir, conll_dir):
    model, batch = _batch("ner", tiny_model_dir, conll_dir / "train.conll")
    eps, alpha, accum = 0.8, 0.4, 2
    freelb = FreeLB(epsilon=eps, alpha=alpha, steps=2, seed=7)
    r = micro_batch(model, model, batch, device=CPU, bf16=False, step=Step(perturbation=freelb), accum=accum)
    got = _grads(model)

    # By hand: the clean loss, then 2 adversarial losses / 2 from a uniform start with one projected ascent step.
    model.zero_grad()
    (model(**batch).loss / accum).backward()
    mask = batch["attention_mask"].unsqueeze(-1).float()
    width = model.get_input_embeddings().embedding_dim
    noise = torch.rand((*batch["input_ids"].shape, width), generator=torch.Generator().manual_seed(7)) * 2 - 1
    delta = noise * mask * eps / (mask.sum(dim=(1, 2), keepdim=True) * width).sqrt()
    losses = []
    for k in range(2):
        delta = delta.detach().requires_grad_(True)
        loss = _embeds(model, batch, delta).loss
        (loss / 2 / accum).backward()
        losses.append(loss.item())
        if k == 0:
            g = delta.grad * mask
            step = delta.detach() + alpha * g / g.flatten(1).norm(dim=1).view(-1, 1, 1)
            n = step.flatten(1).norm(dim=1).view(-1, 1, 1)
            delta = step * torch.clamp(eps / n, max=1.0)
    want = _grads(model)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.allclose(got[name], want[name], rtol=1e-4, atol=1e-6), name
    assert r.logs["loss"] == pytest.approx(sum(losses) / 2, rel=1e-5)
    assert torch.allclose(freelb.last, delta.detach(), atol=1e-6) and not _hooks(model)

    state = freelb.state_dict()  # the generator's state travels with checkpoints
    again = FreeLB(seed=0)
    again.load_state_dict(state)
    assert torch.equal(torch.rand(3, generator=again.generator), torch.rand(3, generator=freelb.generator))


def test_hooks_are_removed_when_a_forward_fails(tiny_model_dir, conll_dir):
    model, batch = _batch("ner", tiny_model_dir, conll_dir / "train.conll")
    output = model(**batch)

    def fails(**inputs):
        raise RuntimeError("boom")

    for perturbation in (FGM(), PGD(), FreeLB()):
        with pytest.raises(RuntimeError, match="boom"):
            perturbation(MicroBatch(model, batch, output, fails), lambda loss: loss.backward())
        assert not _hooks(model)
    with shifted(model):
        assert _hooks(model)
    assert not _hooks(model)


def test_fgm_and_rdrop_under_bf16_autocast(tiny_model_dir, conll_dir):
    model, batch = _batch("ner", tiny_model_dir, conll_dir / "train.conll", dropout=0.1)
    r = micro_batch(model, model, batch, device=CPU, bf16=True, step=Step([RDrop(1.0)], FGM()), accum=2)
    assert math.isfinite(r.logs["loss"]) and math.isfinite(r.terms["rdrop"]) and r.terms["rdrop"] > 0


def test_rdrop_is_the_symmetric_kl_of_two_dropout_passes(kind_batch):
    kind, (model_dir, path) = kind_batch
    model, batch = _batch(kind, model_dir, path, dropout=0.2)
    torch.manual_seed(5)
    r = micro_batch(model, model, batch, device=CPU, bf16=False, step=Step(terms=[RDrop(2.0)]))
    torch.manual_seed(5)  # the same dropout masks, by hand
    a, b = model(**batch).logits, model(**batch).logits
    labels = batch["labels"]
    if kind == "generate":  # a causal LM's logits at t predict the label at t + 1
        a, b, labels = a[:, :-1], b[:, :-1], labels[:, 1:]
    if kind != "classify":
        a, b = a[labels != -100], b[labels != -100]
    la, lb = F.log_softmax(a, -1), F.log_softmax(b, -1)
    kl = 0.5 * (F.kl_div(lb, la, log_target=True, reduction="none").sum(-1)
                + F.kl_div(la, lb, log_target=True, reduction="none").sum(-1))
    assert r.terms["rdrop"] == pytest.approx(2.0 * kl.mean().item(), rel=1e-5)
    assert r.terms["rdrop"] > 0


def test_supervised_run_with_fgm_and_rdrop(tmp_path, conll_dir, tiny_model_dir):
    out = tmp_path / "run"
    cfg = load_config(None, ner_overrides(conll_dir, tiny_model_dir, out, **{
        "train.epochs": 1, "robust.adversarial": "fgm", "robust.rdrop": 1}))
    report = train(cfg)
    assert report["robust"] == {"adversarial": "fgm", "epsilon": 1.0, "alpha": 0.3, "steps": 3, "rdrop": 1.0,
                                "augment": {}, "augment_intensity": 0.1}
    assert all(math.isfinite(h["loss"]) for h in report["history"])
    assert all({"perturb/loss", "perturb/delta_norm", "term/rdrop"} <= set(h) for h in report["history"])
    md = (out / "report.md").read_text()
    mean = sum(h["term/rdrop"] for h in report["history"]) / len(report["history"])
    assert "Robust training: adversarial training FGM (epsilon 1); R-Drop (weight 1)." in md
    assert f"R-Drop term {mean:.4f}" in md and "perturbation norm 1.0000" in md
    start = load_file(tiny_model_dir / "model.safetensors")
    end = load_file(out / "model.safetensors")
    key = "embeddings.word_embeddings.weight"
    assert not torch.equal(start[key], end["bert." + key])


def test_resume_after_sigkill_with_freelb_is_exact(tmp_path, conll_dir, tiny_model_dir):
    recipe = checkpointing_recipe(tmp_path / "recipe.yaml", conll_dir, tiny_model_dir, 1,
                                  "robust: {adversarial: freelb, steps: 2, epsilon: 0.5, alpha: 0.2}\n")
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    report_a = train(load_config(recipe, [f"output_dir={out_a}"]))
    kill_after_first_checkpoint(recipe, [f"output_dir={out_b}"], tmp_path / "b.log")
    killed_at = json.loads((checkpoint.find(out_b) / "state.json").read_text())["step"]
    assert 1 <= killed_at < report_a["steps"]
    assert cli.main(["train", str(recipe), f"output_dir={out_b}", "--resume"]) == 0
    report_b = json.loads((out_b / "report.json").read_text())
    assert [h["loss"] for h in report_b["history"]] == [h["loss"] for h in report_a["history"]]
    assert [h["perturb/loss"] for h in report_b["history"]] == [h["perturb/loss"] for h in report_a["history"]]
    a, b = load_file(out_a / "model.safetensors"), load_file(out_b / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_multitask_run_with_fgm(tmp_path, conll_dir, cls_dir, tiny_model_dir):
    from tunelab.multitask import train as mt_train

    over = {"task": "multitask", "model.name": tiny_model_dir, "output_dir": tmp_path / "mt", "train.threads": 2,
            "train.epochs": 1, "train.batch_size": 8, "train.device": "cpu", "robust.adversarial": "fgm",
            "tasks.ner.task": "ner", "tasks.ner.data.train": conll_dir / "train.conll",
            "tasks.ner.data.dev": conll_dir / "dev.conll", "tasks.topic.task": "classify",
            "tasks.topic.data.train": cls_dir / "train.jsonl", "tasks.topic.data.dev": cls_dir / "dev.jsonl"}
    report = mt_train(load_config(None, [f"{k}={v}" for k, v in over.items()]))
    assert report["robust"]["adversarial"] == "fgm" and report["steps"] == report["total_steps"]
    assert all("perturb/loss" in h and math.isfinite(h["perturb/loss"]) for h in report["history"])


def test_config_ranges_and_rl_refuses_robust():
    with pytest.raises(TunelabError, match="robust.epsilon"):
        load_config(None, ["task=ner", "data.train=x.conll", "robust.epsilon=0"])
    with pytest.raises(TunelabError, match="robust.adversarial"):
        load_config(None, ["task=ner", "data.train=x.conll", "robust.adversarial=awp"])
    with pytest.raises(TunelabError, match="task: rl has no robust"):
        load_config(None, ["task=rl", "data.train=p.jsonl", "rl.rewards.length=1", "robust.rdrop=1"])
    assert sys.modules["tunelab.robust"].step_from_config(load_config(None, ["task=ner", "data.train=x"]).robust) \
        == Step()
