"""Data readers, tag-scheme conversion, built-in sets and in-memory records."""

import bz2
import csv
import json

import pytest

from tunelab.data import Sentence, TextExample, check_labels, from_hf_dataset, from_records, load_splits, read_file
from tunelab.data.conll import read_conll, write_conll
from tunelab.data.packaged import bbc_news, chn_sentiment, conll2003, load_builtin, msra, rt_sentiment
from tunelab.data.tags import entity_types, label_list, repair_iob2, to_iob2
from tunelab.data.text import read_csv, read_jsonl, read_jsonl_sentences, read_lines
from tunelab.errors import TunelabError

CONLL = """-DOCSTART- -X- -X- O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
German JJ B-NP B-MISC
call NN I-NP O
. . O O

Peter NNP B-NP B-PER
Blackburn NNP I-NP I-PER

-DOCSTART- -X- -X- O

BRUSSELS NNP B-NP B-LOC
1996-08-22 CD I-NP O
"""


def write(tmp_path, name, text, encoding="utf-8"):
    p = tmp_path / name
    p.write_bytes(text.encode(encoding))
    return p


# --- CoNLL -----------------------------------------------------------------------------------------------


def test_read_conll_sentences_docs_and_lines(tmp_path):
    sents = read_conll(write(tmp_path, "a.conll", CONLL))
    assert [s.words for s in sents] == [["EU", "rejects", "German", "call", "."], ["Peter", "Blackburn"],
                                       ["BRUSSELS", "1996-08-22"]]
    assert [s.tags for s in sents] == [["B-ORG", "O", "B-MISC", "O", "O"], ["B-PER", "I-PER"], ["B-LOC", "O"]]
    assert [s.doc for s in sents] == [0, 0, 1]
    assert [s.line for s in sents] == [3, 9, 14]
    assert all(s.source.endswith("a.conll") for s in sents)


def test_read_conll_tag_column(tmp_path):
    p = write(tmp_path, "a.conll", CONLL)
    chunks = read_conll(p, tag_column=2)
    assert chunks[0].tags == ["B-NP", "B-VP", "B-NP", "I-NP", "O"]
    assert chunks[2].tags == ["B-NP", "I-NP"]
    # negative indices count from the end: -1 is the NER column
    assert read_conll(p, tag_column=-1)[0].tags == ["B-ORG", "O", "B-MISC", "O", "O"]


def test_read_conll_converts_scheme_when_reading(tmp_path):
    text = "Peter I-PER\nBlackburn I-PER\nin O\nParis I-LOC\n\nA S-ORG\nB B-ORG\nC E-ORG\n"
    iob1 = read_conll(write(tmp_path, "a.iob", text.replace("S-ORG", "I-ORG").replace("E-ORG", "I-ORG")),
                      scheme="iob1")
    assert iob1[0].tags == ["B-PER", "I-PER", "O", "B-LOC"]
    bioes = read_conll(write(tmp_path, "b.conll", text.replace("I-PER\nBlackburn I-PER", "B-PER\nBlackburn E-PER")
                             .replace("I-LOC", "S-LOC")), scheme="bioes")
    assert bioes[0].tags == ["B-PER", "I-PER", "O", "B-LOC"]
    assert bioes[1].tags == ["B-ORG", "B-ORG", "I-ORG"]


def test_read_conll_unlabelled(tmp_path):
    sents = read_conll(write(tmp_path, "w.conll", "Angela\nMerkel\n\nParis\n"), labelled=False)
    assert [s.words for s in sents] == [["Angela", "Merkel"], ["Paris"]]
    assert all(s.tags is None for s in sents)


def test_write_conll_round_trip(tmp_path):
    sents = read_conll(write(tmp_path, "a.conll", CONLL))
    preds = [["O"] * len(s.words) for s in sents]
    out = tmp_path / "out.conll"
    write_conll(out, sents, preds)
    lines = out.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "EU B-ORG O"
    assert "-DOCSTART- O O" in lines  # the document break survives, as many columns as a token line (conlleval)
    again = read_conll(out, tag_column=1)
    assert [s.words for s in again] == [s.words for s in sents]
    assert [s.tags for s in again] == [s.tags for s in sents]
    assert [s.doc for s in again] == [0, 0, 1]


