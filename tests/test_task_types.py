"""The task types beyond NER / single-text classification / generation: text pairs, regression, multi-label,
extractive QA and relation extraction; generation scored by its outputs. Encoding round trips, metrics
against hand computations and the reference libraries, saved folders against plain transformers, bad
records, the server's text pairs, and the BIG-bench sets."""

import json
import random

import numpy as np
import pytest
import torch

from conftest import tiny_overrides
from tunelab import cli
from tunelab.config import load_config
from tunelab.data import read_file
from tunelab.data.batching import collate
from tunelab.data.examples import QAExample, RelationExample, ScoredText, TextExample
from tunelab.errors import TunelabError
from tunelab.metrics import (generation_metrics, multilabel_metrics, regression_metrics, relation_metrics,
                             squad_f1, squad_metrics)
from tunelab.predict import Predictor
from tunelab.tasks import make_task
from tunelab.tasks.relation import crop, inline, mark
from tunelab.train import train

TOPICS = {"sport": ["the team won the match", "a late goal decided the final", "the striker scored twice"],
          "money": ["shares fell on monday", "the bank raised rates", "profits doubled at the firm"]}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def pair_records(seed: int, n: int) -> list[dict]:
    """Pairs of topic sentences: same / different topic, a similarity score, the set of topics."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.choice(sorted(TOPICS)), rng.choice(sorted(TOPICS))
        out.append({"text": rng.choice(TOPICS[a]), "text_pair": rng.choice(TOPICS[b]),
                    "label": "same" if a == b else "different", "score": 4.0 * (a == b) + rng.random(),
                    "labels": sorted({a, b})})
    return out


@pytest.fixture(scope="module")
def pair_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("pairs")
    for i, (split, n) in enumerate({"train": 48, "dev": 12, "test": 12}.items()):
        write_jsonl(d / f"{split}.jsonl", pair_records(400 + i, n))
    return d


def run(tmp_path_factory, model_dir, task: str, data: dict, **extra):
    out = tmp_path_factory.mktemp(task) / "out"
    cfg = load_config(None, tiny_overrides(model_dir, out, task=task, **{
        f"data.{k}": v for k, v in data.items()} | {"train.epochs": 3, "train.batch_size": 8} | extra))
    return out, train(cfg)


# --- batches -------------------------------------------------------------------------------------------------


def test_collate_carries_pairs_scores_label_vectors_and_answer_positions():
    feats = [{"input_ids": [1, 2, 3], "token_type_ids": [0, 0, 1], "labels": 1.5},
             {"input_ids": [4, 5], "token_type_ids": [0, 1], "labels": -0.5}]
    b = collate(feats, 0)
    assert b["token_type_ids"].tolist() == [[0, 0, 1], [0, 1, 0]]
    assert b["labels"].dtype == torch.float and b["labels"].tolist() == [1.5, -0.5]
    b = collate([{"input_ids": [1], "labels": (1.0, 0.0, 1.0)}, {"input_ids": [2, 3], "labels": (0.0, 0.0, 0.0)}], 0)
    assert b["labels"].shape == (2, 3) and b["labels"].dtype == torch.float and "token_type_ids" not in b
    b = collate([{"input_ids": [1, 2], "start_positions": 1, "end_positions": 1},
                 {"input_ids": [3], "start_positions": 0, "end_positions": 0}], 0)
    assert b["start_positions"].tolist() == [1, 0] and "labels" not in b


# --- text pairs ----------------------------------------------------------------------------------------------


def test_pair_encoding_marks_the_second_text_and_cuts_the_longer(minilm_tokenizer):
    tok = minilm_tokenizer
    task = make_task("classify", tok, ["a", "b"], 16, pairs=True)
    short = TextExample("the cat sat", "a", text_pair="a dog ran")
    (f,) = task.encode([short], training=True)
    assert f["input_ids"] == tok("the cat sat", "a dog ran")["input_ids"]
    sep = f["input_ids"].index(tok.sep_token_id)
    assert f["token_type_ids"] == [0] * (sep + 1) + [1] * (len(f["input_ids"]) - sep - 1)
    long = TextExample(" ".join(["word"] * 40), "b", text_pair="a short claim")
    (g,) = task.encode([long], training=True)
    assert len(g["input_ids"]) == 16 and task.truncated == 1
    assert tok.decode(g["input_ids"][g["token_type_ids"].index(1):], skip_special_tokens=True) == "a short claim"
    with pytest.raises(TunelabError, match="reads text pairs"):
        task.encode([TextExample("no pair", "a")], training=False)
    with pytest.raises(TunelabError, match="reads single texts"):
        make_task("classify", tok, ["a", "b"], 16).encode([short], training=False)


@pytest.fixture(scope="module")
def pair_run(tmp_path_factory, tiny_model_dir, pair_dir):
    return run(tmp_path_factory, tiny_model_dir, "classify",
               {"train": pair_dir / "train.jsonl", "dev": pair_dir / "dev.jsonl", "test": pair_dir / "test.jsonl",
                "text_pair_field": "text_pair"})


def test_pair_classifier_matches_the_plain_pipeline(pair_run, pair_dir):
    from transformers import pipeline

    out, report = pair_run
    assert report["labels"] == ["different", "same"] and report["test"]["confusion"]["labels"] == report["labels"]
    meta = json.loads((out / "tunelab.json").read_text())
    assert meta["options"] == {"pairs": True}
    examples = read_file(pair_dir / "test.jsonl", "classify", labelled=False, text_pair_field="text_pair")
    ours = Predictor(out, device="cpu").predict(examples)
    clf = pipeline("text-classification", model=str(out), device="cpu", top_k=None)
    for ex, (label, probs) in zip(examples, ours):
        plain = {d["label"]: d["score"] for d in clf({"text": ex.text, "text_pair": ex.text_pair})}
        assert max(plain, key=plain.get) == label
        assert [plain[k] for k in report["labels"]] == pytest.approx(probs, abs=1e-4)


def test_pair_files_name_the_missing_field(tmp_path, pair_dir, pair_run, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "a", "label": "same"}])
    with pytest.raises(TunelabError, match=r"bad.jsonl:1: no field 'text_pair'.*text_pair_field"):
        read_file(bad, "classify", text_pair_field="text_pair")
    out, _ = pair_run
    # tunelab eval takes the pair field from the model; a single-text file is refused with its line
    assert cli.main(["eval", str(out), "--data", str(bad)]) != 0
    assert "bad.jsonl:1: no field 'text_pair'" in capsys.readouterr().err
    assert cli.main(["eval", str(out), "--data", str(pair_dir / "test.jsonl")]) == 0


# --- regression ----------------------------------------------------------------------------------------------


def test_regression_metrics():
    from scipy.stats import spearmanr

    g, p = [1.0, 2.0, 3.0, 4.0], [1.5, 1.9, 3.5, 3.0]
    m = regression_metrics(g, p)
    assert m["pearson"] == pytest.approx(np.corrcoef(g, p)[0, 1]) and m["main"] == m["pearson"]
    assert m["spearman"] == pytest.approx(spearmanr(g, p)[0]) and m["spearman"] == pytest.approx(0.8)
    assert m["mse"] == pytest.approx(np.mean((np.array(g) - p) ** 2))
    assert regression_metrics(g, [2.0] * 4)["pearson"] == 0.0  # a constant prediction: no correlation, not NaN


def test_regression_end_to_end_and_plain_transformers(tmp_path_factory, tiny_model_dir, pair_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    data = {k: pair_dir / f"{k}.jsonl" for k in ("train", "dev", "test")}
    out, report = run(tmp_path_factory, tiny_model_dir, "regress", data | {"text_pair_field": "text_pair",
                                                                            "label_field": "score"})
    losses = [h["loss"] for h in report["history"]]
    assert np.mean(losses[-3:]) < np.mean(losses[:3])  # MSE on scores of 0-5 falls
    assert set(report["test"]) >= {"pearson", "spearman", "mse", "mae"}
    model = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    assert model.config.problem_type == "regression" and model.config.num_labels == 1
    examples = read_file(data["test"], "regress", label_field="score", text_pair_field="text_pair")
    tok = AutoTokenizer.from_pretrained(str(out))
    with torch.no_grad():
        plain = model(**tok([e.text for e in examples], [e.text_pair for e in examples], padding=True,
                            return_tensors="pt")).logits[:, 0]
    assert Predictor(out, device="cpu").predict(examples) == pytest.approx(plain.tolist(), abs=1e-4)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "a", "text_pair": "b", "score": 1}, {"text": "a",
                                                                                           "text_pair": "b",
                                                                                           "score": "high"}])
    with pytest.raises(TunelabError, match=r"bad.jsonl:2: field 'score' must be a finite number"):
        read_file(bad, "regress", label_field="score", text_pair_field="text_pair")


# --- multi-label ---------------------------------------------------------------------------------------------


def test_multilabel_metrics_by_hand():
    gold = [["a"], ["a", "b"], []]
    probs = [[0.9, 0.2], [0.6, 0.4], [0.1, 0.3]]
    m = multilabel_metrics(gold, probs, ["a", "b"], 0.5)
    # at 0.5: predicted {a}, {a}, {}: tp 2, fp 0, fn 1 -> micro P 1, R 2/3
    assert m["micro_f1"] == pytest.approx(0.8) and m["subset_accuracy"] == pytest.approx(2 / 3)
    assert m["per_label"]["b"]["recall"] == 0.0 and m["macro_f1"] == pytest.approx(0.5)  # a: F1 1, b: F1 0
    # at 0.35 and 0.4 b is caught in the second text (0.4) but not the third (0.3): every label right; ties go
    # to the threshold nearest 0.5
    assert m["best_threshold"] == 0.4 and m["best_threshold_micro_f1"] == 1.0


def test_multilabel_threshold_is_tuned_on_dev_and_saved(tmp_path_factory, tiny_model_dir, pair_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    data = {k: pair_dir / f"{k}.jsonl" for k in ("train", "dev", "test")}
    out, report = run(tmp_path_factory, tiny_model_dir, "multilabel",
                      data | {"text_pair_field": "text_pair", "label_field": "labels"})
    best = next(e for e in report["evals"] if e["step"] == report["best_step"])["metrics"]
    assert report["test"]["threshold"] == best["best_threshold"]  # from dev, never from test
    meta = json.loads((out / "tunelab.json").read_text())
    assert meta["options"]["threshold"] == best["best_threshold"]
    model = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    assert model.config.problem_type == "multi_label_classification"
    examples = read_file(data["test"], "multilabel", label_field="labels", text_pair_field="text_pair")
    tok = AutoTokenizer.from_pretrained(str(out))
    with torch.no_grad():
        p = model(**tok([e.text for e in examples], [e.text_pair for e in examples], padding=True,
                        return_tensors="pt")).logits.sigmoid()
    plain = [[model.config.id2label[j] for j in range(p.shape[1]) if p[i, j] >= meta["options"]["threshold"]]
             for i in range(len(examples))]
    assert [x[0] for x in Predictor(out, device="cpu").predict(examples)] == plain


def test_multilabel_bad_records(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "a", "labels": ["x"]}, {"text": "b", "labels": "x"}])
    with pytest.raises(TunelabError, match=r"bad.jsonl:2: field 'labels' must be a list"):
        read_file(bad, "multilabel", label_field="labels")
    rep = write_jsonl(tmp_path / "rep.jsonl", [{"text": "a", "labels": ["x", "x"]}])
    with pytest.raises(TunelabError, match=r"rep.jsonl:1: field 'labels' repeats a label"):
        read_file(rep, "multilabel", label_field="labels")


# --- extractive QA -------------------------------------------------------------------------------------------


def qa_record(i: int, rng) -> dict:
    person, city = rng.choice(["Anna", "Peter", "Maria", "John"]), rng.choice(["Paris", "London", "Berlin", "Tokyo"])
    filler = " ".join(rng.choice(["the", "weather", "was", "fine", "and", "people", "walked"])
                      for _ in range(rng.randint(5, 50)))
    context = f"{filler} {person} lives in {city} . {filler}"
    start = context.index(f"{person} lives in {city}") + len(f"{person} lives in ")
    return {"id": str(i), "question": f"Where does {person} live?", "context": context,
            "answers": {"text": [city], "answer_start": [start]}}


def test_squad_scoring_as_the_official_script():
    # normalisation: case, punctuation, articles and spaces
    assert squad_metrics([["The Denver Broncos"]], ["denver broncos!"])["exact_match"] == 1.0
    # F1 over normalised tokens: "in paris france" vs "paris" -> P 1/3, R 1
    assert squad_f1("in Paris, France", "Paris") == pytest.approx(0.5)
    # the best over the gold answers
    m = squad_metrics([["Paris", "the city of Paris"], ["1990"]], ["city of Paris", "1991"])
    assert m["exact_match"] == pytest.approx(0.5) and m["f1"] == pytest.approx(0.5)
    assert squad_metrics([[]], [""])["exact_match"] == 1.0  # no answer, predicted as none


def test_qa_windows_hold_every_answer_and_map_back(minilm_tokenizer):
    rng = random.Random(3)
    task = make_task("qa", minilm_tokenizer, [], 96, doc_stride=24)
    examples = [QAExample(r["question"], r["context"], [(r["answers"]["answer_start"][0], r["answers"]["text"][0])])
                for r in (qa_record(i, rng) for i in range(40))]
    features = task.encode(examples, training=True)
    assert len(features) > len(examples)  # long contexts were cut into windows
    for i, e in enumerate(examples):
        mine = [f for f in features if f["example"] == i]
        assert all(len(f["input_ids"]) <= 96 for f in mine)
        holding = [f for f in mine if f["start_positions"] > 0]
        assert holding, "every answer lies whole in some window"
        for f in holding:
            a, b = f["offsets"][f["start_positions"]][0], f["offsets"][f["end_positions"]][1]
            assert e.context[a:b] == e.answers[0][1]
        # windows overlap: consecutive windows share context tokens
        spans = [[o for o in f["offsets"] if o is not None] for f in mine]
        for x, y in zip(spans, spans[1:]):
            assert y[0][0] < x[-1][1]


def test_qa_decoding_takes_the_best_valid_span_over_windows(minilm_tokenizer):
    task = make_task("qa", minilm_tokenizer, [], 64, doc_stride=16, max_answer_length=3)
    context = " ".join(f"w{i}" for i in range(80))
    ex = QAExample("which word?", context)
    features = task.encode([ex], training=False)
    assert len(features) >= 2
    logits = [np.full((len(f["input_ids"]), 2), -5.0) for f in features]
    # window 0: the highest start logit but its end comes before it (invalid), and a long span (invalid)
    ctx0 = [t for t, o in enumerate(features[0]["offsets"]) if o is not None]
    logits[0][ctx0[5], 0], logits[0][ctx0[4], 1] = 9.0, 9.0
    logits[0][ctx0[1], 0], logits[0][ctx0[9], 1] = 8.0, 8.0
    # window 1: a valid 2-token span, lower logits
    ctx1 = [t for t, o in enumerate(features[1]["offsets"]) if o is not None]
    logits[1][ctx1[2], 0], logits[1][ctx1[3], 1] = 6.0, 6.0
    (text, a, b, score), = task.decode(features, logits, 1)
    assert text is None and score == 12.0
    assert (a, b) == (features[1]["offsets"][ctx1[2]][0], features[1]["offsets"][ctx1[3]][1])
    # with no_answer, a [CLS] score above the best span in every window gives the empty answer
    none_task = make_task("qa", minilm_tokenizer, [], 64, doc_stride=16, max_answer_length=3, no_answer=True)
    for lg in logits:
        lg[0] = [7.0, 7.0]
    assert none_task.decode(features, logits, 1)[0][:3] == ("", -1, -1)
    assert task.decode(features, logits, 1)[0][1:3] == (a, b)  # without no_answer: the span


@pytest.fixture(scope="module")
def qa_run(tmp_path_factory, tiny_model_dir):
    rng = random.Random(0)
    d = tmp_path_factory.mktemp("qa-data")
    for split, n in {"train": 64, "dev": 16, "test": 16}.items():
        write_jsonl(d / f"{split}.jsonl", [qa_record(i, rng) for i in range(n)])
    out, report = run(tmp_path_factory, tiny_model_dir, "qa", {k: d / f"{k}.jsonl" for k in ("train", "dev", "test")}
                      | {"doc_stride": 16}, **{"model.max_length": 96, "train.epochs": 8})
    return out, report, d


def test_qa_learns_and_plain_transformers_gives_the_same_span(qa_run):
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    out, report, d = qa_run
    assert report["test"]["f1"] > 0.5 and report["test"]["questions"] == 16
    examples = read_file(d / "test.jsonl", "qa", labelled=False)
    ours = Predictor(out, device="cpu").predict(examples)
    tok = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForQuestionAnswering.from_pretrained(str(out)).eval()
    checked = 0
    for ex, (text, a, b, _) in zip(examples, ours):
        enc = tok(ex.question, ex.context, return_offsets_mapping=True, return_tensors="pt")
        if enc["input_ids"].shape[1] > 96:
            continue  # one window: plain argmax decoding is only comparable there
        offsets = enc.pop("offset_mapping")[0]
        with torch.no_grad():
            o = model(**enc)
        ctx = torch.tensor([s == 1 for s in enc.sequence_ids(0)])
        s = o.start_logits[0].masked_fill(~ctx, -1e9)
        e = o.end_logits[0].masked_fill(~ctx, -1e9)
        scores = s[:, None] + e[None, :]
        n = scores.shape[0]
        valid = torch.triu(torch.ones(n, n, dtype=torch.bool)) & ~torch.triu(torch.ones(n, n, dtype=torch.bool), 30)
        best = int(scores.masked_fill(~valid, -1e18).argmax())
        i, j = divmod(best, n)
        assert (int(offsets[i][0]), int(offsets[j][1])) == (a, b) and ex.context[a:b] == text
        checked += 1
    assert checked >= 3


def test_qa_bad_records_name_the_line(tmp_path):
    good = {"question": "q?", "context": "Anna lives in Paris.", "answers": [{"text": "Paris", "answer_start": 14}]}
    moved = dict(good, answers=[{"text": "Paris", "answer_start": 13}])
    far = dict(good, answers=[{"text": "Paris", "answer_start": 40}])
    for rec, message in ((moved, r"2: answer 1 \('Paris'\) is not in the context at answer_start 13"),
                         (far, r"2: answer 1 \('Paris'\): answer_start 40 is out of range"),
                         ({"question": "q?", "answers": []}, r"2: no field 'context'")):
        path = write_jsonl(tmp_path / "bad.jsonl", [good, rec])
        with pytest.raises(TunelabError, match=message):
            read_file(path, "qa")
    assert read_file(write_jsonl(tmp_path / "none.jsonl", [dict(good, answers=[])]), "qa")[0].answers == []


# --- relation extraction -------------------------------------------------------------------------------------


def test_markers_keep_the_mentions_and_their_offsets():
    text = "In 2009 Barack Obama moved to Washington with his family ."
    ex = RelationExample(text, (8, 20, "PER"), (30, 40, "LOC"), "lives_in")
    marked, where = mark(ex)
    assert marked == "In 2009 @ * PER * Barack Obama @ moved to # ^ LOC ^ Washington # with his family ."
    assert marked[slice(*where["head"])] == "Barack Obama" and marked[slice(*where["tail"])] == "Washington"
    # tail before head
    rev = RelationExample(text, (30, 40, "LOC"), (8, 20, "PER"))
    m2, w2 = mark(rev)
    assert m2[slice(*w2["head"])] == "Washington" and m2.index("# ^ PER ^") < m2.index("@ * LOC *")
    # cropping keeps both mentions, moved with the text
    c = crop(RelationExample("x " * 100 + text + " y" * 100, (208, 220, "PER"), (230, 240, "LOC")), 10)
    assert c.text[c.head[0]:c.head[1]] == "Barack Obama" and c.text[c.tail[0]:c.tail[1]] == "Washington"
    # inline marks round trip
    back = inline("In 2009 <e1:PER>Barack Obama</e1> moved to <e2:LOC>Washington</e2> with his family .", "x")
    assert (back.text, back.head, back.tail) == (text, (8, 20, "PER"), (30, 40, "LOC"))
    with pytest.raises(TunelabError, match="mark the two mentions"):
        inline("<e1>Obama</e1> moved", "x")


def test_relation_metrics_leave_out_no_relation():
    gold = ["born_in", "no_relation", "works_for", "no_relation"]
    pred = ["born_in", "born_in", "no_relation", "no_relation"]
    m = relation_metrics(gold, pred, ["born_in", "no_relation", "works_for"], "no_relation")
    # relations only: tp 1 (born_in), fp 1 (born_in for no_relation), fn 1 (works_for missed) -> P = R = 1/2
    assert m["micro_f1"] == pytest.approx(0.5) and m["accuracy"] == pytest.approx(0.5)
    assert set(m["per_class"]) == {"born_in", "works_for"}


def relation_records(seed: int, n: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p, c, o = rng.choice(["Anna Smith", "Peter Brown"]), rng.choice(["Paris", "Tokyo"]), rng.choice(["Siemens",
                                                                                                         "Google"])
        kind = rng.choice(["born_in", "works_for", "no_relation"])
        text = {"born_in": f"{p} was born in {c} .", "works_for": f"{p} joined {o} last year .",
                "no_relation": f"{p} visited {c} and met {o} ."}[kind]
        tail = c if kind == "born_in" else o
        s = text.index(tail)
        out.append({"text": text, "head": {"start": 0, "end": len(p), "type": "PER"},
                    "tail": {"start": s, "end": s + len(tail), "type": "LOC" if kind == "born_in" else "ORG"},
                    "label": kind})
    return out


def test_relation_end_to_end_matches_the_plain_pipeline(tmp_path_factory, tiny_model_dir, tmp_path):
    from transformers import pipeline

    d = tmp_path_factory.mktemp("re-data")
    for i, (split, n) in enumerate({"train": 48, "dev": 12, "test": 12}.items()):
        write_jsonl(d / f"{split}.jsonl", relation_records(500 + i, n))
    out, report = run(tmp_path_factory, tiny_model_dir, "relation", {k: d / f"{k}.jsonl" for k in
                                                                      ("train", "dev", "test")})
    assert report["test"]["no_relation"] == "no_relation" and "no_relation" not in report["test"]["per_class"]
    examples = read_file(d / "test.jsonl", "relation", labelled=False)
    ours = Predictor(out, device="cpu").predict(examples)
    clf = pipeline("text-classification", model=str(out), device="cpu")
    assert [x[0] for x in ours] == [r["label"] for r in clf([mark(e)[0] for e in examples])]
    bad = write_jsonl(tmp_path / "bad.jsonl", [dict(relation_records(1, 1)[0], tail={"start": 2, "end": 5})])
    with pytest.raises(TunelabError, match=r"bad.jsonl:1: the head \(0-\d+\) and tail \(2-5\) mentions overlap"):
        read_file(bad, "relation")
    far = write_jsonl(tmp_path / "far.jsonl", [dict(relation_records(1, 1)[0], tail={"start": 5, "end": 500})])
    with pytest.raises(TunelabError, match=r"far.jsonl:1: field 'tail': offsets 5-500 are out of range"):
        read_file(far, "relation")


# --- generation scored by its outputs ------------------------------------------------------------------------


def test_generation_metrics_are_sacrebleu_and_rouge():
    import sacrebleu
    from rouge_score import rouge_scorer

    refs, outs = ["the cat sat on the mat", "a dog ran home"], ["the cat sat on a mat", "a dog went home"]
    m = generation_metrics(refs, outs)
    assert m["bleu"] == pytest.approx(sacrebleu.corpus_bleu(outs, [refs]).score)
    assert m["chrf"] == pytest.approx(sacrebleu.corpus_chrf(outs, [refs]).score)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    assert m["rougeL"] == pytest.approx(50 * sum(scorer.score(r, o)["rougeL"].fmeasure for r, o in zip(refs, outs)))
    # Chinese: characters are the units (rouge-score's own tokenizer would see no words at all)
    zh = generation_metrics(["今天天气很好"], ["今天天气不错"])
    assert zh["rougeL"] == pytest.approx(100 * 2 * (4 / 6) * (4 / 6) / (4 / 6 + 4 / 6))
    assert zh["bleu"] == pytest.approx(sacrebleu.corpus_bleu(["今天天气不错"], [["今天天气很好"]], tokenize="zh").score)


def test_generation_selects_by_bleu_and_scores_test_outputs(tmp_path_factory, gen_dir, tiny_causal_dir):
    from conftest import gen_overrides

    out = tmp_path_factory.mktemp("gen-bleu") / "out"
    report = train(load_config(None, gen_overrides(gen_dir, tiny_causal_dir, out, **{
        "train.epochs": 2, "data.select_by": "bleu", "data.max_target_length": 8})))
    for e in report["evals"]:
        assert e["metrics"]["selected_by"] == "bleu" and e["metrics"]["main"] == e["metrics"]["bleu"] / 100
    assert {"bleu", "chrf", "rougeL", "loss"} <= set(report["test"])
    best = max(report["evals"], key=lambda e: e["metrics"]["bleu"])
    assert report["best_step"] == best["step"]


# --- the server ----------------------------------------------------------------------------------------------


def test_server_takes_text_pairs_and_questions(pair_run, qa_run):
    from fastapi.testclient import TestClient

    from tunelab.serve.api import Limits
    from tunelab.serve.app import create_app
    from tunelab.serve.model import ModelService

    with TestClient(create_app(ModelService(Predictor(pair_run[0], device="cpu")), Limits())) as c:
        ok = c.post("/v1/predict", json={"texts": ["the team won"], "text_pairs": ["shares fell"], "top_k": 1})
        assert ok.status_code == 200 and ok.json()["results"][0]["text_pair"] == "shares fell"
        missing = c.post("/v1/predict", json={"texts": ["the team won"]})
        assert missing.status_code == 422 and missing.json()["error"]["field"] == "text_pairs"
        uneven = c.post("/v1/predict", json={"texts": ["a"], "text_pairs": ["b", "c"]})
        assert uneven.status_code == 422 and "2 text_pairs for 1 texts" in uneven.json()["error"]["message"]
        empty = c.post("/v1/predict", json={"texts": ["a"], "text_pairs": [" "]})
        assert empty.status_code == 422 and empty.json()["error"]["field"] == "text_pairs[0]"
    with TestClient(create_app(ModelService(Predictor(qa_run[0], device="cpu")), Limits())) as c:
        context = "the weather was fine . Anna lives in Paris . people walked"
        r = c.post("/v1/predict", json={"texts": ["Where does Anna live?"], "text_pairs": [context]}).json()
        (res,) = r["results"]
        assert r["kind"] == "qa" and context[res["start"]:res["end"]] == res["answer"]


# --- real data: the BIG-bench sets ---------------------------------------------------------------------------


def test_bigbench_sets_are_faithful_and_split_by_group():
    from tunelab.data import load_builtin

    squad = load_builtin("squad")
    assert len(squad.train) + len(squad.dev) + len(squad.test) == 10_565
    contexts = [{q.context for q in split} for split in (squad.train, squad.dev, squad.test)]
    assert not (contexts[0] & contexts[2]) and not (contexts[0] & contexts[1])
    for q in squad.test[:500]:
        assert all(q.context[a:a + len(t)] == t for a, t in q.answers)
    vc = load_builtin("vitaminc")
    assert len(vc.train) + len(vc.dev) + len(vc.test) == 54_668
    assert {e.label for e in vc.test} == {"SUPPORTS", "REFUTES", "NOT ENOUGH INFO"}
    assert all(e.text_pair for e in vc.dev)
    pages = [{e.text.split(": ", 1)[0] for e in s} for s in (vc.train, vc.test)]
    assert not pages[0] & pages[1]
    assert len(load_builtin("squad_shifts_nyt").test) == 10_056
    shop = load_builtin("ecommerce_dialogue")  # Chinese pairs, the test split in blocks of 10 candidates
    assert (len(shop.train), len(shop.dev), len(shop.test)) == (9000, 1000, 10_000)
    assert not {e.text for e in shop.train} & {e.text for e in shop.dev}
    assert " " not in shop.test[0].text_pair.strip() or not any("\u4e00" <= c <= "\u9fff" for c in shop.test[0].text_pair)
    with pytest.raises(TunelabError, match="set data.text_pair_field=text_pair"):
        from tunelab.config import DataConfig
        from tunelab.data import load_splits

        load_splits(DataConfig(dataset="vitaminc"), "classify")


# --- with the rest of tunelab: multi-task heads, LoRA --------------------------------------------------------


def test_new_task_types_share_one_backbone_in_a_multitask_run(tmp_path, tiny_model_dir, pair_dir, qa_run):
    """QA, text pairs, regression, multi-label and relations as heads of one backbone: trained together,
    saved, and each head predicts from the saved folder as it scored in the run."""
    from tunelab.multitask import train as mt_train

    _, _, qa_dir = qa_run
    re_dir = tmp_path / "re"
    re_dir.mkdir()
    for i, split in enumerate(("train", "dev", "test")):
        write_jsonl(re_dir / f"{split}.jsonl", relation_records(600 + i, 24 if split == "train" else 8))
    values = {"task": "multitask", "model.name": tiny_model_dir, "output_dir": tmp_path / "out",
              "train.threads": 2, "train.epochs": 2, "train.batch_size": 8, "train.lr": 3e-3, "train.device": "cpu",
              "model.max_length": 96, "train.bf16": False}  # (the Predictor below scores in float32)
    for name, kind, d, extra in (("qa", "qa", qa_dir, {"doc_stride": 16}),
                                 ("nli", "classify", pair_dir, {"text_pair_field": "text_pair"}),
                                 ("sim", "regress", pair_dir, {"text_pair_field": "text_pair", "label_field": "score"}),
                                 ("tags", "multilabel", pair_dir, {"text_pair_field": "text_pair",
                                                                   "label_field": "labels"}),
                                 ("rel", "relation", re_dir, {})):
        values[f"tasks.{name}.task"] = kind
        for split in ("train", "dev", "test"):
            values[f"tasks.{name}.data.{split}"] = d / f"{split}.jsonl"
        values |= {f"tasks.{name}.data.{k}": v for k, v in extra.items()}
    report = mt_train(load_config(None, [f"{k}={v}" for k, v in values.items()]))
    pred = Predictor(tmp_path / "out", device="cpu")
    checks = {"qa": ("qa", qa_dir, {}), "nli": ("classify", pair_dir, {"text_pair_field": "text_pair"}),
              "sim": ("regress", pair_dir, {"text_pair_field": "text_pair", "label_field": "score"}),
              "tags": ("multilabel", pair_dir, {"text_pair_field": "text_pair", "label_field": "labels"}),
              "rel": ("relation", re_dir, {})}
    for name, (kind, d, fields) in checks.items():
        test = read_file(d / "test.jsonl", kind, **fields)
        assert pred.evaluate(test, task=name)["main"] == pytest.approx(report["tasks"][name]["test"]["main"]), name
    # the multi-label head's threshold came from its selected dev evaluation, and the folder keeps it
    assert pred.task_for(task="tags").threshold == report["tasks"]["tags"]["test"]["threshold"]


def test_lora_on_qa_and_pairs_saves_an_adapter_plain_peft_loads(tmp_path_factory, tiny_model_dir, pair_dir, qa_run):
    import peft
    from transformers import AutoModelForQuestionAnswering

    _, _, qa_dir = qa_run
    out, report = run(tmp_path_factory, tiny_model_dir, "qa", {k: qa_dir / f"{k}.jsonl" for k in
                                                                ("train", "dev", "test")} | {"doc_stride": 16},
                      **{"model.max_length": 96, "tune.method": "lora", "tune.target_modules": "[query,value]"})
    assert (out / "adapter_model.safetensors").is_file()
    meta = json.loads((out / "tunelab.json").read_text())
    base = AutoModelForQuestionAnswering.from_pretrained(meta["base_model"])
    model = peft.PeftModel.from_pretrained(base, str(out)).eval()
    examples = read_file(qa_dir / "test.jsonl", "qa")
    tok = Predictor(out, device="cpu").task.tokenizer
    enc = tok(examples[0].question, examples[0].context, truncation="only_second", max_length=96,
              return_tensors="pt")
    with torch.no_grad():
        plain = model(**enc)
    ours = Predictor(out, device="cpu")
    feats = ours.task.encode(examples[:1], training=False)
    from tunelab.inference import feature_logits

    (lg, *_) = feature_logits(ours.model, feats, ours.task.pad, "cpu")
    assert lg[:, 0] == pytest.approx(plain.start_logits[0].numpy(), abs=1e-4)
    assert report["test"]["questions"] == 16


def test_augmentation_refuses_examples_with_offsets():
    import random as _random

    from tunelab.robust.augment import augment, char_noise

    ops = [(char_noise, 1.0, 0.5)]
    assert augment(ScoredText("a text to change", 1.0), ops, _random.Random(0)).score == 1.0
    for ex in (QAExample("q?", "a context", [(2, "context")]), RelationExample("a b", (0, 1, "X"), (2, 3, "Y"))):
        with pytest.raises(TunelabError, match="character offsets"):
            augment(ex, ops, _random.Random(0))
