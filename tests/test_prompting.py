"""Prompting (task: prompt) and continued pre-training (task: pretrain), on tiny random models with the real
packaged MiniLM tokenizer: label-word scores against a hand computation, calibration, demonstrations, PET
training and its saved folder, zero-shot from the command line, the MLM masking rule and packing."""

import json
import math

import numpy as np
import pytest
import torch

from tests.conftest import tiny_overrides
from tunelab.data.examples import RawText, TextExample
from tunelab.errors import TunelabError

TEMPLATE = "{text} topic:"
VERBALIZER = {"sport": ["sport", "football game"], "business": ["business"], "tech": ["tech"]}


def prompt_task(tokenizer, **settings):
    from tunelab.tasks.prompt import PromptTask

    return PromptTask(tokenizer, ["business", "sport", "tech"], 64, False,
                      {"template": TEMPLATE, "verbalizer": VERBALIZER} | settings)


@pytest.fixture(scope="module")
def tiny_lm(tiny_causal_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_causal_dir)).eval()


def hand_word_score(model, prompt: list[int], word: list[int], normalize: bool) -> float:
    """log p(word | prompt) by running prompt + word alone (no padding) and reading each token's log-prob."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + word])).logits[0].log_softmax(-1)
    lps = [logits[len(prompt) - 1 + i, t].item() for i, t in enumerate(word)]
    return sum(lps) / len(lps) if normalize else sum(lps)


@pytest.mark.parametrize("normalize", [True, False])
def test_label_scores_equal_a_hand_computation(tiny_lm, minilm_tokenizer, normalize):
    task = prompt_task(minilm_tokenizer, normalize=normalize)
    texts = ["The striker scored twice", "Shares fell", "A startup built a much smarter search engine for phones"]
    rows = [task.prompt_ids(TextExample(t), []) for t in texts]  # different lengths: padding must not matter
    got = task._scores(tiny_lm, rows, "cpu", False, 8, None)
    for r, prompt in enumerate(rows):
        for label, words in task.verbalizer.items():
            ids = [minilm_tokenizer(" " + w, add_special_tokens=False)["input_ids"] for w in words]
            want = np.logaddexp.reduce([hand_word_score(tiny_lm, prompt, w, normalize) for w in ids])
            assert got[r, task.label2id[label]] == pytest.approx(want, abs=1e-4)
    assert len(task.words[task.word_label.index(task.label2id["sport"]) + 1]) > 1  # a multi-token word was scored
    # the prompt-learning path (each word appended to the prompts) gives the same scores as the cache path
    from tunelab.prompting import _appended_word_scores, left_pad, word_scores

    ids, mask = left_pad(rows, task.pad)
    with torch.no_grad():
        cached = word_scores(tiny_lm, task.words, normalize, input_ids=ids, attention_mask=mask)
        appended = _appended_word_scores(tiny_lm, task.words, normalize, ids, mask, None, None)
    assert torch.allclose(cached, appended, atol=1e-5)


def test_training_objective_scores_right_padded_batches_as_prediction_does(tiny_lm, minilm_tokenizer):
    from tunelab.data.batching import collate

    task = prompt_task(minilm_tokenizer)
    examples = [TextExample("The striker scored twice", "sport"), TextExample("Shares fell on Monday again", "business")]
    features = task.encode(examples, training=True)
    batch = collate(features, task.pad)  # right-padded, as training batches are
    out = task.objective(tiny_lm)(**batch)
    want = task._scores(tiny_lm, [f["input_ids"] for f in features], "cpu", False, 8, None)
    assert np.allclose(out.logits.detach().numpy(), want, atol=1e-4)
    assert out.loss.item() == pytest.approx(
        -np.mean([want[i] [f["labels"]] - np.logaddexp.reduce(want[i]) for i, f in enumerate(features)]), abs=1e-4)


def test_calibration_divides_by_the_content_free_probabilities(tiny_lm, minilm_tokenizer):
    from tunelab.prompting import calibrated, softmax

    p = np.array([[0.5, 0.3, 0.2]])
    assert calibrated(p, [0.5, 0.25, 0.25]) == pytest.approx(np.array([[1.0, 1.2, 0.8]]) / 3.0)
    # on the model: the calibrated decision is the argmax of p / mean(p_cf) over the content-free inputs
    task = prompt_task(minilm_tokenizer, calibrate=True, content_free=["N/A", ""])
    examples = [TextExample(t) for t in ("The coach praised his players", "Profits doubled", "Users got the app")]
    got = task.predict(tiny_lm, examples, "cpu")
    rows = [task.prompt_ids(e, []) for e in examples]
    free = [task.prompt_ids(TextExample(t), []) for t in ("N/A", "")]
    raw = softmax(task._scores(tiny_lm, rows, "cpu", False, 8, None))
    base = softmax(task._scores(tiny_lm, free, "cpu", False, 8, None)).mean(0)
    want = raw / base
    want /= want.sum(-1, keepdims=True)
    for (label, probs), w in zip(got, want):
        assert probs == pytest.approx(list(w), abs=1e-6)
        assert label == task.labels[int(np.argmax(w))]
    plain = prompt_task(minilm_tokenizer).predict(tiny_lm, examples, "cpu")
    assert np.allclose([p for _, p in plain], raw, atol=1e-6)
    # the untuned model's prompt leans to one label whatever the input; calibration takes that lean out
    assert len({label for label, _ in plain}) == 1 < len({label for label, _ in got})


def test_demonstrations_random_and_similar(minilm_tokenizer):
    pool = [TextExample(t, label) for t, label in [("The team won the match", "sport"), ("Shares fell", "business"),
                                                  ("The striker scored twice", "sport"),
                                                  ("The bank raised rates", "business"), ("A new phone chip", "tech")]]
    task = prompt_task(minilm_tokenizer, shots=2, seed=3)
    task.use_pool(pool)
    picks = task.demonstrations(pool + [TextExample("Markets slid"), TextExample("Goal!")])
    assert picks[-1] == picks[-2] and len(set(picks[-1])) == 2  # one seeded draw for every new input
    assert all(i not in p and len(set(p)) == 2 for i, p in enumerate(picks[:len(pool)]))  # never itself
    ids = task.prompt_ids(TextExample("Markets slid"), [pool[j] for j in picks[-1]])
    text = minilm_tokenizer.decode(ids)
    for j in picks[-1]:  # each demonstration with its label's first word, then the input
        assert f"{pool[j].text.lower()} topic : {task.verbalizer[pool[j].label][0]}" in text
    assert text.endswith("markets slid topic :")

    similar = prompt_task(minilm_tokenizer, shots=2, select="similar")
    similar.use_pool(pool)
    (near,) = similar.demonstrations([TextExample("The goalkeeper and the striker of the team")])
    assert {pool[j].label for j in near} == {"sport"}


def test_pet_training_and_the_saved_folder(tmp_path, cls_dir, tiny_causal_dir):
    """PET trains the LM on the label words (the loss falls; dev macro-F1 well above chance), the folder is a
    plain causal LM, and the Predictor reproduces the test metrics from tunelab.json's template and words."""
    from transformers import AutoModelForCausalLM

    from tunelab.config import load_config
    from tunelab.predict import Predictor
    from tunelab.train import train

    cfg = load_config(None, ["task=prompt", f"data.train={cls_dir / 'train.jsonl'}",
                             f"data.dev={cls_dir / 'dev.jsonl'}", f"data.test={cls_dir / 'test.jsonl'}",
                             "data.prompt.template={text} topic:", "model.max_length=64",
                             *tiny_overrides(tiny_causal_dir, tmp_path / "pet", **{"train.epochs": 6})])
    report = train(cfg)
    losses = [h["loss"] for h in report["history"]]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) * 0.7
    assert report["test"]["main"] > 0.6  # 3 balanced classes: chance is about 0.33
    AutoModelForCausalLM.from_pretrained(str(tmp_path / "pet"))
    meta = json.loads((tmp_path / "pet" / "tunelab.json").read_text())
    assert meta["task"] == "prompt" and meta["options"]["prompt"]["template"] == "{text} topic:"
    pred = Predictor(tmp_path / "pet", "cpu")
    from tunelab.data import read_file

    test = read_file(cls_dir / "test.jsonl", "prompt")
    assert pred.evaluate(test)["main"] == pytest.approx(report["test"]["main"])


