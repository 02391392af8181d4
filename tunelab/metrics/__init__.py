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
