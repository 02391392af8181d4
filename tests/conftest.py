"""Shared fixtures: a tiny random BERT (with the real packaged tokenizer) and small made-up data files.

Nothing here touches the network: the tokenizer comes from the packaged all-MiniLM-L6-v2, the weights of the
tiny model are random (seeded).
"""

import json
import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

PER = ["Peter Blackburn", "John Smith", "Angela Merkel", "Maria Garcia", "Hans Muller", "Anna Kalashnikov"]
LOC = ["Paris", "London", "Berlin", "New York", "Madrid", "Tokyo"]
ORG = ["Google", "Reuters", "European Union", "Siemens", "United Nations", "Apple"]
TEMPLATES = [
    "{PER} visited {LOC} .",
    "{PER} works for {ORG} in {LOC} .",
    "{ORG} said on Monday that {PER} will lead it .",
    "The talks in {LOC} ended without a deal .",
    "{ORG} opened an office in {LOC} .",
]


def make_sentence(rng) -> list[tuple[str, str]]:
    """One made-up sentence as (word, IOB2 tag) pairs."""
    out = []
    for part in rng.choice(TEMPLATES).split():
        if part in ("{PER}", "{LOC}", "{ORG}"):
            etype = part[1:-1]
            name = rng.choice({"PER": PER, "LOC": LOC, "ORG": ORG}[etype])
            for k, w in enumerate(name.split()):
                out.append((w, ("B-" if k == 0 else "I-") + etype))
        else:
            out.append((part, "O"))
    return out


def make_documents(seed: int, n_docs: int, per_doc: int) -> list[list[list[tuple[str, str]]]]:
    rng = random.Random(seed)
    return [[make_sentence(rng) for _ in range(per_doc)] for _ in range(n_docs)]


def conll_text(docs) -> str:
    """CoNLL-2003 style: word POS chunk NER, -DOCSTART- before each document."""
    lines = []
    for doc in docs:
        lines += ["-DOCSTART- -X- -X- O", ""]
        for sent in doc:
            for w, t in sent:
                lines.append(f"{w} NNP I-NP {t}")
            lines.append("")
    return "\n".join(lines) + "\n"


SPLIT_SIZES = {"train": (4, 12), "dev": (2, 5), "test": (2, 5)}  # (documents, sentences per document)


@pytest.fixture(scope="session")
def ner_docs():
    return {split: make_documents(100 + i, *SPLIT_SIZES[split]) for i, split in enumerate(SPLIT_SIZES)}


@pytest.fixture(scope="session")
def conll_dir(tmp_path_factory, ner_docs):
    d = tmp_path_factory.mktemp("conll")
    for split, docs in ner_docs.items():
        (d / f"{split}.conll").write_text(conll_text(docs), encoding="utf-8")
    return d


CLASSES = {
    "sport": ["The team won the match {n} to nil", "A late goal decided the cup final", "The striker scored twice",
              "The coach praised his players after the game", "Fans cheered as the club won the league"],
    "business": ["Shares fell {n} percent on Monday", "The bank raised interest rates again",
                 "Profits at the company doubled", "Investors sold bonds as markets slid",
                 "The firm reported record quarterly sales"],
    "tech": ["The new phone has a faster chip", "Engineers released a software update",
             "The laptop battery lasts {n} hours", "A startup built a smarter search engine",
             "Users downloaded the app millions of times"],
}