def test_zero_shot_recipe_and_command_line(tmp_path, cls_dir, tiny_causal_dir, capsys):
    """train.epochs=0: no step, the untuned model scored on dev and test; the command line asks the same
    untuned model the same question with --template/--labels and gets the same predictions."""
    from tunelab.cli import main
    from tunelab.config import load_config
    from tunelab.train import train

    words = "business=business,sport=sport|football game,tech=tech"
    cfg = load_config(None, ["task=prompt", f"data.train={cls_dir / 'train.jsonl'}",
                             f"data.dev={cls_dir / 'dev.jsonl'}", f"data.test={cls_dir / 'test.jsonl'}",
                             "data.prompt.template={text} topic:", "data.prompt.verbalizer.sport=[sport, football game]",
                             "model.max_length=64", *tiny_overrides(tiny_causal_dir, tmp_path / "zs",
                                                                    **{"train.epochs": 0})])
    report = train(cfg)
    assert report["steps"] == 0 and report["dev"] is not None and report["test"] is not None
    assert main(["eval", str(tiny_causal_dir), "--data", str(cls_dir / "test.jsonl"), "--template", "{text} topic:",
                 "--labels", words, "--max-length", "64", "-o", str(tmp_path / "m.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["main"] == pytest.approx(report["test"]["main"])
    capsys.readouterr()
    assert main(["predict", str(tiny_causal_dir), "The striker scored twice", "--template", "{text} topic:",
                 "--labels", words, "--max-length", "64"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert set(record["probabilities"]) == {"business", "sport", "tech"}
    assert main(["predict", str(tiny_causal_dir), "x", "--template", "{text}", "--labels", "only"]) == 2
    assert "at least two labels" in capsys.readouterr().err


def test_prompt_config_mistakes(minilm_tokenizer, tiny_model_dir, tmp_path, cls_dir):
    from tunelab.config import load_config
    from tunelab.train import train

    with pytest.raises(TunelabError, match="must hold {text}"):
        prompt_task(minilm_tokenizer, template="no slot here")
    with pytest.raises(TunelabError, match="'finance' not among the labels"):
        prompt_task(minilm_tokenizer, verbalizer={"finance": ["money"]})
    with pytest.raises(TunelabError, match="word of both"):
        prompt_task(minilm_tokenizer, verbalizer={"sport": ["game"], "tech": ["game"]})
    with pytest.raises(TunelabError, match="task=prompt asks a causal"):  # an encoder cannot be prompted here
        train(load_config(None, ["task=prompt", f"data.train={cls_dir / 'train.jsonl'}",
                                 *tiny_overrides(tiny_model_dir, tmp_path / "enc")]))
    with pytest.raises(TunelabError, match="runs on its own"):
        load_config(None, ["task=multitask", f"tasks.a.data.train={cls_dir / 'train.jsonl'}", "tasks.a.task=prompt",
                           f"tasks.b.data.train={cls_dir / 'train.jsonl'}"])


def test_per_label_draws_n_of_each_label():
    from tunelab.data.splits import per_label

    examples = [TextExample(str(i), "ab"[i % 2] if i < 20 else "c") for i in range(23)]
    got = per_label(examples, 4, seed=1, gold=lambda e: [e.label])
    assert sorted(e.label for e in got) == ["a"] * 4 + ["b"] * 4 + ["c"] * 3
    assert per_label(examples, 4, 1, lambda e: [e.label]) == got  # seeded
    assert per_label(examples, 4, 2, lambda e: [e.label]) != got


# ---- continued pre-training ----

def pretrain_task(tokenizer, **kw):
    from tunelab.tasks.pretrain import PretrainTask

    return PretrainTask(tokenizer, kw.pop("max_length", 64), kw.pop("lm", "mlm"), **kw)


def test_packing_keeps_documents_apart(minilm_tokenizer):
    tok = minilm_tokenizer
    docs = ["the first document is here", "a second one", "and the third document ends the corpus"]
    task = pretrain_task(tok, max_length=8)
    blocks = task.pack([RawText(d) for d in docs])
    assert all(len(b["input_ids"]) <= 8 and b["input_ids"][0] == tok.cls_token_id for b in blocks)
    stream = [t for b in blocks for t in b["input_ids"][1:]]  # the blocks' text, in order, without [CLS]
    want = [t for d in docs for t in tok(d, add_special_tokens=False)["input_ids"] + [tok.sep_token_id]]
    assert stream == want  # every token kept, each document followed by [SEP]
    clm = pretrain_task(tok, max_length=8, lm="clm")
    assert [t for b in clm.pack([RawText(d) for d in docs]) for t in b["labels"]] == want  # CLM: labels = inputs


@pytest.mark.parametrize("whole_word", [False, True])
def test_mlm_masking_rule(minilm_tokenizer, whole_word):
    tok = minilm_tokenizer
    text = " ".join(["unbelievably tokenization happens everywhere in comprehensive documents"] * 40)
    task = pretrain_task(tok, max_length=512, mask_prob=0.15, whole_word=whole_word)
    (block,) = task.pack([RawText(text)])
    special = set(tok.all_special_ids)
    maskable = [j for j, t in enumerate(block["input_ids"]) if t not in special]
    kinds = {"mask": 0, "random": 0, "kept": 0}
    for seed in range(30):
        ids, labels = task.mask(block, seed, 0)
        chosen = [j for j, lab in enumerate(labels) if lab != -100]
        assert all(block["input_ids"][j] not in special for j in chosen)  # never a special token
        assert all(labels[j] == block["input_ids"][j] for j in chosen)  # labels are the original tokens
        assert all(ids[j] == block["input_ids"][j] for j in range(len(ids)) if labels[j] == -100)
        assert abs(len(chosen) - 0.15 * len(maskable)) <= (8 if whole_word else 0.5)  # the requested share
        for j in chosen:
            kinds["mask" if ids[j] == tok.mask_token_id else "kept" if ids[j] == labels[j] else "random"] += 1
        if whole_word:  # a chosen word is chosen whole: every piece of it
            for j in chosen:
                assert j + 1 >= len(ids) or block["starts"][j + 1] or labels[j + 1] != -100
    total = sum(kinds.values())
    assert kinds["mask"] / total == pytest.approx(0.8, abs=0.03)
    assert kinds["random"] / total == pytest.approx(0.1, abs=0.03)
    assert kinds["kept"] / total == pytest.approx(0.1, abs=0.03)
    assert task.mask(block, 5, 0) == task.mask(block, 5, 0) and task.mask(block, 5, 0) != task.mask(block, 6, 0)


def test_pretrain_command_mlm_then_fine_tune(tmp_path, cls_dir, tiny_model_dir):
    """`tunelab pretrain` on a folder of documents: the encoder gets an MLM head, the dev loss falls below the
    untrained one, and the folder feeds a classification recipe as its model."""
    from transformers import AutoModelForMaskedLM

    from tunelab.cli import main
    from tunelab.config import load_config
    from tunelab.train import train

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    lines = [json.loads(x)["text"] for x in (cls_dir / "train.jsonl").read_text().splitlines()]
    for k in range(6):
        (corpus / f"doc{k}.txt").write_text(" ".join(lines[k * 8:(k + 1) * 8]), encoding="utf-8")
    (tmp_path / "dev.txt").write_text("\n".join(lines[:12]) + "\n", encoding="utf-8")
    out = tmp_path / "mlm"
    assert main(["pretrain", "--model", str(tiny_model_dir), "--text", str(corpus), "--dev", str(tmp_path / "dev.txt"),
                 "-o", str(out), "model.max_length=32", "train.epochs=8", "train.batch_size=4", "train.lr=3e-3",
                 "train.threads=2", "train.device=cpu", "data.pretrain.whole_word=true"]) == 0
    report = json.loads((out / "report.json").read_text())
    evals = [e["metrics"]["loss"] for e in report["evals"]]
    assert evals[-1] < evals[0] and report["dev"]["masked_accuracy"] > 0
    AutoModelForMaskedLM.from_pretrained(str(out))
    cfg = load_config(None, ["task=classify", f"data.train={cls_dir / 'train.jsonl'}",
                             f"data.dev={cls_dir / 'dev.jsonl'}", *tiny_overrides(out, tmp_path / "cls",
                                                                                  **{"train.epochs": 1})])
    assert train(cfg)["dev"]["main"] >= 0
    assert math.isfinite(report["dev"]["perplexity"])


def test_pretrain_inputs_and_mistakes(tmp_path, tiny_model_dir, capsys):
    import pickle

    from tunelab.cli import main
    from tunelab.data.rawtext import plain_pickle

    good = tmp_path / "good.pkl"
    good.write_bytes(pickle.dumps((["title"], ["text"], [1])))
    assert plain_pickle(good) == (["title"], ["text"], [1])
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps(TunelabError("x")))  # any object built by a class is refused
    with pytest.raises(TunelabError, match="refused: the file asks for tunelab.errors.TunelabError"):
        plain_pickle(evil)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["pretrain", "--model", str(tiny_model_dir), "--text", str(empty), "-o", str(tmp_path / "o")]) == 2
    assert "no .txt files in this folder" in capsys.readouterr().err
    text = tmp_path / "corpus.txt"
    text.write_text("one document\nanother document\n", encoding="utf-8")
    assert main(["pretrain", "--model", str(tiny_model_dir), "--text", str(text), "-o", str(tmp_path / "o"),
                 "data.pretrain.objective=clm"]) == 2
    assert "a bert model is trained with mlm here" in capsys.readouterr().err


def test_builtin_text_sets():
    from tunelab.data import load_builtin

    pd = load_builtin("peoples_daily_text")
    assert len(pd.train) > 15_000 and pd.dev and not pd.test
    assert not any("/" in d.text or "[" in d.text for d in pd.train[:500])  # tags and brackets removed
    news = load_builtin("inews_text")
    assert len(news.train) == 5355 and len(news.dev) == 999 and not news.test
    conll = load_builtin("conll2003_text")
    assert len(conll.train) == 946 and not conll.test  # the 946 training documents


def test_backbones_and_language_models_refuse_serving_and_onnx(tmp_path, cls_dir, tiny_model_dir, tiny_causal_dir):
    """A pre-training folder makes no predictions (serve refuses it at start); a prompt model's predictions
    are not one graph's logits (ONNX export refuses it); each says why."""
    from tunelab.cli import main
    from tunelab.config import load_config
    from tunelab.onnx_export import export_onnx
    from tunelab.serve import Limits, ServeOptions, load_service
    from tunelab.train import train

    text = tmp_path / "corpus.txt"
    text.write_text("".join(json.loads(x)["text"] + "\n" for x in (cls_dir / "train.jsonl").read_text().splitlines()))
    assert main(["pretrain", "--model", str(tiny_model_dir), "--text", str(text), "-o", str(tmp_path / "mlm"),
                 "model.max_length=32", "train.epochs=1", "train.threads=2", "train.device=cpu"]) == 0
    with pytest.raises(TunelabError, match="a pretrain folder is a backbone that makes no predictions"):
        load_service(ServeOptions(model_dir=str(tmp_path / "mlm"), limits=Limits()))
    train(load_config(None, ["task=prompt", f"data.train={cls_dir / 'train.jsonl'}", "data.prompt.template={text} is",
                             *tiny_overrides(tiny_causal_dir, tmp_path / "zs", **{"train.epochs": 0})]))
    with pytest.raises(TunelabError, match="a prompt model \\(causal-lm\\); ONNX export covers encoder models"):
        export_onnx(tmp_path / "zs", tmp_path / "onnx")


def test_a_prompt_folder_serves_like_a_classifier(tmp_path, cls_dir, tiny_causal_dir):
    """The server answers a prompt folder's requests with the records `tunelab predict` writes, and its
    /v1/model says the template and the words."""
    from tests.test_serve import expected, live
    from tunelab.config import load_config
    from tunelab.predict import Predictor
    from tunelab.train import train

    train(load_config(None, ["task=prompt", f"data.train={cls_dir / 'train.jsonl'}", "data.prompt.template={text} is",
                             "data.prompt.shots=2", "data.prompt.calibrate=true",
                             *tiny_overrides(tiny_causal_dir, tmp_path / "icl", **{"train.epochs": 0})]))
    predictor = Predictor(tmp_path / "icl", "cpu")
    texts = ["The striker scored twice", "Shares fell"]
    with live(predictor) as server:
        got = server.predict({"texts": texts}).json()
        about = server.client.get("/v1/model").json()
    assert got["results"] == expected(predictor, texts)
    assert "prompt" in json.dumps(about) and "{text} is" in json.dumps(about)


def test_mlm_epochs_mask_anew_and_reproducibly(minilm_tokenizer):
    task = pretrain_task(minilm_tokenizer, max_length=32)
    features = task.encode([RawText("the first document is here and it is long enough to mask"),
                            RawText("a second one with words of its own")], training=True)
    first, again, second = (task.epoch_features(features, 7, e) for e in (0, 0, 1))
    assert first == again and first != second
    assert all(f["labels"] == [-100] * len(f["input_ids"]) for f in features)  # the encoded blocks stay unmasked


def test_pair_templates_fill_both_slots_once(minilm_tokenizer):
    from tunelab.tasks.prompt import PromptTask

    task = PromptTask(minilm_tokenizer, ["no", "yes"], 64, True, {"template": "A: {text} B: {text_pair} ?"})
    assert task._filled(TextExample("x {text_pair} y", "no", text_pair="z")) == "A: x {text_pair} y B: z ?"
    ids = task.prompt_ids(TextExample("word " * 80, "no", text_pair="other " * 80), [])
    assert len(ids) <= 64 - max(map(len, task.words)) and task.truncated == 1  # both texts cut to fit
    with pytest.raises(TunelabError, match="reads text pairs"):
        task.encode([TextExample("single text", "no")], training=False)
