"""tunelab.robust.augment: NER ops keep tags aligned and IOB2 valid, seeding is stable, neighbours are exact."""

import random
import subprocess
import sys
from collections import Counter
from functools import partial

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from tunelab.data.examples import Sentence, TextExample
from tunelab.robust.augment import (
    QWERTY_NEIGHBOURS, augment, augment_all, case_flip, char_noise, embedding_neighbours, epoch_augmenter,
    has_cjk, join_words, mention_pool, mention_replace, mentions, neighbour_replace, rng_for, split_text,
    word_delete, word_insert, word_swap)

TYPES = ("PER", "LOC", "ORG")
WORD = st.text(alphabet="abcXYZé1中文字北京", min_size=1, max_size=5)
SEGMENT = st.one_of(st.tuples(st.just("O"), st.lists(WORD, min_size=1, max_size=1)),
                    st.tuples(st.sampled_from(TYPES), st.lists(WORD, min_size=1, max_size=3)))


@st.composite
def sentences(draw):
    """A random NER sentence with valid IOB2 tags (adjacent same-type mentions included)."""
    words, tags = [], []
    for kind, ws in draw(st.lists(SEGMENT, min_size=0, max_size=12)):
        words += ws
        tags += ["O"] * len(ws) if kind == "O" else [f"B-{kind}"] + [f"I-{kind}"] * (len(ws) - 1)
    return Sentence(words, tags)


def valid_iob2(tags) -> bool:
    prev = "O"
    for t in tags:
        if t.startswith("I-") and prev[2:] != t[2:]:
            return False
        if t != "O" and t[:2] not in ("B-", "I-"):
            return False
        prev = t
    return True


def types(tags) -> Counter:
    return Counter(t for _, _, t in mentions(tags))


def mention_words(s: Sentence) -> list:
    return [(tuple(s.words[a:b]), t) for a, b, t in mentions(s.tags)]


POOL = {"PER": [("Ann",), ("Bo", "Li")], "LOC": [("北京",), ("New", "York", "City")], "ORG": [("UN",)]}
NEIGHBOURS = {"abc": ["xyz", "cab"], "cab": ["abc"], "中文": ["字"]}
OPS = {"noise": char_noise, "case": case_flip, "swap": word_swap, "delete": word_delete, "insert": word_insert,
       "neighbour": partial(neighbour_replace, neighbours=NEIGHBOURS), "mention": partial(mention_replace, pool=POOL)}


@pytest.mark.parametrize("name", sorted(OPS))
@settings(max_examples=120, deadline=None, database=None)
@given(sent=sentences(), seed=st.integers(0, 2**32), intensity=st.floats(0, 1))
def test_ner_ops_keep_tags_aligned_and_valid(name, sent, seed, intensity):
    before = Sentence(list(sent.words), list(sent.tags))
    out = OPS[name](sent, random.Random(seed), intensity)
    assert sent == before  # the input is not mutated
    assert len(out.words) == len(out.tags) and valid_iob2(out.tags)
    assert all(isinstance(w, str) and w for w in out.words)  # a NER word never vanishes
    assert types(out.tags) == types(sent.tags)  # every op keeps the entity types' multiset
    if name in ("noise", "case", "swap", "neighbour"):
        assert out.tags == sent.tags
    if name in ("swap", "delete", "insert", "neighbour"):
        assert mention_words(out) == mention_words(sent)  # mentions untouched, in order
    if name == "swap":
        assert Counter(out.words) == Counter(sent.words)
    if name == "noise":  # CJK characters are only deleted or moved, never replaced by ASCII typos
        for a, b in zip(sent.words, out.words):
            if has_cjk(a):
                assert Counter(b) <= Counter(a)
    if name == "mention":
        for (words, etype), (old, _) in zip(mention_words(out), mention_words(sent)):
            assert words == old or words in POOL[etype]


@settings(max_examples=60, deadline=None, database=None)
@given(sentences(), st.integers(0, 2**32))
def test_mention_replace_uses_same_type_pool(sent, seed):
    train = [Sentence(["Ann", "met", "Bo", "Li", "in", "Paris"], ["B-PER", "O", "B-PER", "I-PER", "O", "B-LOC"]),
             Sentence(["UN", "and", "New", "York"], ["B-ORG", "O", "B-LOC", "I-LOC"])]
    pool = mention_pool(train)
    assert pool == {"PER": [("Ann",), ("Bo", "Li")], "LOC": [("Paris",), ("New", "York")], "ORG": [("UN",)]}
    out = mention_replace(sent, random.Random(seed), 1.0, pool)
    assert [t for _, t in mention_words(out)] == [t for _, t in mention_words(sent)]
    assert all(words in pool[t] for words, t in mention_words(out))  # intensity 1: every mention replaced


