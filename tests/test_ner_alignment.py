"""NER features: sub-word alignment, windows for long sentences, document context, decoding, offsets."""

import random

import numpy as np
import pytest

from tunelab.data import Sentence
from tunelab.tasks.ner import IGNORE, NerTask, entity_spans, special_tokens, split_words, windows

LABELS = ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"]


@pytest.fixture(scope="module")
def tok(minilm_tokenizer):
    return minilm_tokenizer


def pieces(tok, word):
    return tok(word, add_special_tokens=False)["input_ids"]


def test_special_tokens(tok):
    assert special_tokens(tok) == ([tok.cls_token_id], [tok.sep_token_id])


def test_first_subtoken_labelling(tok):
    words = ["Kalashnikov", "met", "Schwarzenegger", "over", "lamb-chop", "in", "Ouagadougou", "."]
    tags = ["B-PER", "O", "B-PER", "O", "O", "O", "B-LOC", "O"]
    assert len(pieces(tok, "Kalashnikov")) > 1 and len(pieces(tok, "lamb-chop")) == 3
    task = NerTask(tok, LABELS, max_length=64)
    (feat,) = task.encode([Sentence(words, tags)], training=True)
    ids, labels = [tok.cls_token_id], [IGNORE]
    for w, t in zip(words, tags):
        p = pieces(tok, w)
        ids += p
        labels += [LABELS.index(t)] + [IGNORE] * (len(p) - 1)
    ids.append(tok.sep_token_id)
    labels.append(IGNORE)
    assert feat["input_ids"] == ids
    assert feat["labels"] == labels
    assert feat["example"] == 0
    # positions point at each word's first sub-token
    assert [w for w, _ in feat["positions"]] == list(range(len(words)))
    assert all(labels[pos] == LABELS.index(tags[w]) for w, pos in feat["positions"])
    # unlabelled input: the same ids, no labels at all
    (unl,) = task.encode([Sentence(words, None)], training=False)
    assert unl["input_ids"] == ids and set(unl["labels"]) == {IGNORE}


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("overlap", [0, 5])
def test_windows_partition_and_budget(seed, overlap):
    rng = random.Random(seed)
    counts = [rng.choice([1, 1, 1, 2, 3, 5]) for _ in range(rng.randint(1, 80))]
    budget = rng.randint(6, 24)
    spans = windows(counts, budget, overlap)
    covered = []
    for s, e, cs, ce in spans:
        assert s <= cs <= ce <= e
        assert sum(counts[s:e]) <= budget or e - s == 1
        covered += range(cs, ce)
    assert covered == list(range(len(counts)))  # cores partition the words, in order
    assert spans[0][0] == 0 and spans[-1][1] == len(counts)
    for (s1, e1, _, _), (s2, e2, _, _) in zip(spans, spans[1:]):
        assert s1 < s2 and e1 < e2  # every window reaches further than the one before
        if overlap == 0:
            assert s2 == e1  # disjoint and adjacent
        else:
            assert s2 <= e1
            assert sum(counts[s2:e1]) <= overlap


def test_windows_overlap_when_asked():
    counts = [1] * 30
    assert windows(counts, 40, 0) == [(0, 30, 0, 30)]
    no = windows(counts, 10, 0)
    assert [(s, e) for s, e, _, _ in no] == [(0, 10), (10, 20), (20, 30)]
    ov = windows(counts, 10, 4)
    assert all(s2 < e1 for (_, e1, _, _), (s2, _, _, _) in zip(ov, ov[1:]))
    assert [(s, e) for s, e, _, _ in ov][:2] == [(0, 10), (6, 16)]
    assert ov[0][3] == ov[1][2] == 8  # core boundary in the middle of the shared part


def test_windows_no_redundant_window_before_a_long_word():
    # the word after the first window is longer than the overlap: stepping back for overlap would give
    # windows that end where the first one does, again and again
    assert [(s, e) for s, e, _, _ in windows([1] * 10 + [20], 20, 5)] == [(0, 10), (10, 11)]
    assert [(s, e) for s, e, _, _ in windows([1] * 10 + [8], 12, 6)] == [(0, 10), (6, 11)]


def test_windows_word_longer_than_budget():
    spans = windows([2, 50, 2], 10, 0)
    assert [(s, e) for s, e, _, _ in spans] == [(0, 1), (1, 2), (2, 3)]


