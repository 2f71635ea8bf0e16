"""Detection with the dense decoder: CenterNet centre heatmaps per class and box sizes; AP per class and mAP at
IoU 0.5 (MONAI's COCO metric)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from monai.apps.detection.metrics.coco import COCOMetric
from monai.apps.detection.metrics.matching import matching_batch
from monai.data.box_utils import box_iou

from echocare_core.data.contract import DatasetSpec
from echocare_core.models.detection import Detections, detection_loss
from echocare_core.tasks.base import Loss, Task
from echocare_core.tasks.classification import Classification

__all__ = ["Detection", "detection_ap", "detection_metrics", "match_detections"]


class Detection(Task):
    name = "detection"
    main_metric = "map50"

    def outputs(self, classes: int, labels: int, landmarks: int, tokenizer: Any = None) -> int:
        return classes

    def loss(self, spec: DatasetSpec, stats: Any = None, tokenizer: Any = None, head: Any = None) -> Loss:
        return detection_loss

    def metrics(self, pred: Any, true: Any, k: int, threshold: float | None = None, findings: Any = ()) -> dict:
        return detection_metrics(pred, true, k)

    def mismatch(self, wanted: Any, spec: DatasetSpec) -> str:
        return Classification().mismatch(wanted, spec)  # the same declared classes


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


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