def test_mentions_and_o_run_shuffle():
    s = Sentence(["a", "b", "c", "Ann", "Lee", "d", "e", "Rome"], ["O", "O", "O", "B-PER", "I-PER", "O", "O", "B-LOC"])
    assert mentions(s.tags) == [(3, 5, "PER"), (7, 8, "LOC")]
    seen = set()
    for seed in range(30):
        out = word_swap(s, random.Random(seed), 1.0)
        assert out.words[3:5] == ["Ann", "Lee"] and out.words[7] == "Rome" and sorted(out.words[:3]) == ["a", "b", "c"]
        seen.add(tuple(out.words))
    assert len(seen) > 3


def test_rng_is_stable_across_processes():
    here = rng_for(7, 2, 11).random()
    code = "from tunelab.robust.augment import rng_for; print(repr(rng_for(7, 2, 11).random()))"
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": "123", "PATH": ""}).stdout.strip()
    assert float(there) == here
    assert rng_for(7, 2, 11).random() != rng_for(7, 3, 11).random() != rng_for(7, 2, 12).random()


def corpus(n=20):
    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "Ann", "Rome", "quickly", "blue"]
    return [Sentence([rng.choice(words) for _ in range(8)], ["B-PER", "O", "O", "O", "B-LOC", "I-LOC", "O", "O"])
            for _ in range(n)]


ALL_OPS = [(char_noise, 0.5, 0.3), (word_swap, 0.5, 0.5), (word_insert, 0.3, 0.2), (word_delete, 0.3, 0.2),
           (partial(mention_replace, pool=POOL), 0.5, 0.5)]


def test_augment_is_deterministic_per_seed_epoch_index():
    data = corpus()
    a, b = augment_all(data, ALL_OPS, seed=3, epoch=1), augment_all(data, ALL_OPS, seed=3, epoch=1)
    assert a == b
    assert augment_all(data, ALL_OPS, seed=3, epoch=2) != a
    assert augment_all(data, ALL_OPS, seed=4, epoch=1) != a
    # an example's result depends only on (seed, epoch, its index), not on the rest of the list
    assert augment(data[5], ALL_OPS, rng_for(3, 1, 5)) == a[5]
    assert augment_all(data, [], seed=3, epoch=1) == data


def test_text_ops_and_chinese_stays_without_spaces():
    zh = TextExample("我爱北京天安门广场", label="x")
    for op in (word_swap, word_delete, word_insert, char_noise):
        for seed in range(10):
            out = op(zh, random.Random(seed), 0.5)
            assert " " not in out.text and out.label == "x"
            assert set(out.text) <= set(zh.text)  # no ASCII typo inside Chinese
    assert split_text("我爱 Python 和 NLP") == ["我", "爱", "Python", "和", "NLP"]
    assert join_words(split_text("我爱 Python 和 NLP")) == "我爱Python和NLP"
    en = TextExample("the quick brown fox jumps over the lazy dog")
    assert join_words(split_text(en.text)) == en.text
    noisy = char_noise(en, random.Random(1), 1.0)
    assert noisy.text != en.text and noisy.text.count(" ") == en.text.count(" ")
    assert sorted(word_swap(en, random.Random(1), 0.5).text.split()) == sorted(en.text.split())
    assert len(word_insert(en, random.Random(1), 0.3).text.split()) == 9 + 3
    assert word_delete(TextExample("one"), random.Random(0), 1.0).text == "one"  # at least one word stays
    assert all(c.lower() in QWERTY_NEIGHBOURS["s"] for c in "awedxz")
    assert case_flip(TextExample("Paris is big"), random.Random(0), 1.0).text == "paris Is Big"


def test_neighbour_replace_keeps_capitals_and_only_known_words():
    nb = {"paris": ["london"], "big": ["large"]}
    out = neighbour_replace(TextExample("Paris is big"), random.Random(0), 1.0, nb)
    assert out.text == "London is large"
    s = Sentence(["Paris", "is", "big"], ["B-LOC", "O", "O"])
    assert neighbour_replace(s, random.Random(0), 1.0, nb).words == ["Paris", "is", "large"]  # O words only


class FakeTokenizer:
    all_special_tokens = ["[CLS]", "[SEP]", "[PAD]"]

    def __init__(self, tokens):
        self.vocab = {t: i for i, t in enumerate(tokens)}

    def get_vocab(self):
        return dict(self.vocab)


