"""Policy-gradient RL (task: rl) on tiny random models: estimator losses against hand computations, KL 0 before
the first update, a toy reward that rises, RLOO's lower gradient variance, the LoRA reference equal to the base
model, rewards against their libraries, resume after a kill, encoder-decoder policies, bad configs."""

import json
import math

import pytest
import torch

from conftest import gen_overrides, kill_after_first_checkpoint
from tunelab.config import load_config
from tunelab.errors import TunelabError
from tunelab.rl import estimators as est
from tunelab.rl import rewards as rw

TOY_REWARD = """
def low_half(prompts, completions, references, completion_ids, **kw):
    # the share of a completion's tokens in the lower half of the vocabulary (ids < 15000)
    return [sum(t < 15000 for t in ids) / max(1, len(ids)) for ids in completion_ids]

def wrong_length(prompts, completions, references, **kw):
    return [1.0]

def not_numbers(prompts, completions, references, **kw):
    return ["high"] * len(completions)
"""


@pytest.fixture()
def toy_reward(tmp_path, monkeypatch):
    (tmp_path / "rl_toy_reward.py").write_text(TOY_REWARD)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "rl_toy_reward:low_half"


def rl_overrides(gen_dir, model_dir, out, **extra) -> list[str]:
    values = {"task": "rl", "rl.steps": 3, "rl.prompts_per_step": 4, "rl.samples_per_prompt": 3,
              "rl.max_new_tokens": 6, "rl.eval_prompts": 6, "rl.lr": 1e-3, "rl.save_every": 2,
              "rl.rewards.length": 1.0, "rl.target_words": 3, "tune.method": "lora",
              "tune.lora_dropout": 0.0}
    values.update(extra)
    return gen_overrides(gen_dir, model_dir, out, **values)


def run(overrides, **kw):
    from tunelab.rl import train

    return train(load_config(None, overrides), **kw)


# --- estimators against hand computations -----------------------------------------------------------------

def test_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.5, 0.2, 0.4, 0.9])  # 2 prompts x 3 samples
    assert torch.allclose(est.advantages(r, "reinforce", 3, baseline=0.3), r - 0.3)
    assert torch.allclose(est.advantages(r, "reinforce", 3), r)
    # leave-one-out: sample 0 against the mean of samples 1 and 2 of its prompt
    loo = torch.tensor([1.0 - 0.25, 0.0 - 0.75, 0.5 - 0.5, 0.2 - 0.65, 0.4 - 0.55, 0.9 - 0.3])
    assert torch.allclose(est.advantages(r, "rloo", 3), loo)
    assert torch.allclose(est.advantages(r, "ppo", 3), loo)
    assert torch.allclose(est.advantages(r, "ppo", 1, baseline=0.1), r - 0.1)
    greedy = torch.tensor([0.6, 0.1])
    assert torch.allclose(est.advantages(r, "self_critical", 3, greedy_rewards=greedy),
                          r - torch.tensor([0.6, 0.6, 0.6, 0.1, 0.1, 0.1]))
    with pytest.raises(ValueError):
        est.advantages(r, "rloo", 1)


def test_policy_losses_by_hand():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, -9.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # second completion ended after 2 tokens
    adv = torch.tensor([0.5, -2.0])
    T = 4  # max_new_tokens: the fixed normaliser
    pg = est.policy_loss(logp, mask, adv, T)
    hand = -(0.5 * (-1.0 - 2.0 - 0.5) + -2.0 * (-0.3 - 0.7)) / (2 * T)
    assert pg.item() == pytest.approx(hand)

    # PPO: ratios exp(logp - old); token (0,0) has ratio e^0.5 > 1.2 with A > 0 -> clipped at 1.2;
    # token (1,1) ratio e^-0.5 < 0.8 with A < 0 -> min(r*A, 0.8*A) = 0.8*A (clipped, larger loss)
    old = torch.tensor([[-1.5, -2.0, -0.5], [-0.3, -0.2, -9.0]])
    ppo = est.policy_loss(logp, mask, adv, T, old_logp=old, clip=0.2)
    terms = [min(math.exp(0.5) * 0.5, 1.2 * 0.5), 0.5, 0.5, min(1 * -2.0, 1 * -2.0),
             min(math.exp(-0.5) * -2.0, 0.8 * -2.0)]
    assert ppo.item() == pytest.approx(-sum(terms) / (2 * T))

    # At ratio 1 (the first pass) the clipped surrogate has REINFORCE's gradient.
    g_pg = torch.autograd.grad(est.policy_loss(logp, mask, adv, T), logp)[0]
    g_ppo = torch.autograd.grad(est.policy_loss(logp, mask, adv, T, old_logp=logp.detach(), clip=0.2), logp)[0]
    assert torch.allclose(g_pg, g_ppo)
    assert g_pg[1, 2] == 0  # padding after the end gets no gradient


