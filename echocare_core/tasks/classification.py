"""Classification (binary, multi-class, multi-label) on the pooled feature: cross-entropy or per-class BCE; AUC,
accuracy, F1 and, for binary tasks, sensitivity and specificity at the Youden threshold (the paper's thyroid task)."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.metrics import compute_roc_auc
from torch import nn

from echocare_core.data.spec import DatasetSpec
from echocare_core.models.heads import ClassificationHead
from echocare_core.tasks.base import Declared, Loss, Task, TaskHead

__all__ = ["Classification", "classification_metrics", "multilabel_metrics", "youden"]


class Classification(Task):
    name = "classification"
    main_metric = "auc"

    def outputs(self, classes: int, labels: int, landmarks: int, tokenizer: Any = None) -> int:
        return classes

    def head(self, cfg: Any, outputs: int, feature_size: int, report: Any, decoder: str = "unetr") -> nn.Module:
        return ClassificationHead(cfg.stage_channels[-1], outputs)

    def forward(self, model: Any, images: torch.Tensor, ids: Any = None) -> torch.Tensor:
        return model.head(model.encoder(images))

    def decode(self, model: Any, out: torch.Tensor) -> torch.Tensor:
        """Class probabilities `[B, K]`."""
        return out.sigmoid() if model.multi_label else out.softmax(-1)

    def target(self, ds: Any, value: str, height: int, width: int) -> torch.Tensor:
        if ds.spec.multi_label:  # "a;b" -> multi-hot [K]
            names = {n.strip() for n in value.split(";")}
            return torch.tensor([float(c in names) for c in ds.spec.classes])
        return torch.tensor(ds.spec.classes.index(value))

    def loss(self, spec: DatasetSpec, stats: Any = None, tokenizer: Any = None, head: Any = None) -> Loss:
        return F.binary_cross_entropy_with_logits if spec.multi_label else F.cross_entropy

    def metrics(self, pred: Any, true: Any, k: int, threshold: float | None = None, findings: Any = ()) -> dict:
        return multilabel_metrics(pred, true) if true.ndim == 2 else classification_metrics(pred, true, threshold)

    def describe(self, declared: Declared) -> str:
        return str(list(declared.classes))

    def mismatch(self, declared: Declared, spec: DatasetSpec, who: str = "job") -> str:
        if (tuple(declared.classes), declared.multi_label) != (tuple(spec.classes), spec.multi_label):
            return (
                f"{who} classes {list(declared.classes)} (multi-label {declared.multi_label}) but the dataset "
                f"declares {list(spec.classes)} (multi-label {spec.multi_label})"
            )
        return ""

    def columns(self, head: TaskHead) -> list[str]:
        return ["file", "prediction", *[f"p_{c}" for c in head.classes]]

    def predict_image(self, model: Any, head: TaskHead, inputs: Any, img: Any, stem: str, out: Any, _: float) -> list:
        probs = self.decode(model, model(inputs.tensor(img)).float())[0].tolist()
        chosen = (
            ";".join(c for c, p in zip(head.classes, probs) if p >= 0.5)
            if head.multi_label
            else head.classes[int(np.argmax(probs))]
        )
        return [chosen, *[f"{p:.6f}" for p in probs]]


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
