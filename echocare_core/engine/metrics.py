"""Task metrics, from MONAI where MONAI has them.

Classification: AUC, accuracy, F1 (binary) or macro-F1, and for binary tasks sensitivity and
specificity at the Youden-optimal threshold (the paper's thyroid task). Segmentation: Dice,
normalised surface Dice and HD95 per foreground class. Landmarks: mean radial error and successful
detection rates. Detection: AP per class and mAP at IoU 0.5 (MONAI's COCO metric). Regression: MAE.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from monai.apps.detection.metrics.coco import COCOMetric
from monai.apps.detection.metrics.matching import matching_batch
from monai.data.box_utils import box_iou
from monai.metrics import (
    PSNRMetric,
    SSIMMetric,
    compute_dice,
    compute_hausdorff_distance,
    compute_roc_auc,
    compute_surface_dice,
)

from echocare_core.models.detection import Detections

__all__ = [
    "LOWER_IS_BETTER",
    "MAIN_METRIC",
    "SDR_RADII",
    "classification_metrics",
    "detection_ap",
    "detection_metrics",
    "landmark_metrics",
    "match_detections",
    "multilabel_metrics",
    "regression_metrics",
    "segmentation_metrics",
    "youden",
    "enhancement_metrics",
]

# what "best checkpoint" means
MAIN_METRIC = {
    "classification": "auc",
    "segmentation": "dice",
    "landmarks": "mre",
    "detection": "map50",
    "regression": "mae",
    "enhancement": "ssim",
    "report": "bleu4",
}
LOWER_IS_BETTER = frozenset({"mre", "mae", "rmse", "hd95"})
SDR_RADII = (2, 4, 10)  # pixels: the successful detection rates the paper reports


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


def segmentation_metrics(
    pred: torch.Tensor, true: torch.Tensor, num_classes: int, nsd_tolerance: float = 2.0
) -> dict[str, float]:
    """Dice, normalised surface Dice (tolerance in pixels) and HD95 per foreground class, and their means.

    Args:
        pred, true: `[N, H, W]` label maps.
    """
    p = F.one_hot(pred.long(), num_classes).permute(0, 3, 1, 2).float()
    t = F.one_hot(true.long(), num_classes).permute(0, 3, 1, 2).float()
    with warnings.catch_warnings():  # MONAI warns on empty masks; both empty gives NaN and is left out
        warnings.simplefilter("ignore")
        dice = compute_dice(p, t, include_background=False)
        nsd = compute_surface_dice(p, t, class_thresholds=[nsd_tolerance] * (num_classes - 1))
        hd95 = compute_hausdorff_distance(p, t, percentile=95)
    # a structure missed entirely (or predicted where there is none) is as far off as the image allows
    one_empty = (p[:, 1:].sum((2, 3)) == 0) != (t[:, 1:].sum((2, 3)) == 0)
    hd95 = torch.where(one_empty, torch.tensor(float(np.hypot(*pred.shape[1:]))), hd95.float())
    out: dict[str, float] = {}
    for name, values in (("dice", dice), ("nsd", nsd), ("hd95", hd95)):
        per_class = values.float().masked_fill(~torch.isfinite(values.float()), float("nan")).nanmean(0)
        out[name] = float(per_class.nanmean())
        for c in range(num_classes - 1):
            out[f"{name}_class{c + 1}"] = float(per_class[c])
    return out


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def landmark_metrics(pred: torch.Tensor, true: torch.Tensor) -> dict[str, float]:
    """Mean radial error (pixels), its standard deviation, successful detection rate within each of
    SDR_RADII pixels, and the mean radial error of each point.

    Args:
        pred, true: `[N, K, 2]` (x, y) pixel coordinates.
    """
    radial = (pred.double() - true.double()).norm(dim=-1)  # [N, K]
    out = {"mre": float(radial.mean()), "mre_std": float(radial.std()) if radial.numel() > 1 else 0.0}
    out |= {f"sdr_{r}px": float((radial <= r).double().mean()) for r in SDR_RADII}
    out |= {f"mre_point{k + 1}": float(v) for k, v in enumerate(radial.mean(0))}
    return out


def match_detections(pred: list[Detections], true: list[torch.Tensor], iou: float = 0.5) -> list[dict]:
    """MONAI's per-image matching of detections to true boxes (the costly part of AP; resample its result).

    Args:
        pred: detections of each image.
        true: boxes of each image, `[G, 5]` (x1, y1, x2, y2, class index).
    """
    return matching_batch(
        box_iou,
        [iou],
        [d.boxes.numpy() for d in pred],
        [d.classes.numpy() for d in pred],
        [d.scores.numpy() for d in pred],
        [t[:, :4].numpy() for t in true],
        [t[:, 4].long().numpy() for t in true],
        max_detections=100,
    )


def detection_metrics(
    pred: list[Detections], true: list[torch.Tensor], num_classes: int, iou: float = 0.5
) -> dict[str, float]:
    """AP per class (101-point interpolated, COCO) and their mean at one IoU threshold.

    Args:
        pred: detections of each image.
        true: boxes of each image, `[G, 5]` (x1, y1, x2, y2, class index).
        num_classes: classes; one without a true box in these images has AP NaN and stays out of the mean.
    """
    return detection_ap(match_detections(pred, true, iou), num_classes, iou)


def detection_ap(matched: list[dict], num_classes: int, iou: float = 0.5) -> dict[str, float]:
    """`detection_metrics` from the per-image matching results of `match_detections`."""
    names = [f"class{c}" for c in range(num_classes)]
    metric = COCOMetric(classes=names, iou_list=[iou], iou_range=(iou, iou, 0.05), max_detection=[100], verbose=False)
    with _quiet_root_logger():  # MONAI warns on the root logger for every class without a true box
        values = metric(matched)[0]
    per_class = [values.get(f"{n}_AP_IoU_{iou:.2f}_MaxDet_100", -1.0) for n in names]
    per_class = [v if v >= 0 else float("nan") for v in per_class]  # COCO marks "no true box" with -1
    tag = f"{round(iou * 100)}"
    out = {f"map{tag}": float(np.nanmean(per_class)) if not all(np.isnan(per_class)) else float("nan")}
    out |= {f"ap{tag}_{n}": float(v) for n, v in zip(names, per_class)}
    return out


def regression_metrics(pred: torch.Tensor, true: torch.Tensor) -> dict[str, float]:
    """MAE, RMSE, mean error (bias) and Pearson's r of predicted against true values `[N]`."""
    p, t = pred.double(), true.double()
    err = p - t
    r = float(torch.corrcoef(torch.stack([p, t]))[0, 1]) if len(p) > 1 else float("nan")
    return {
        "mae": float(err.abs().mean()),
        "rmse": float(err.pow(2).mean().sqrt()),
        "bias": float(err.mean()),
        "pearson_r": r,
    }


def enhancement_metrics(pred: torch.Tensor, true: torch.Tensor) -> dict[str, float]:
    """PSNR (dB) and SSIM (11 x 11 Gaussian window) of enhanced images against their paired targets, both
    `[N, C, H, W]` in [0, 1], averaged over images (MONAI's PSNRMetric and SSIMMetric). Identical images
    give PSNR infinity and SSIM 1."""
    pred, true = pred.float().clamp(0, 1), true.float()
    psnr = PSNRMetric(max_val=1.0, reduction="none")(pred, true).flatten()
    ssim = SSIMMetric(spatial_dims=2, data_range=1.0, reduction="none")(pred, true).flatten()
    mae = (pred - true).abs().flatten(1).mean(1)
    return {"ssim": float(ssim.mean()), "psnr": float(psnr.mean()), "l1": float(mae.mean())}