# --- tag schemes -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("tags, expected", [
    (["I-PER", "I-PER", "O", "I-LOC", "B-LOC", "I-LOC"], ["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-LOC"]),
    (["I-PER", "I-LOC", "I-LOC"], ["B-PER", "B-LOC", "I-LOC"]),
    (["O", "I-ORG", "B-ORG", "O", "I-ORG"], ["O", "B-ORG", "B-ORG", "O", "B-ORG"]),
])
def test_iob1_to_iob2(tags, expected):
    assert to_iob2(tags, "iob1") == expected


@pytest.mark.parametrize("tags, expected", [
    (["B-PER", "E-PER", "S-LOC", "O", "B-ORG", "I-ORG", "E-ORG", "S-ORG"],
     ["B-PER", "I-PER", "B-LOC", "O", "B-ORG", "I-ORG", "I-ORG", "B-ORG"]),
    (["S-PER", "S-PER"], ["B-PER", "B-PER"]),
    # malformed: an I-/E- right after a closed entity starts a new one instead of merging with it
    (["S-PER", "I-PER", "E-PER"], ["B-PER", "B-PER", "I-PER"]),
    (["B-PER", "E-PER", "E-PER"], ["B-PER", "I-PER", "B-PER"]),
])
def test_bioes_to_iob2(tags, expected):
    assert to_iob2(tags, "bioes") == expected


def test_bilou_to_iob2():
    assert to_iob2(["U-PER", "B-ORG", "I-ORG", "L-ORG", "O", "U-LOC"], "bilou") == \
        ["B-PER", "B-ORG", "I-ORG", "I-ORG", "O", "B-LOC"]


def test_bmes_to_iob2():
    assert to_iob2(["B-LOC", "M-LOC", "E-LOC", "S-PER", "O", "B-ORG", "E-ORG"], "bmes") == \
        ["B-LOC", "I-LOC", "I-LOC", "B-PER", "O", "B-ORG", "I-ORG"]


def test_iob2_is_kept_and_repaired():
    good = ["B-PER", "I-PER", "B-PER", "O", "B-LOC"]
    assert to_iob2(good, "iob2") == good
    assert to_iob2(["O", "I-LOC", "I-LOC"], "iob2") == ["O", "B-LOC", "I-LOC"]


def test_repair_iob2():
    assert repair_iob2(["O", "I-PER", "I-PER", "I-LOC", "B-ORG", "I-ORG", "O", "I-ORG"]) == \
        ["O", "B-PER", "I-PER", "B-LOC", "B-ORG", "I-ORG", "O", "B-ORG"]
    assert repair_iob2([]) == []


@pytest.mark.parametrize("tags, scheme", [(["E-PER"], "iob2"), (["M-LOC"], "bioes"), (["PER"], "iob2"),
                                          (["B-"], "iob2"), (["XX-PER"], "iob2"), (["S-PER"], "iob1")])
def test_bad_tags_raise(tags, scheme):
    with pytest.raises(ValueError, match=tags[0]):
        to_iob2(tags, scheme)


def test_unknown_scheme():
    with pytest.raises(TunelabError, match="bioul"):
        to_iob2(["O"], "bioul")


def test_label_list_order():
    labels = label_list([["B-PER", "I-PER", "O"], ["B-LOC", "B-ORG", "I-ORG"], ["I-LOC"]])
    assert labels == ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
    assert entity_types(labels) == ["LOC", "ORG", "PER"]


# --- JSONL / CSV / plain text ----------------------------------------------------------------------------


