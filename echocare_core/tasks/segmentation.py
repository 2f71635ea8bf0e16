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
from PIL import Image

from echocare_core.data.spec import DatasetSpec
from echocare_core.tasks.base import Declared, Loss, Task, TaskHead
from echocare_core.tasks.drawing import gray_of, overlay

__all__ = ["Segmentation", "segmentation_metrics"]


class Segmentation(Task):
    name = "segmentation"
    main_metric = "dice"

    def outputs(self, classes: int, labels: int, landmarks: int, tokenizer: Any = None) -> int:
        return labels

    def decode(self, model: Any, out: torch.Tensor) -> torch.Tensor:
        """Label maps `[B, H, W]` of class indices."""
        return out.argmax(1)

    def target(self, ds: Any, value: str, height: int, width: int) -> torch.Tensor:
        """Mask values (e.g. 0 and 255) as class indices 0..K-1 in the order of the declared values."""
        lut = np.zeros(256, dtype=np.int64)
        lut[sorted(ds.spec.labels)] = np.arange(len(ds.spec.labels))
        with Image.open(ds.folder / value) as im:
            mask = torch.from_numpy(lut[np.asarray(im)])
        return F.interpolate(mask[None, None].float(), size=(ds.img_size,) * 2, mode="nearest")[0, 0].long()

    def flip(self, target: torch.Tensor, size: int) -> torch.Tensor:
        return target.flip(-1)

    def loss(self, spec: DatasetSpec, stats: Any = None, tokenizer: Any = None, head: Any = None) -> Loss:
        dice_ce = DiceCELoss(to_onehot_y=True, softmax=True, batch=False)
        return lambda logits, target: dice_ce(logits, target[:, None])

    def metrics(self, pred: Any, true: Any, k: int, threshold: float | None = None, findings: Any = ()) -> dict:
        return segmentation_metrics(pred, true, k)

    def resampled(self, pred: Any, true: Any, k: int) -> Any:
        """Per-class Dice of each image once, then the mean over classes of the resampled images' means."""
        p = F.one_hot(pred.long(), k).permute(0, 3, 1, 2).float()
        t = F.one_hot(true.long(), k).permute(0, 3, 1, 2).float()
        dice = compute_dice(p, t, include_background=False).numpy()
        return lambda idx: float(np.nanmean(np.nanmean(dice[idx], axis=0)))

    def describe(self, declared: Declared) -> str:
        return str(sorted(declared.labels))

    def mismatch(self, declared: Declared, spec: DatasetSpec, who: str = "job") -> str:
        if tuple(sorted(declared.labels)) != tuple(sorted(spec.labels)):
            return f"{who} mask values {sorted(declared.labels)} but the dataset declares {sorted(spec.labels)}"
        return ""

    def columns(self, head: TaskHead) -> list[str]:
        return ["file", "mask", "overlay", "foreground_fraction"]

    def predict_image(self, model: Any, head: TaskHead, inputs: Any, img: Any, stem: str, out: Any, _: float) -> list:
        height, width = img.shape[-2:]
        raw = model(inputs.tensor(img)).float()
        labels = F.interpolate(raw, size=(height, width), mode="bilinear", align_corners=False)[0].argmax(0)
        mask = np.array(head.mask_values, dtype=np.uint8)[labels.numpy()]  # back to the declared mask values
        Image.fromarray(mask).save(out / f"{stem}_mask.png")
        overlay(gray_of(img), mask).save(out / f"{stem}_overlay.png")
        return [f"{stem}_mask.png", f"{stem}_overlay.png", f"{float((mask > 0).mean()):.6f}"]


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