def long_sentence(n=60):
    rng = random.Random(1)
    vocab = [("Kalashnikov", "B-PER"), ("Paris", "B-LOC"), ("said", "O"), ("Ouagadougou", "B-LOC"),
             ("the", "O"), ("Siemens", "B-ORG"), ("lamb-chop", "O")]
    pairs = [rng.choice(vocab) for _ in range(n)]
    return Sentence([w for w, _ in pairs], [t for _, t in pairs], 0, "<long>", 1)


def test_long_sentence_training_windows(tok):
    sent = long_sentence()
    task = NerTask(tok, LABELS, max_length=24)
    feats = task.encode([sent], training=True)
    assert len(feats) > 3
    assert all(len(f["input_ids"]) <= 24 for f in feats)
    assert all(f["input_ids"][0] == tok.cls_token_id and f["input_ids"][-1] == tok.sep_token_id for f in feats)
    # every word's label exactly once, in order, across the features: nothing lost, nothing counted twice
    gold = [lab for f in feats for lab in f["labels"] if lab != IGNORE]
    assert gold == [LABELS.index(t) for t in sent.tags]
    words = [w for f in feats for w, _ in f["positions"]]
    assert words == list(range(len(sent.words)))


def token_logits(tok, feats, word_tag: dict, labels):
    """Logits that read each word's tag off its first sub-token id, independent of tunelab's bookkeeping."""
    first = {pieces(tok, w)[0]: labels.index(t) for w, t in word_tag.items()}
    out = []
    for f in feats:
        lg = np.zeros((len(f["input_ids"]), len(labels)), dtype=np.float32)
        for i, t in enumerate(f["input_ids"]):
            lg[i, first.get(t, 0)] = 5.0
        out.append(lg)
    return out


def test_long_sentence_prediction_every_word(tok):
    sent = long_sentence(80)
    task = NerTask(tok, LABELS, max_length=24)
    feats = task.encode([sent, Sentence(["Paris"], ["B-LOC"])], training=False)
    assert sum(f["example"] == 0 for f in feats) > 4
    assert all(len(f["input_ids"]) <= 24 for f in feats)
    mapping = dict(zip(sent.words, sent.tags))
    preds = task.decode(feats, token_logits(tok, feats, mapping, LABELS), 2)
    assert preds[0][0] == sent.tags  # every word predicted, each from its own position
    assert len(preds[0][1]) == len(sent.words) and all(0.9 < p <= 1 for p in preds[0][1])
    assert preds[1][0] == ["B-LOC"]


def test_decode_gives_the_best_valid_iob2(tok):
    task = NerTask(tok, LABELS, max_length=32)
    words = ["Angela", "Merkel", "in", "Paris"]
    feats = task.encode([Sentence(words)], training=False)
    lg = np.zeros((len(feats[0]["input_ids"]), len(LABELS)), dtype=np.float32)
    for (w, pos), tag in zip(feats[0]["positions"], ["I-PER", "I-PER", "O", "I-LOC"]):
        lg[pos, LABELS.index(tag)] = 3.0
    # Second choices: B-PER on "Angela", B-LOC on "Paris"; the argmax (I- after O) is not valid IOB2.
    lg[feats[0]["positions"][0][1], LABELS.index("B-PER")] = 1.0
    lg[feats[0]["positions"][3][1], LABELS.index("B-LOC")] = 1.0
    assert task.decode(feats, [lg], 1)[0][0] == ["B-PER", "I-PER", "O", "B-LOC"]
    # Without a B-LOC preference, a lone I-LOC is not turned into an entity (O and B-LOC tie, O first).
    lg[feats[0]["positions"][3][1], LABELS.index("B-LOC")] = 0.0
    assert task.decode(feats, [lg], 1)[0][0][3] == "O"