def test_embedding_neighbours_equal_brute_force():
    tokens = ["[PAD]", "[CLS]", "[SEP]", "[unused0]", "!", "##ing"] + [f"w{i}" for i in range(40)]
    emb = torch.randn(len(tokens), 6, generator=torch.Generator().manual_seed(0))
    got = embedding_neighbours(emb, FakeTokenizer(tokens), k=4, chunk=7)  # chunks that do not divide the rows
    words = [i for i, t in enumerate(tokens) if t.startswith("w")]
    e = emb[words].numpy()
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    sims = e @ e.T
    np.fill_diagonal(sims, -np.inf)
    want = {tokens[words[r]]: [tokens[words[j]] for j in np.argsort(-sims[r])[:4]] for r in range(len(words))}
    assert got == want


def test_embedding_neighbours_on_the_real_vocabulary(tiny_model_dir, minilm_tokenizer):
    from safetensors.torch import load_file

    weights = load_file(str(tiny_model_dir / "model.safetensors"))
    emb = next(v for k, v in weights.items() if k.endswith("word_embeddings.weight"))
    nb = embedding_neighbours(emb, minilm_tokenizer, k=3)  # 30k x 30k cosines, chunked (no wall-clock assert:
    # a loaded machine would fail it; the chunking is what keeps its memory bounded)
    special = set(minilm_tokenizer.all_special_tokens)
    assert len(nb) > 20000 and "the" in nb
    for w, ns in nb.items():
        assert len(ns) == 3 and w not in ns
        assert not any(n.startswith("##") or n in special or n.startswith("[unused") for n in ns + [w])


def encode_stub(calls):
    def encode(examples):  # one feature per 5 words, like NER windows of a long sentence
        calls.append([list(s.words) for s in examples])
        return [{"example": i, "words": tuple(s.words), "tags": tuple(s.tags)}
                for i, s in enumerate(examples) for _ in range(len(s.words) // 5 + 1)]
    return encode


def test_epoch_augmenter_is_pure_and_returns_encode_features():
    data, calls = corpus(), []
    before = [Sentence(list(s.words), list(s.tags)) for s in data]
    f = epoch_augmenter(data, encode_stub(calls), ALL_OPS)
    a = f(1, 0)
    assert a == f(1, 0) and a != f(1, 1) and a != f(2, 0)
    assert data == before
    assert a == encode_stub([])(augment_all(data, ALL_OPS, 1, 0))
    fixed = epoch_augmenter(data, encode_stub([]), ALL_OPS, seed=9)
    assert fixed(1, 0) == fixed(2, 0) == f(9, 0)  # an explicit seed overrides the recipe's


def test_epoch_augmenter_same_count():
    data = corpus()
    grow = [(word_insert, 1.0, 0.5)]  # 8 words -> 12: 3 features instead of 2
    base = encode_stub([])(data)
    free = epoch_augmenter(data, encode_stub([]), grow)(0, 0)
    assert len(free) != len(base)
    same = epoch_augmenter(data, encode_stub([]), grow + [(word_swap, 1.0, 1.0)], same_count=True)(0, 0)
    assert len(same) == len(base)
    assert [f["example"] for f in same] == [f["example"] for f in base]


def test_epoch_augmenter_with_the_ner_task(minilm_tokenizer):
    from tunelab.tasks import make_task

    labels = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    task = make_task("ner", minilm_tokenizer, labels, max_length=14)  # 12 word pieces a window
    data = corpus()
    encode = partial(task.encode, training=True)
    ops = [(word_insert, 1.0, 0.3), (char_noise, 1.0, 0.5)]
    base, grown = encode(data), encode(augment_all(data, ops, 0, 3))
    assert len(grown) > len(base)  # some augmented sentences need a second window
    feats = epoch_augmenter(data, encode, ops, same_count=True)(0, 3)
    assert [x["example"] for x in feats] == [x["example"] for x in base]
    kept = sum(a["input_ids"] != b["input_ids"] for a, b in zip(feats, base))
    assert 0 < kept < len(base)  # the others were put back to the original
    assert all(len(x["input_ids"]) == len(x["labels"]) <= 14 for x in feats)


def test_neighbours_of_the_packaged_minilm(minilm_tokenizer):
    """The real 30k x 384 embedding matrix: about 3 s on 2 CPU cores, and the neighbours make sense."""
    from safetensors.torch import load_file

    from tunelab.models import resolve_model_path

    weights = load_file(str(resolve_model_path("all-MiniLM-L6-v2") / "model.safetensors"))
    emb = next(v for k, v in weights.items() if k.endswith("word_embeddings.weight"))
    nb = embedding_neighbours(emb, minilm_tokenizer, k=5)
    assert "london" in nb["paris"] and "queen" in nb["king"]