def test_read_jsonl(tmp_path):
    p = write(tmp_path, "a.jsonl", '{"text": "good film", "label": "pos"}\n\n{"text": "bad", "label": 0, "x": 1}\n')
    ex = read_jsonl(p)
    assert [(e.text, e.label, e.line) for e in ex] == [("good film", "pos", 1), ("bad", "0", 3)]
    assert read_jsonl(p, labelled=False)[1].label is None


def test_read_jsonl_custom_fields(tmp_path):
    p = write(tmp_path, "a.jsonl", '{"body": "hello there", "y": "greeting"}\n')
    assert read_jsonl(p, text_field="body", label_field="y")[0] == TextExample("hello there", "greeting", str(p), 1)
    with pytest.raises(TunelabError, match=r"a\.jsonl:1.*'text'"):
        read_jsonl(p)


def test_read_csv_and_tsv(tmp_path):
    p = write(tmp_path, "a.csv", 'text,label\n"Shares fell, again",business\nGoal!,sport\n')
    ex = read_csv(p)
    assert [(e.text, e.label, e.line) for e in ex] == [("Shares fell, again", "business", 2), ("Goal!", "sport", 3)]
    t = write(tmp_path, "a.tsv", "label\ttext\nsport\tA late goal, then a win\n")
    assert [(e.text, e.label) for e in read_csv(t)] == [("A late goal, then a win", "sport")]
    with pytest.raises(TunelabError, match=r"a\.csv:1.*'label'"):
        read_csv(write(tmp_path, "b.csv", "text,y\nhello,1\n").rename(tmp_path / "a.csv"))


def test_csv_extra_values(tmp_path):
    with pytest.raises(TunelabError, match=r"c\.csv:3"):
        read_csv(write(tmp_path, "c.csv", "text,label\nfine,a\nnot,fine,b\n"))


def test_read_lines(tmp_path):
    ex = read_lines(write(tmp_path, "t.txt", "first line\n\n  \nsecond\n"))
    assert [(e.text, e.line, e.label) for e in ex] == [("first line", 1, None), ("second", 4, None)]


def test_read_jsonl_sentences(tmp_path):
    p = write(tmp_path, "n.jsonl", json.dumps({"tokens": ["Peter", "Blackburn", "spoke"],
                                              "tags": ["I-PER", "I-PER", "O"]}) + "\n")
    s = read_jsonl_sentences(p, scheme="iob1")[0]
    assert (s.words, s.tags, s.line) == (["Peter", "Blackburn", "spoke"], ["B-PER", "I-PER", "O"], 1)


def test_read_file_by_extension(tmp_path, conll_dir, cls_dir):
    assert isinstance(read_file(conll_dir / "train.conll", "ner")[0], Sentence)
    a = read_file(cls_dir / "train.jsonl", "classify")
    b = read_file(cls_dir / "train.csv", "classify")
    assert [(e.text, e.label) for e in a] == [(e.text, e.label) for e in b]
    assert len(a) == 48
    with pytest.raises(TunelabError, match="data.format"):
        read_file(write(tmp_path, "x.weird", "a\n"), "ner")


def test_load_splits_files_and_limits(conll_dir):
    from tunelab.config import load_config

    cfg = load_config(None, [f"data.train={conll_dir / 'train.conll'}", f"data.dev={conll_dir / 'dev.conll'}",
                             "data.max_train_examples=7", "data.max_eval_examples=3"])
    sp = load_splits(cfg.data, "ner")
    assert (len(sp.train), len(sp.dev), len(sp.test)) == (7, 3, 0)
    full = read_conll(conll_dir / "train.conll")
    assert [s.words for s in sp.train] == [s.words for s in full[:7]]


def test_check_labels(conll_dir):
    train = read_conll(conll_dir / "train.conll")
    labels = check_labels(train, {"dev": read_conll(conll_dir / "dev.conll")})
    assert labels == ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
    cls = from_records([("a", "x"), ("b", "y"), ("c", "x")], "classify")
    assert check_labels(cls, {}) == ["x", "y"]
    with pytest.raises(TunelabError, match="at least 2"):
        check_labels(cls[:1], {})
    with pytest.raises(TunelabError, match="no training"):
        check_labels([], {})


