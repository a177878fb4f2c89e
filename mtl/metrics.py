"""Evaluation metrics, computed by the libraries that define them.

scikit-learn for accuracy/F1/precision/recall, seqeval for entity-level scores (strict IOB2:
an entity starts at its B- tag), scipy for correlations. Each function returns a flat
{name: float} dict so that a trainer can log it as one JSONL line; per-class and per-type
scores use "metric/label" keys.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str]) -> dict[str, float]:
    """accuracy, macro_f1, weighted_f1, mcc (Matthews correlation: GLUE's CoLA metric, for any
    number of classes), and precision/recall/f1 per class."""
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef, precision_recall_fscore_support

    ids = list(range(len(labels)))
    out = {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=ids, average="macro", zero_division=0)),
        "weighted_f1": float(f1_score(y_true, y_pred, labels=ids, average="weighted", zero_division=0)),
    }
    # 0.0 where either side holds one class; sklearn also warns where both hold the same one.
    out["mcc"] = float(matthews_corrcoef(y_true, y_pred)) if len({*y_true, *y_pred}) > 1 else 0.0
    precision, recall, f1, _ = precision_recall_fscore_support(y_true, y_pred, labels=ids, zero_division=0)
    for i, label in enumerate(labels):
        out[f"precision/{label}"] = float(precision[i])
        out[f"recall/{label}"] = float(recall[i])
        out[f"f1/{label}"] = float(f1[i])
    return out


def entity_spans(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """(type, start, end) of each entity in one sentence's IOB2 tags, `end` exclusive: the
    entities `entity_metrics` counts (strict: an I-X with no B-X before it starts none)."""
    from seqeval.scheme import IOB2, Entities

    return [(e.tag, e.start, e.end) for e in Entities([list(tags)], IOB2).entities[0]]


def entity_metrics(true_tags: Sequence[Sequence[str]], pred_tags: Sequence[Sequence[str]]) -> dict[str, float]:
    """Entity-level precision/recall/F1 (seqeval, strict IOB2), overall and per entity type.

    Strict mode counts an entity only when its type and exact span match; a predicted I-X with no
    B-X before it is not an entity (conlleval would repair it; strict IOB2 does not).
    """
    from seqeval.metrics import classification_report
    from seqeval.scheme import IOB2

    report = classification_report(
        [list(t) for t in true_tags], [list(p) for p in pred_tags],
        mode="strict", scheme=IOB2, output_dict=True, zero_division=0,
    )
    micro = report.get("micro avg", {"precision": 0.0, "recall": 0.0, "f1-score": 0.0})
    out = {
        "entity_precision": float(micro["precision"]),
        "entity_recall": float(micro["recall"]),
        "entity_f1": float(micro["f1-score"]),
    }
    total = sum(len(t) for t in true_tags)
    correct = sum(a == b for t, p in zip(true_tags, pred_tags, strict=True) for a, b in zip(t, p, strict=True))
    out["token_accuracy"] = correct / total if total else 0.0
    for name, scores in report.items():
        if name.endswith(" avg"):
            continue
        out[f"entity_f1/{name}"] = float(scores["f1-score"])
    return out


def regression_metrics(y_true: Sequence[float], y_pred: Sequence[float]) -> dict[str, float]:
    """pearson, spearman, mse. Correlations are 0.0 when either side is constant."""
    from scipy.stats import pearsonr, spearmanr

    y_true, y_pred = np.asarray(y_true, np.float64), np.asarray(y_pred, np.float64)
    constant = np.ptp(y_true) == 0 or np.ptp(y_pred) == 0
    return {
        "pearson": 0.0 if constant else float(pearsonr(y_true, y_pred).statistic),
        "spearman": 0.0 if constant else float(spearmanr(y_true, y_pred).statistic),
        "mse": float(np.mean((y_true - y_pred) ** 2)),
    }


def multilabel_metrics(y_true: np.ndarray, y_pred: np.ndarray, labels: Sequence[str]) -> dict[str, float]:
    """micro_f1, macro_f1 and f1 per label over [examples, labels] 0/1 matrices."""
    from sklearn.metrics import f1_score

    out = {
        "micro_f1": float(f1_score(y_true, y_pred, average="micro", zero_division=0)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
    }
    per_label = f1_score(y_true, y_pred, average=None, zero_division=0)
    for label, f1 in zip(labels, per_label, strict=True):
        out[f"f1/{label}"] = float(f1)
    return out
