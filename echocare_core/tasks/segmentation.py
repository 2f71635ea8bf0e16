"""Segmentation with the dense decoder: Dice + cross-entropy per image; Dice, normalised surface Dice and HD95 per
foreground class (MONAI's metrics)."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice

from echocare_core.data.contract import DatasetSpec
from echocare_core.tasks.base import Loss, Task

__all__ = ["Segmentation", "segmentation_metrics"]


class Segmentation(Task):
    name = "segmentation"
    main_metric = "dice"

    def outputs(self, classes: int, labels: int, landmarks: int, tokenizer: Any = None) -> int:
        return labels

    def loss(self, spec: DatasetSpec, stats: Any = None, tokenizer: Any = None, head: Any = None) -> Loss:
        dice_ce = DiceCELoss(to_onehot_y=True, softmax=True, batch=False)
        return lambda logits, target: dice_ce(logits, target[:, None])

    def metrics(self, pred: Any, true: Any, k: int, threshold: float | None = None, findings: Any = ()) -> dict:
        return segmentation_metrics(pred, true, k)

    def mismatch(self, wanted: Any, spec: DatasetSpec) -> str:
        if tuple(sorted(wanted.labels)) != tuple(sorted(spec.labels)):
            return f"job mask values {sorted(wanted.labels)} but the site declares {sorted(spec.labels)}"
        return ""


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