def test_kl_whitening_baseline_and_adaptive_coefficient_by_hand():
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -0.1]])
    ref = torch.tensor([[-1.5, -1.0], [-0.5, -3.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    kl = est.sequence_kl(logp, ref, mask)
    assert kl.tolist() == pytest.approx([0.5 - 1.0, 0.0])
    assert est.shaped_rewards(torch.tensor([1.0, 2.0]), kl, 0.1).tolist() == pytest.approx([1.05, 2.0])
    w = est.whiten(torch.tensor([1.0, 2.0, 3.0]))
    assert w.tolist() == pytest.approx([-1.0, 0.0, 1.0])
    b = est.MovingBaseline(0.9)
    b.update(torch.tensor([1.0, 3.0]))
    assert b.value == 2.0
    b.update(torch.tensor([0.0]))
    assert b.value == pytest.approx(1.8)
    assert est.adaptive_kl(0.1, kl=6.0, target=4.0, horizon=100, n_steps=10) == pytest.approx(0.1 * (1 + 0.2 * 0.1))
    assert est.adaptive_kl(0.1, kl=3.0, target=4.0, horizon=100, n_steps=10) == pytest.approx(0.1 * (1 - 0.2 * 0.1))
    assert est.adaptive_kl(0.1, kl=3.6, target=4.0, horizon=100, n_steps=10) == pytest.approx(0.1 * (1 - 0.1 * 0.1))
    ent = torch.tensor([[1.0, 3.0], [2.0, 9.0]])
    assert est.entropy_bonus(ent, mask).item() == pytest.approx(2.0)


# --- rewards -----------------------------------------------------------------------------------------------

def test_rewards_against_their_libraries(cls_model):
    import sacrebleu
    from rouge_score import rouge_scorer

    from tunelab.data.examples import TextExample
    from tunelab.predict import Predictor

    comps = ["the cat sat on the mat", "a dog ran home", "the the the the"]
    refs = ["the cat sat on a mat", "the dog ran home fast", "nothing alike"]
    assert rw.bleu(None, comps, refs) == pytest.approx([sacrebleu.sentence_bleu(c, [r]).score / 100
                                                        for c, r in zip(comps, refs)])
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    assert rw.rouge_l(None, comps, refs) == pytest.approx([scorer.score(r, c)["rougeL"].fmeasure
                                                           for c, r in zip(comps, refs)])
    assert rw.length_penalty(4)(None, comps, refs) == pytest.approx([-0.5, 0.0, 0.0])
    assert rw.repetition(None, comps, refs) == pytest.approx([0.0, 0.0, -2 / 3])
    assert rw.distinct_n(["a b a", "a b"], 1) == pytest.approx(2 / 5)
    assert rw.distinct_n(["a b a", "a b"], 2) == pytest.approx(2 / 3)
    with pytest.raises(TunelabError, match="reference"):
        rw.bleu(None, comps, [None, None, None])

    labels = json.loads((cls_model / "tunelab.json").read_text())["labels"]
    reward = rw.ClassifierReward(cls_model, labels[1], device="cpu")
    pred = Predictor(cls_model, device="cpu").predict([TextExample(c) for c in comps])
    assert reward(["p"] * 3, comps, refs) == pytest.approx([p[1][1] for p in pred])
    with pytest.raises(TunelabError, match="not a label"):
        rw.ClassifierReward(cls_model, "no-such-label")


def test_weighted_sum_and_user_functions(toy_reward):
    from types import SimpleNamespace

    cfg = SimpleNamespace(rewards={"length": 2.0, "repetition": 0.5, toy_reward: 1.0}, target_words=4)
    combined = rw.build(cfg)
    comps = ["a b a b", "x"]
    total = combined(["p", "p"], comps, [None, None], completion_ids=[[1, 20000], [3]])
    assert combined.last_parts["rl_toy_reward:low_half"] == [0.5, 1.0]
    assert total == pytest.approx([2 * 0 + 0.5 * -1 / 3 + 0.5, 2 * -0.75 + 0 + 1.0])
    for bad, match in [("rl_toy_reward:wrong_length", "returned 1 scores for 2"),
                       ("rl_toy_reward:not_numbers", "list of numbers"), ("rl_toy_reward:nope", "cannot import"),
                       ("no_such_module_xyz:f", "cannot import")]:
        with pytest.raises(TunelabError, match=match):
            rw.build(SimpleNamespace(rewards={bad: 1.0}, target_words=4))(["p", "p"], comps, [None, None])


def test_rl_config_errors(gen_dir, tiny_causal_dir, tmp_path):
    base = rl_overrides(gen_dir, tiny_causal_dir, tmp_path / "o")
    cases = [("rl.estimator=a2c", "rl.estimator"), ("rl.samples_per_prompt=1", "leave-one-out"),
             ("tune.method=bitfit", "tune.method"), ("rl.rewards.classifier=1", "rl.classifier"),
             ("rl.clip=1.5", "rl.clip"), ("rl.bogus=1", "unknown config key 'rl.bogus'"),
             ("rl.rewards.rouge_l=high", "rl.rewards.rouge_l")]
    for override, match in cases:
        with pytest.raises(TunelabError, match=match):
            load_config(None, base + [override])
    with pytest.raises(TunelabError, match="unknown reward"):
        run(base + ["rl.rewards.meteor=1"])


# --- the loop on tiny models -------------------------------------------------------------------------------

def test_lora_run_kl_zero_at_start_reference_is_base_and_folder_loads(gen_dir, tiny_causal_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunelab.data.examples import GenExample
    from tunelab.predict import Predictor

    out = tmp_path / "rl"
    report = run(rl_overrides(gen_dir, tiny_causal_dir, out, **{"rl.steps": 4, "rl.lr": 5e-2}))
    hist = report["history"]
    assert hist[0]["kl"] == 0.0  # the fresh adapter adds exactly zero: policy == reference
    assert any(h["kl"] != 0.0 for h in hist[1:])  # and the updates moved it
    assert report["before"]["kl"] == 0.0 and report["after"]["kl"] != 0.0
    for key in ("reward", "kl", "ref_perplexity", "distinct_1", "distinct_2", "greedy_reward"):
        assert key in report["after"]
    assert len(report["samples"]) == 6
    assert (out / "curves.png").stat().st_size > 0 and "before" in (out / "report.md").read_text()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.value for e in events.Scalars("rl/reward")] == pytest.approx([h["reward"] for h in hist])
    assert [e.step for e in events.Scalars("held_out/kl")] == [0, 4]

    # tunelab runs / compare read RL runs: held-out reward as the run's score, rl/ and held_out/ curves.
    from tunelab.runs import compare, list_runs

    (row,) = list_runs(tmp_path)
    assert row["task"] == "rl" and row["dev"] == report["after"]["reward"] and row["lr"] == 5e-2
    (cmp,) = compare([out], png=tmp_path / "cmp.png")
    assert cmp["rl/reward last"] == hist[-1]["reward"] and cmp["held_out/reward best"] == max(
        report["before"]["reward"], report["after"]["reward"])
    assert (tmp_path / "cmp.png").stat().st_size > 0

    # Plain peft loads the adapter; with it switched off the outputs are the base model's, bit for bit.
    base = AutoModelForCausalLM.from_pretrained(str(tiny_causal_dir)).eval()
    fresh = AutoModelForCausalLM.from_pretrained(str(tiny_causal_dir)).eval()
    model = PeftModel.from_pretrained(fresh, str(out)).eval()
    ids = torch.tensor([[101, 2417, 2665, 2630, 102, 2417]])
    with torch.no_grad():
        want = base(input_ids=ids).logits
        with model.disable_adapter():
            assert torch.equal(model(input_ids=ids).logits, want)
        assert not torch.allclose(model(input_ids=ids).logits, want)
    outputs = Predictor(out, device="cpu").predict([GenExample("copy: red cat")])
    assert isinstance(outputs[0], str)


def test_toy_reward_rises(gen_dir, tiny_causal_dir, tmp_path, toy_reward):
    report = run(rl_overrides(gen_dir, tiny_causal_dir, tmp_path / "rl", **{
        "rl.rewards.length": 0.0, f"rl.rewards.{toy_reward}": 1.0, "rl.steps": 30, "rl.prompts_per_step": 8,
        "rl.samples_per_prompt": 4, "rl.max_new_tokens": 8, "rl.lr": 3e-2, "rl.kl_coef": 0.0,
        "tune.method": "full", "rl.save_every": 100, "rl.eval_prompts": 16}))
    rewards = [h["reward"] for h in report["history"]]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert 0.35 < first < 0.65  # about half the vocabulary at the random start
    assert last > first + 0.25, rewards
    assert report["after"]["reward"] > report["before"]["reward"] + 0.25


def test_rloo_gradient_variance_lower_than_no_baseline(tiny_causal_dir):
    """The same fixed prompts, 12 independent rollouts: the spread of the gradient estimate (summed
    per-coordinate variance) without a baseline and with the leave-one-out baseline."""
    from tunelab.models import load_model, load_tokenizer
    from tunelab.rl.rollout import sample, token_logprobs
    from tunelab.tasks import make_task

    tok = load_tokenizer(tiny_causal_dir)
    model = load_model(tiny_causal_dir, "generate", []).eval()
    task = make_task("generate", tok, [], 64, max_target_length=8)
    prompts = ["copy: red cat", "copy: blue sun moon", "copy: dog", "copy: tree river bird"]
    k, grads = 4, {"reinforce": [], "rloo": []}
    for seed in range(12):
        torch.manual_seed(seed)
        roll = sample(model, task, prompts, k, 8)
        ids = [t[m.bool()].tolist() for t, m in zip(roll.tokens, roll.mask)]
        r = torch.tensor([sum(t < 15000 for t in x) / max(1, len(x)) for x in ids])
        for name in grads:
            model.zero_grad()
            logp, _ = token_logprobs(model, roll)
            est.policy_loss(logp, roll.mask, est.advantages(r, name, k), 8).backward()
            grads[name].append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    var = {name: torch.stack(g).var(0).sum().item() for name, g in grads.items()}
    assert var["rloo"] < 0.5 * var["reinforce"], var


@pytest.mark.parametrize("estimator", ["reinforce", "self_critical", "ppo"])
def test_each_estimator_runs_and_logs(gen_dir, tiny_causal_dir, tmp_path, estimator):
    report = run(rl_overrides(gen_dir, tiny_causal_dir, tmp_path / "rl", **{
        "rl.estimator": estimator, "rl.ppo_epochs": 2, "rl.whiten": True, "rl.entropy_coef": 0.01,
        "rl.kl_target": 2.0, "rl.rewards.bleu": 0.5}))
    h = report["history"]
    assert len(h) == 3 and all(math.isfinite(x["loss"]) for x in h)
    assert set(h[0]["parts"]) == {"bleu", "length"}
    assert h[-1]["kl_coef"] != 0.05  # the adaptive controller moved it
    if estimator == "ppo":
        assert h[-1]["clip_fraction"] is not None
    if estimator == "self_critical":
        assert "greedy_reward" in h[0]


def test_encoder_decoder_policy(gen_dir, tiny_t5_dir, tmp_path):
    report = run(rl_overrides(gen_dir, tiny_t5_dir, tmp_path / "rl", **{"tune.method": "full", "rl.lr": 1e-2}))
    assert report["history"][0]["kl"] == 0.0
    assert report["after"]["kl"] != 0.0
    assert json.loads((tmp_path / "rl" / "tunelab.json").read_text())["generation"]["encoder_decoder"] is True


def test_sft_warm_start_then_rl(gen_dir, tiny_causal_dir, tmp_path):
    out = tmp_path / "rl"
    report = run(rl_overrides(gen_dir, tiny_causal_dir, out, **{"rl.sft": True, "train.epochs": 1,
                                                                  "rl.steps": 2}))
    assert (out / "sft" / "merged" / "model.safetensors").is_file()
    assert report["start"] == str(out / "sft" / "merged")
    assert report["history"][0]["kl"] == 0.0  # the reference is the SFT model
    meta = json.loads((out / "tunelab.json").read_text())
    assert meta["base_model"] == str((out / "sft" / "merged").resolve())


def test_resume_after_kill_gives_the_same_run(gen_dir, tiny_causal_dir, tmp_path):
    from safetensors.torch import load_file

    common = {"rl.steps": 6, "rl.save_every": 1, "tune.method": "full", "train.threads": 1}
    whole = run(rl_overrides(gen_dir, tiny_causal_dir, tmp_path / "whole", **common))
    overrides = rl_overrides(gen_dir, tiny_causal_dir, tmp_path / "cut", **common)
    recipe = tmp_path / "rl.yaml"
    recipe.write_text("task: rl\n")
    kill_after_first_checkpoint(recipe, overrides, tmp_path / "log.txt")
    resumed = run(overrides, resume=True)
    assert [h["reward"] for h in resumed["history"]] == [h["reward"] for h in whole["history"]]
    assert resumed["after"] == whole["after"]
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_rl_prompt_sets_keep_their_splits_apart():
    from tunelab.data.packaged import RT_PROMPT_WORDS, load_builtin

    chat = load_builtin("chitchat")
    convs = [{e.source for e in part} for part in (chat.train, chat.dev, chat.test)]
    assert not (convs[0] & convs[1] or convs[0] & convs[2] or convs[1] & convs[2])
    assert len(chat.train) > 80_000 and all(e.prompt.startswith("Message: ") and e.target for e in chat.dev)
    rt, base = load_builtin("rt_prompts"), load_builtin("rt_sentiment")
    assert all(len(e.prompt.split()) == RT_PROMPT_WORDS for e in rt.dev)
    held = {x.text for x in base.dev}
    assert all(f"{e.prompt} {e.target}" in held for e in rt.dev)  # dev prompts come from dev movies only


@pytest.mark.parametrize("which", ["causal", "t5"])
def test_token_logprobs_match_what_generate_sampled_from(which, tiny_causal_dir, tiny_t5_dir):
    """The log-probs the loss uses are those of the distribution generate sampled from, token by token, for
    prompts of different lengths (left padding and position ids for decoders)."""
    from tunelab.models import load_model, load_tokenizer
    from tunelab.rl.rollout import encode_prompts, token_logprobs, Rollout, completion_mask
    from tunelab.tasks import make_task

    folder = tiny_causal_dir if which == "causal" else tiny_t5_dir
    tok = load_tokenizer(folder)
    model = load_model(folder, "generate", []).eval()
    task = make_task("generate", tok, [], 64, encoder_decoder=which == "t5", max_target_length=8)
    ids, mask = encode_prompts(task, ["copy: red", "copy: blue sun moon tree river", "a"], "cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, max_new_tokens=6,
                             num_return_sequences=2, pad_token_id=task.pad, eos_token_id=task.eos,
                             output_logits=True, return_dict_in_generate=True)
    seq = out.sequences
    start, tokens = (seq[:, :1], seq[:, 1:]) if which == "t5" else (None, seq[:, ids.shape[1]:])
    roll = Rollout(ids, mask, tokens, completion_mask(tokens, task.eos), 2, [""] * len(tokens), start)
    with torch.no_grad():
        logp, _ = token_logprobs(model, roll)
    want = torch.stack([torch.log_softmax(s.float(), -1) for s in out.logits], 1).gather(-1, tokens.unsqueeze(-1))[..., 0]
    m = roll.mask.bool()
    assert torch.allclose(logp[m], want[m], atol=1e-4)


def test_bert2bert_policy_from_an_encoder(gen_dir, tiny_model_dir, tmp_path):
    """bert2bert warm-started from a BERT encoder folder (the packaged MiniLM in the docs; the tiny BERT here)
    is a policy like any encoder-decoder: KL 0 at the start, trained, saved, loadable for prediction."""
    from tunelab.data.examples import GenExample
    from tunelab.models import build_bert2bert
    from tunelab.predict import Predictor

    folder = build_bert2bert(tiny_model_dir, tmp_path / "b2b")
    report = run(rl_overrides(gen_dir, folder, tmp_path / "rl", **{"tune.method": "full", "rl.lr": 1e-2,
                                                                     "rl.steps": 2}))
    assert report["history"][0]["kl"] == 0.0 and report["after"]["kl"] != 0.0
    assert isinstance(Predictor(tmp_path / "rl", device="cpu").predict([GenExample("copy: red")])[0], str)