def test_context_sentences(tok):
    docs = [Sentence(["Peter", "spoke"], ["B-PER", "O"], 0, "f", 1),
            Sentence(["in", "Paris"], ["O", "B-LOC"], 0, "f", 4),
            Sentence(["at", "Siemens"], ["O", "B-ORG"], 0, "f", 7),
            Sentence(["Kalashnikov", "left"], ["B-PER", "O"], 1, "f", 11)]
    ids = {i: [t for w in s.words for t in pieces(tok, w)] for i, s in enumerate(docs)}
    cls, sep = tok.cls_token_id, tok.sep_token_id
    task = NerTask(tok, LABELS, max_length=64, context_sentences=1)
    feats = task.encode(docs, training=True)
    assert len(feats) == 4
    # middle sentence: left and right neighbours of the same document around it
    assert feats[1]["input_ids"] == [cls] + ids[0] + ids[1] + ids[2] + [sep]
    assert [lab for lab in feats[1]["labels"] if lab != IGNORE] == [LABELS.index("O"), LABELS.index("B-LOC")]
    n_left = 1 + len(ids[0])
    assert feats[1]["labels"][:n_left] == [IGNORE] * n_left
    assert feats[1]["labels"][n_left + len(ids[1]):] == [IGNORE] * (len(ids[2]) + 1)
    # the last sentence of document 0 does not see document 1, nor document 1 document 0
    assert feats[2]["input_ids"] == [cls] + ids[1] + ids[2] + [sep]
    assert feats[3]["input_ids"] == [cls] + ids[3] + [sep]
    # two sentences of context on each side where they exist
    task2 = NerTask(tok, LABELS, max_length=64, context_sentences=2)
    assert task2.encode(docs, training=True)[0]["input_ids"] == [cls] + ids[0] + ids[1] + ids[2] + [sep]
    # no room: no context, never a cut sentence
    small = NerTask(tok, LABELS, max_length=2 + len(ids[1]) + 1, context_sentences=1)
    assert small.encode(docs[:3], training=True)[1]["input_ids"] == [cls] + ids[1] + [sep]
    # decoding reads the target sentence, not its context
    mapping = {w: t for s in docs for w, t in zip(s.words, s.tags)}
    pf = task.encode(docs, training=False)
    preds = task.decode(pf, token_logits(tok, pf, mapping, LABELS), 4)
    assert [p[0] for p in preds] == [s.tags for s in docs]


def test_split_words_offsets():
    text = "Angela Merkel  visited Paris, France's capital (2019)."
    words, offs = split_words(text)
    assert words == ["Angela", "Merkel", "visited", "Paris", ",", "France", "'", "s", "capital", "(", "2019", ")",
                     "."]
    assert [text[s:e] for s, e in offs] == words
    assert offs[1] == (7, 13) and offs[2] == (15, 22)
    zh, zoffs = split_words("我爱北京 ok")
    assert zh == ["我", "爱", "北", "京", "ok"] and zoffs[-1] == (5, 7)
    assert split_words("  \n ") == ([], [])


def test_entity_spans():
    assert entity_spans(["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-ORG", "I-ORG", "O"]) == \
        [("PER", 0, 2), ("LOC", 3, 4), ("LOC", 4, 5), ("ORG", 5, 7)]
    assert entity_spans(["B-PER", "I-LOC"]) == [("PER", 0, 1), ("LOC", 1, 2)]
    assert entity_spans(["O", "O"]) == []
    assert entity_spans(["I-MISC"]) == [("MISC", 0, 1)]


# --- constrained decoding ------------------------------------------------------------------------------------


def test_viterbi_returns_argmax_when_it_is_valid_and_best_valid_path_otherwise():
    import numpy as np

    from tunelab.tasks.ner import iob2_transitions, viterbi

    labels = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG"]
    allowed, start = iob2_transitions(labels)
    valid = np.log(np.array([[.1, .7, .1, .05, .05], [.1, .1, .7, .05, .05], [.8, .05, .05, .05, .05]]))
    assert viterbi(valid, allowed, start) == [1, 2, 0]
    # argmax says I-PER I-PER O: an entity that starts inside. The best valid path is B-PER I-PER O
    # (0.2 * 0.7), not O I-PER (invalid) nor the "repair" B-PER on word 2 only.
    bad_start = np.log(np.array([[.1, .2, .6, .05, .05], [.1, .1, .7, .05, .05], [.8, .05, .05, .05, .05]]))
    assert [labels[k] for k in viterbi(bad_start, allowed, start)] == ["B-PER", "I-PER", "O"]
    # B-PER then I-ORG: type switch inside an entity is not IOB2; B-PER I-PER (0.6 * 0.2) beats
    # B-PER O (0.6 * 0.1) and B-ORG I-ORG (0.05 * 0.55).
    switch = np.log(np.array([[.1, .6, .2, .05, .05], [.1, .1, .2, .05, .55], [.8, .05, .05, .05, .05]]))
    assert [labels[k] for k in viterbi(switch, allowed, start)] == ["B-PER", "I-PER", "O"]


def test_transitions_forbid_inside_after_o_or_other_type():
    from tunelab.tasks.ner import iob2_transitions

    labels = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG"]
    allowed, start = iob2_transitions(labels)
    assert not start[2] and not start[4] and start[0] and start[1]
    assert allowed[1, 2] and allowed[2, 2] and not allowed[0, 2] and not allowed[3, 2] and allowed[2, 3]