def make_texts(seed: int, n: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = sorted(CLASSES)[i % len(CLASSES)]
        text = rng.choice(CLASSES[label]).format(n=rng.randint(2, 9))
        out.append({"text": text, "label": label})
    return out


@pytest.fixture(scope="session")
def cls_dir(tmp_path_factory):
    """train/dev/test.jsonl and the same data as train/dev/test.csv."""
    import csv

    d = tmp_path_factory.mktemp("classify")
    for i, (split, n) in enumerate({"train": 48, "dev": 12, "test": 12}.items()):
        recs = make_texts(200 + i, n)
        (d / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
        with open(d / f"{split}.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=["text", "label"])
            w.writeheader()
            w.writerows(recs)
    return d


@pytest.fixture(scope="session")
def minilm_tokenizer():
    from tunelab.models import load_tokenizer, resolve_model_path

    return load_tokenizer(resolve_model_path("all-MiniLM-L6-v2"))


def save_tiny(tmp_path_factory, name: str, model_class, config, tokenizer):
    """A model folder with seeded random weights built from `config` and the given (real) tokenizer."""
    import torch

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp(name)
    model_class(config).save_pretrained(str(d))
    tokenizer.save_pretrained(str(d))
    return d


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, minilm_tokenizer):
    """A tiny random BERT (2 layers, hidden 32) with the real packaged MiniLM tokenizer."""
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=len(minilm_tokenizer), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    return save_tiny(tmp_path_factory, "tiny-bert", BertModel, config, minilm_tokenizer)


@pytest.fixture(scope="session")
def cls_model(tmp_path_factory, cls_dir, tiny_model_dir):
    """A small trained classification folder on the tiny BERT, for tests that only need a working model."""
    from tunelab import finetune

    out = tmp_path_factory.mktemp("cls-model") / "out"
    finetune(None, tiny_overrides(tiny_model_dir, out, task="classify", **{
        "data.train": cls_dir / "train.jsonl", "data.dev": cls_dir / "dev.jsonl", "train.epochs": 2,
        "train.batch_size": 8, "train.lr": 5e-3, "train.threads": 1}))
    return out


def tiny_overrides(model_dir, out, **extra) -> list[str]:
    """Config overrides for a quick run on the tiny model."""
    values = {"model.name": str(model_dir), "output_dir": str(out), "train.threads": 2, "train.epochs": 4,
              "train.batch_size": 8, "train.lr": 3e-3, "train.warmup_ratio": 0.0, "train.bf16": False,
              "train.device": "cpu"}
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def ner_overrides(conll_dir, model_dir, out, **extra) -> list[str]:
    values = {"task": "ner", "data.train": conll_dir / "train.conll", "data.dev": conll_dir / "dev.conll",
              "data.test": conll_dir / "test.conll"}
    values.update(extra)
    return tiny_overrides(model_dir, out, **values)


@pytest.fixture(scope="session")
def ner_run(tmp_path_factory, conll_dir, tiny_model_dir):
    """One NER run on the tiny model, shared by the tests that inspect its output folder."""
    from tunelab.config import load_config
    from tunelab.train import train

    out = tmp_path_factory.mktemp("ner-run") / "out"
    cfg = load_config(None, ner_overrides(conll_dir, tiny_model_dir, out, **{"train.epochs": 8}))
    report = train(cfg)
    return out, report


def plain_transformers_tags(model_dir, sentences) -> list[list[str]]:
    """Word tags from the folder loaded with plain transformers (AutoModelForTokenClassification +
    AutoTokenizer + config.id2label): first-sub-token probabilities, decoded with tunelab's documented rule
    (the most probable valid IOB2 path). Equal to tunelab's predictions iff the saved folder is complete."""
    import numpy as np
    import torch
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    from tunelab.tasks.ner import iob2_transitions, viterbi

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForTokenClassification.from_pretrained(str(model_dir)).eval()
    labels = [model.config.id2label[i] for i in range(len(model.config.id2label))]
    allowed, start = iob2_transitions(labels)
    enc = tok([s.words for s in sentences], is_split_into_words=True, padding=True, return_tensors="pt")
    with torch.no_grad():
        logp = model(**enc).logits.log_softmax(-1).numpy()
    out = []
    for i, s in enumerate(sentences):
        firsts = {}
        for pos, w in enumerate(enc.word_ids(i)):
            if w is not None and w not in firsts:
                firsts[w] = pos
        word_logp = np.stack([logp[i, firsts[w]] for w in range(len(s.words))])
        out.append([labels[k] for k in viterbi(word_logp, allowed, start)])
    return out


def checkpointing_recipe(path, conll_dir, model_dir, epochs: int, extra: str = ""):
    """A small NER recipe file that checkpoints every step (for kill -9 and resume tests); `extra`: more
    YAML lines (e.g. a robust: section). Returns the path."""
    path.write_text(f"""task: ner
model: {{name: {model_dir}}}
data: {{train: {conll_dir / 'train.conll'}, dev: {conll_dir / 'dev.conll'}}}
train: {{epochs: {epochs}, batch_size: 4, lr: 3.0e-3, threads: 2, device: cpu, save_every: 1}}
""" + extra)
    return path


def kill_after_first_checkpoint(recipe, overrides: list[str], log_path) -> None:
    """Start `tunelab train` in a subprocess and SIGKILL it as soon as a resumable checkpoint exists."""
    import sys
    from pathlib import Path

    out = Path(next(o for o in overrides if o.startswith("output_dir=")).split("=", 1)[1])
    kill_at_checkpoint([sys.executable, "-m", "tunelab", "train", str(recipe), *overrides], out, log_path)


def kill_at_checkpoint(argv: list[str], out, log_path) -> None:
    """Run `argv` (a training run writing to `out`) and SIGKILL it as soon as a resumable checkpoint exists."""
    import signal
    import subprocess
    import time
    from pathlib import Path

    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, cwd=Path(__file__).resolve().parents[1], env=env, stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 240
            while not (Path(out) / "checkpoint" / "state.json").is_file():
                assert proc.poll() is None, Path(log_path).read_text()
                assert time.monotonic() < deadline, "no checkpoint appeared"
                time.sleep(0.01)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL


WORDS = ["red", "green", "blue", "cat", "dog", "bird", "sun", "moon", "tree", "river"]


def make_gen_records(seed: int, n: int) -> list[dict]:
    """A copy task: the target repeats the prompt's words, which even a tiny model starts to learn."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 4))]
        out.append({"prompt": "copy: " + " ".join(words), "target": " ".join(words)})
    return out


@pytest.fixture(scope="session")
def gen_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("generate")
    for i, (split, n) in enumerate({"train": 64, "dev": 16, "test": 16}.items()):
        recs = make_gen_records(300 + i, n)
        (d / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    return d


@pytest.fixture(scope="session")
def tiny_causal_dir(tmp_path_factory, minilm_tokenizer):
    """A tiny random Llama-style decoder with the MiniLM tokenizer ([SEP] ends a text, [PAD] pads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = minilm_tokenizer
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
                         tie_word_embeddings=True)
    return save_tiny(tmp_path_factory, "tiny-llama", LlamaForCausalLM, config, tok)


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory, minilm_tokenizer):
    """A tiny random T5 encoder-decoder with the MiniLM tokenizer."""
    from transformers import T5Config, T5ForConditionalGeneration

    tok = minilm_tokenizer
    config = T5Config(vocab_size=len(tok), d_model=32, d_ff=64, d_kv=16, num_layers=2, num_heads=2,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id,
                      decoder_start_token_id=tok.pad_token_id)
    return save_tiny(tmp_path_factory, "tiny-t5", T5ForConditionalGeneration, config, tok)


def gen_overrides(gen_dir, model_dir, out, **extra) -> list[str]:
    values = {"task": "generate", "data.train": gen_dir / "train.jsonl", "data.dev": gen_dir / "dev.jsonl",
              "data.test": gen_dir / "test.jsonl", "data.max_target_length": 8, "train.lr": 1e-2}
    values.update(extra)
    return tiny_overrides(model_dir, out, **values)
