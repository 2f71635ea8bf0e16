"""Classification (binary, multi-class, multi-label) on the pooled feature: cross-entropy or per-class BCE; AUC,
accuracy, F1 and, for binary tasks, sensitivity and specificity at the Youden threshold (the paper's thyroid task)."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.metrics import compute_roc_auc

from echocare_core.data.contract import DatasetSpec
from echocare_core.tasks.base import Loss, Task

__all__ = ["Classification", "classification_metrics", "multilabel_metrics", "youden"]


class Classification(Task):
    name = "classification"
    main_metric = "auc"

    def outputs(self, classes: int, labels: int, landmarks: int, tokenizer: Any = None) -> int:
        return classes

    def loss(self, spec: DatasetSpec, stats: Any = None, tokenizer: Any = None, head: Any = None) -> Loss:
        return F.binary_cross_entropy_with_logits if spec.multi_label else F.cross_entropy

    def metrics(self, pred: Any, true: Any, k: int, threshold: float | None = None, findings: Any = ()) -> dict:
        return multilabel_metrics(pred, true) if true.ndim == 2 else classification_metrics(pred, true, threshold)

    def mismatch(self, wanted: Any, spec: DatasetSpec) -> str:
        if (tuple(wanted.classes), wanted.multi_label) != (tuple(spec.classes), spec.multi_label):
            return (
                f"job classes {list(wanted.classes)} (multi-label {wanted.multi_label}) but the site declares "
                f"{list(spec.classes)} (multi-label {spec.multi_label})"
            )
        return ""


def youden(scores: np.ndarray, positive: np.ndarray) -> tuple[float, float, float]:
    """Threshold maximising sensitivity + specificity - 1, with that sensitivity and specificity."""
    best = (0.5, 0.0, 1.0, -1.0)
    n_pos, n_neg = max(int(positive.sum()), 1), max(int((~positive).sum()), 1)
    for t in np.unique(scores):
        predicted = scores >= t
        sens = (predicted & positive).sum() / n_pos
        spec = (~predicted & ~positive).sum() / n_neg
        if sens + spec - 1 > best[3]:
            best = (float(t), float(sens), float(spec), sens + spec - 1)
    return best[:3]


def _f1(pred: np.ndarray, true: np.ndarray, cls: int) -> float:
    tp = np.sum((pred == cls) & (true == cls))
    fp, fn = np.sum((pred == cls) & (true != cls)), np.sum((pred != cls) & (true == cls))
    return float(2 * tp / (2 * tp + fp + fn)) if tp + fp + fn else 1.0


def _auc(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Binary AUC, or the macro one-vs-rest AUC over the classes present (NaN with fewer than two)."""
    k = probs.shape[1]
    present = [c for c in range(k) if 0 < int((labels == c).sum()) < len(labels)]
    if not present:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if k == 2:
            return float(compute_roc_auc(probs[:, 1], labels))
        return float(compute_roc_auc(probs[:, present], F.one_hot(labels, k)[:, present], average="macro"))


def classification_metrics(
    probs: torch.Tensor, labels: torch.Tensor, threshold: float | None = None
) -> dict[str, float]:
    """Metrics of single-label predictions.

    Args:
        probs: `[N, K]` class probabilities (softmax).
        labels: `[N]` true class indices.
        threshold: binary tasks: the operating point for sensitivity and specificity, e.g. the
            Youden threshold chosen on validation; None picks the Youden threshold of these data.
    """
    k = probs.shape[1]
    pred, true = probs.argmax(1).numpy(), labels.numpy()
    out = {"accuracy": float((pred == true).mean()), "auc": _auc(probs, labels)}
    if k > 2:  # one-vs-rest AUC per class
        out.update(
            {
                f"auc_class{c}": _auc(torch.stack([1 - probs[:, c], probs[:, c]], 1), (labels == c).long())
                for c in range(k)
            }
        )
    if k == 2:
        out["f1"] = _f1(pred, true, 1)
        scores, positive = probs[:, 1].numpy(), true == 1
        t = youden(scores, positive)[0] if threshold is None else threshold
        out["youden_threshold"] = t
        out["sensitivity"] = float((scores[positive] >= t).mean()) if positive.any() else float("nan")
        out["specificity"] = float((scores[~positive] < t).mean()) if (~positive).any() else float("nan")
    else:
        out["macro_f1"] = float(np.mean([_f1(pred, true, c) for c in range(k)]))
    return out


def multilabel_metrics(probs: torch.Tensor, targets: torch.Tensor, threshold: float = 0.5) -> dict[str, float]:
    """Multi-label: macro AUC over classes, exact-match accuracy and macro-F1 at `threshold`.

    Args:
        probs: `[N, K]` independent class probabilities (sigmoid).
        targets: `[N, K]` multi-hot truth.
    """
    pred, true = (probs >= threshold).numpy(), targets.numpy() > 0.5
    present = [c for c in range(true.shape[1]) if 0 < true[:, c].sum() < len(true)]  # AUC needs both values
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        auc = (
            float(compute_roc_auc(probs[:, present], targets[:, present], average="macro")) if present else float("nan")
        )
    f1 = [_f1(pred[:, c].astype(int), true[:, c].astype(int), 1) for c in range(true.shape[1])]
    return {"auc": auc, "exact_match": float((pred == true).all(1).mean()), "macro_f1": float(np.mean(f1))}
