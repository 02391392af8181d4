"""Metrics. Entity scores come from seqeval in strict IOB2 mode (an entity counts only when its type and
both boundaries match); classification scores from scikit-learn. `main` is what model selection maximises."""

import warnings


def entity_metrics(gold: list[list[str]], pred: list[list[str]]) -> dict:
    from seqeval.metrics import classification_report
    from seqeval.scheme import IOB2

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # seqeval warns on types with no gold entities; reported as zeros
        rep = classification_report(gold, pred, mode="strict", scheme=IOB2, output_dict=True, zero_division=0)
    per_type = {k: _prf(v) for k, v in rep.items() if not k.endswith(" avg")}
    correct = sum(g == p for gs, ps in zip(gold, pred) for g, p in zip(gs, ps))
    total = sum(len(g) for g in gold)
    return {
        "main": rep["micro avg"]["f1-score"],
        "micro": _prf(rep["micro avg"]),
        "macro": _prf(rep["macro avg"]),
        "per_type": per_type,
        "token_accuracy": correct / total if total else 0.0,
    }


def _prf(v: dict) -> dict:
    return {"precision": v["precision"], "recall": v["recall"], "f1": v["f1-score"], "support": int(v["support"])}


def classification_metrics(gold: list[str], pred: list[str], labels: list[str]) -> dict:
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    p, r, f, s = precision_recall_fscore_support(gold, pred, labels=labels, zero_division=0)
    return {
        "main": f1_score(gold, pred, labels=labels, average="macro", zero_division=0),
        "accuracy": accuracy_score(gold, pred),
        "macro_f1": f1_score(gold, pred, labels=labels, average="macro", zero_division=0),
        "per_class": {lab: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
                      for i, lab in enumerate(labels)},
        "confusion": {"labels": labels, "matrix": confusion_matrix(gold, pred, labels=labels).tolist()},
    }


def regression_metrics(gold: list[float], pred: list[float]) -> dict:
    """Pearson (main) and Spearman correlation, mean squared and absolute error. A constant prediction has no
    correlation: 0, not NaN (an untrained head can predict one value for everything)."""
    import numpy as np
    from scipy.stats import pearsonr, spearmanr

    g, p = np.asarray(gold, dtype=np.float64), np.asarray(pred, dtype=np.float64)
    varies = len(g) > 1 and g.std() > 0 and p.std() > 0
    pearson = float(pearsonr(g, p)[0]) if varies else 0.0
    spearman = float(spearmanr(g, p)[0]) if varies else 0.0
    return {"main": pearson, "pearson": pearson, "spearman": spearman, "mse": float(((g - p) ** 2).mean()),
            "mae": float(np.abs(g - p).mean()), "n": len(g)}


THRESHOLDS = [round(0.05 * k, 2) for k in range(1, 20)]  # the multi-label decision thresholds tried on dev


def multilabel_metrics(gold: list[list[str]], probs, labels: list[str], threshold: float) -> dict:
    """Micro-F1 (main), macro-F1, subset accuracy and a per-label report of the decisions probability >=
    `threshold`; and the threshold of THRESHOLDS with the best micro-F1 on these examples (`best_threshold`),
    which a dev evaluation hands to the saved model (never taken from the test split)."""
    import numpy as np
    from sklearn.metrics import f1_score, precision_recall_fscore_support

    index = {label: i for i, label in enumerate(labels)}
    y = np.zeros((len(gold), len(labels)), dtype=int)
    for r, gs in enumerate(gold):
        for g in gs:
            y[r, index[g]] = 1
    probs = np.asarray(probs, dtype=np.float64).reshape(len(gold), len(labels))

    def micro(t):
        return f1_score(y, (probs >= t).astype(int), average="micro", zero_division=0)

    scores = {t: micro(t) for t in THRESHOLDS}
    best = max(THRESHOLDS, key=lambda t: (scores[t], -abs(t - 0.5)))  # ties: the one nearest 0.5
    pred = (probs >= threshold).astype(int)
    p, r, f, s = precision_recall_fscore_support(y, pred, zero_division=0)
    at_threshold = float(micro(threshold))
    return {
        "main": at_threshold,
        "micro_f1": at_threshold,
        "macro_f1": float(f1_score(y, pred, average="macro", zero_division=0)),
        "subset_accuracy": float((pred == y).all(axis=1).mean()),
        "threshold": threshold, "best_threshold": best, "best_threshold_micro_f1": float(scores[best]),
        "per_label": {lab: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
                      for i, lab in enumerate(labels)},
    }