# --- built-in sets ---------------------------------------------------------------------------------------


def test_conll2003_sizes():
    sp = conll2003()
    assert (len(sp.train), len(sp.dev), len(sp.test)) == (14041, 3250, 3453)
    assert sum(len(s.words) for s in sp.test) == 46435
    assert label_list(s.tags for s in sp.train) == ["O", "B-LOC", "I-LOC", "B-MISC", "I-MISC", "B-ORG", "I-ORG",
                                                     "B-PER", "I-PER"]
    assert sp.train[0].words == ["EU", "rejects", "German", "call", "to", "boycott", "British", "lamb", "."]
    assert sp.train[0].tags == ["B-ORG", "O", "B-MISC", "O", "O", "O", "B-MISC", "O", "O"]
    assert len({s.doc for s in sp.train}) > 900  # documents are told apart
    assert load_builtin("conll2003").test[5].words == sp.test[5].words


def _texts(split):
    return [e.text for e in split]


@pytest.mark.parametrize("loader", [bbc_news, chn_sentiment])
def test_split_sets_disjoint_and_deterministic(loader):
    a, b = loader(), loader()
    tr, dv, te = set(_texts(a.train)), set(_texts(a.dev)), set(_texts(a.test))
    assert len(tr) == len(a.train) and len(dv) == len(a.dev) and len(te) == len(a.test)  # no duplicates
    assert not tr & dv and not tr & te and not dv & te
    for x, y in ((a.train, b.train), (a.dev, b.dev), (a.test, b.test)):
        assert [(e.text, e.label) for e in x] == [(e.text, e.label) for e in y]
    n = len(a.train) + len(a.dev) + len(a.test)
    assert 0.65 < len(a.train) / n < 0.85 and len(a.dev) > 0.08 * n and len(a.test) > 0.08 * n
    labels = sorted({e.label for e in a.train})
    assert labels == sorted({e.label for e in a.test}) and len(labels) >= 2


def test_bbc_news_classes():
    sp = bbc_news()
    assert sorted({e.label for e in sp.train}) == ["business", "entertainment", "politics", "sports", "tech"]


def test_rt_sentiment_split_by_movie():
    a, b = rt_sentiment(), load_builtin("rt_sentiment")
    splits = (a.train, a.dev, a.test)
    # Read the CSV again, independently: each text's labels and the movie of its first review row.
    with bz2.open(a.about["files"], "rt", encoding="utf-8", newline="") as f:
        rows = [r for r in csv.DictReader(f)]
    labels, movie = {}, {}
    for r in rows:
        if r["category"] != "plot":
            t = " ".join(r["text"].split())
            labels.setdefault(t, set()).add(r["category"])
            movie.setdefault(t, r["movie_name"])
    kept = sorted(t for t, ls in labels.items() if len(ls) == 1)
    assert sorted(e.text for part in splits for e in part) == kept  # every kept text, each exactly once
    assert [len(part) for part in splits] == [10231, 1251, 1270]  # the documented benchmark split
    movies = [{movie[e.text] for e in part} for part in splits]
    assert not movies[0] & movies[1] and not movies[0] & movies[2] and not movies[1] & movies[2]
    for part in splits:
        assert {e.label for e in part} == {"fresh", "rotten"}
        assert all(labels[e.text] == {e.label} for e in part)
    for e in a.test[:100]:  # `line` is the CSV row: data row + 1 for the header
        assert " ".join(rows[e.line - 2]["text"].split()) == e.text
    for x, y in zip(splits, (b.train, b.dev, b.test)):
        assert [(e.text, e.label, e.line) for e in x] == [(e.text, e.label, e.line) for e in y]


def test_msra_sizes():
    sp = msra()
    assert len(sp.train) + len(sp.dev) == 50658
    assert 0.04 < len(sp.dev) / 50658 < 0.06
    assert len(sp.test) > 4000
    assert all(len(w) == 1 for s in sp.train[:200] for w in s.words)  # one character a word


def test_peoples_daily_ner():
    """PKU's nr/ns/nt words as PER/LOC/ORG over characters; a surname and given name (two nr words) are one
    person; sentences end after 。！？; whole paragraphs go to one split, in file order."""
    from tunelab.data.packaged import peoples_daily, peoples_daily_sentences

    sp = peoples_daily()
    assert (len(sp.train), len(sp.dev), len(sp.test)) == (35347, 4222, 4146)
    assert all(len(w) == 1 for s in sp.train[:500] for w in s.words)
    assert {t for s in sp.train for t in s.tags} == {"O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"}
    paragraphs = [max(s.doc for s in part) for part in (sp.train, sp.dev, sp.test)]
    assert paragraphs == sorted(paragraphs) and max(s.doc for s in sp.train) < min(s.doc for s in sp.dev)
    line = "中共中央/nt  总书记/n  江/nr  泽民/nr  在/p  北京/ns  讲话/v  。/w  [香港/ns  特区/n]ns  好/a  。/w"
    first, second = peoples_daily_sentences(line, 0, "x", 1)
    assert "".join(first.words) == "中共中央总书记江泽民在北京讲话。"
    assert first.tags == ["B-ORG", "I-ORG", "I-ORG", "I-ORG", "O", "O", "O", "B-PER", "I-PER", "I-PER", "O",
                          "B-LOC", "I-LOC", "O", "O", "O"]
    assert second.words == list("香港特区好。") and second.tags[:2] == ["B-LOC", "I-LOC"]


def test_builtin_task_mismatch_and_unknown():
    from tunelab.config import load_config

    with pytest.raises(TunelabError, match="bbc_news"):
        load_splits(load_config(None, ["data.dataset=bbc_news"]).data, "ner")
    with pytest.raises(TunelabError, match="conll2099"):
        load_builtin("conll2099")


# --- in-memory -------------------------------------------------------------------------------------------


def test_from_records_ner():
    out = from_records([{"tokens": ["Peter", "Blackburn"], "tags": ["B-PER", "I-PER"]},
                        (["in", "Paris"], ["O", "I-LOC"]), {"tokens": ["unlabelled"]}], "ner")
    assert [s.words for s in out] == [["Peter", "Blackburn"], ["in", "Paris"], ["unlabelled"]]
    assert [s.tags for s in out] == [["B-PER", "I-PER"], ["O", "B-LOC"], None]
    assert [s.doc for s in out] == [0, 1, 2]
    with pytest.raises(TunelabError, match="record 1"):
        from_records([(["a"], ["O"]), (["a", "b"], ["O"])], "ner")
    with pytest.raises(TunelabError, match="record 0"):
        from_records([{"tokens": [], "tags": []}], "ner")


def test_from_records_classify():
    out = from_records([{"text": "good", "label": 1}, ("bad", "neg"), {"text": "no label"}], "classify")
    assert [(e.text, e.label) for e in out] == [("good", "1"), ("bad", "neg"), ("no label", None)]
    with pytest.raises(TunelabError, match="record 1"):
        from_records([("ok", "a"), ("  ", "b")], "classify")


def test_from_hf_dataset_class_label_names():
    class Seq:
        feature = type("CL", (), {"names": ["O", "B-PER", "I-PER"]})()

    class FakeDataset(list):
        column_names = ["tokens", "ner_tags"]
        features = {"ner_tags": Seq()}

    ds = FakeDataset([{"tokens": ["Peter", "Blackburn", "spoke"], "ner_tags": [1, 2, 0]}])
    assert from_hf_dataset(ds, "ner")[0].tags == ["B-PER", "I-PER", "O"]
    with pytest.raises(TunelabError, match="ner_tags"):
        from_hf_dataset(type("D", (list,), {"column_names": ["words"], "features": {}})(), "ner")