def relation_metrics(gold: list[str], pred: list[str], labels: list[str], none: str | None) -> dict:
    """Micro-F1 over the relations but `none` (the no-relation class: predicting it is abstaining, as in
    TACRED and SemEval scoring), macro-F1 over them, accuracy, and per-relation scores."""
    from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

    scored = [label for label in labels if label != none]
    p, r, f, s = precision_recall_fscore_support(gold, pred, labels=scored, zero_division=0)
    micro = f1_score(gold, pred, labels=scored, average="micro", zero_division=0)
    return {
        "main": float(micro), "micro_f1": float(micro),
        "macro_f1": float(f1_score(gold, pred, labels=scored, average="macro", zero_division=0)),
        "accuracy": float(accuracy_score(gold, pred)), "no_relation": none,
        "per_class": {lab: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
                      for i, lab in enumerate(scored)},
    }


# --- extractive QA: the official SQuAD v1.1 evaluation (normalisation, exact match, token F1, max over golds)

def squad_normalize(s: str) -> str:
    """Lower case, punctuation, articles (a, an, the) and extra white space removed: the official script's
    normalize_answer."""
    import re
    import string

    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def squad_f1(prediction: str, gold: str) -> float:
    from collections import Counter

    p, g = squad_normalize(prediction).split(), squad_normalize(gold).split()
    if not p or not g:  # SQuAD v2: an empty answer is right only against an empty gold
        return float(p == g)
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def squad_metrics(golds: list[list[str]], predictions: list[str]) -> dict:
    """Exact match and F1 (0-1; main: F1), each the best over an example's gold answers. A question without an
    answer (SQuAD v2) has golds [""]: only the empty prediction scores there."""
    em = f1 = 0.0
    for gs, p in zip(golds, predictions):
        gs = gs or [""]
        em += max(float(squad_normalize(p) == squad_normalize(g)) for g in gs)
        f1 += max(squad_f1(p, g) for g in gs)
    n = max(1, len(predictions))
    has = [i for i, gs in enumerate(golds) if any(gs)]
    return {"main": f1 / n, "f1": f1 / n, "exact_match": em / n, "questions": len(predictions),
            "answerable": len(has)}


CJK = r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af]"


class _CjkWords:
    """rouge-score's tokenizer keeps only [a-z0-9] runs, which leaves nothing of Chinese text: here each CJK
    character is a token (as sacreBLEU's zh tokenizer makes it), other runs of letters and digits words."""

    def tokenize(self, text: str) -> list[str]:
        import re

        return re.findall(CJK + r"|[^\W_]+", text.lower())


def generation_metrics(references: list[str], outputs: list[str]) -> dict:
    """Corpus sacreBLEU and chrF (sacrebleu's default settings; its zh tokenizer when the references hold CJK
    text) and mean ROUGE-L F-measure (rouge-score, with stemming; CJK characters as tokens), 0-100."""
    import re

    import sacrebleu
    from rouge_score import rouge_scorer

    cjk = any(re.search(CJK, r) for r in references)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=not cjk, tokenizer=_CjkWords() if cjk else None)
    rouge = sum(scorer.score(r, o)["rougeL"].fmeasure for r, o in zip(references, outputs))
    return {"bleu": sacrebleu.corpus_bleu(outputs, [references], tokenize="zh" if cjk else "13a").score,
            "chrf": sacrebleu.corpus_chrf(outputs, [references]).score,
            "rougeL": 100 * rouge / max(1, len(outputs))}
