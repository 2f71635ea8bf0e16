"""Detection with the dense decoder: CenterNet centre heatmaps per class and box sizes; AP per class and mAP at
IoU 0.5 (MONAI's COCO metric)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from monai.apps.detection.metrics.coco import COCOMetric
from monai.apps.detection.metrics.matching import matching_batch
from monai.data.box_utils import box_iou
from torch import nn

from echocare_core.data.spec import DatasetSpec
from echocare_core.models.detection import HEAT_PRIOR, Detections, decode_detections, detection_loss
from echocare_core.models.heads import DECODERS
from echocare_core.tasks.base import Declared, Loss, Task, TaskHead
from echocare_core.tasks.classification import Classification
from echocare_core.tasks.drawing import draw, gray_of

__all__ = ["Detection", "detection_ap", "detection_metrics", "match_detections"]


class Detection(Task):
    name = "detection"
    main_metric = "map50"
    stacked = False  # boxes per image

    def outputs(self, classes: int, labels: int, landmarks: int, tokenizer: Any = None) -> int:
        return classes

    def head(self, cfg: Any, outputs: int, feature_size: int, report: Any, decoder: str = "unetr") -> nn.Module:
        """Centre logits per class and two log box sizes; the centre heatmaps start at a low prior, as in
        CenterNet and RetinaNet."""
        head = DECODERS[decoder](cfg, outputs + 2, feature_size)
        with torch.no_grad():
            head.out_conv.bias[:outputs] = math.log(HEAT_PRIOR / (1 - HEAT_PRIOR))
        return head

    def decode(self, model: Any, out: torch.Tensor) -> list[Detections]:
        return decode_detections(out)

    def target(self, ds: Any, value: str, height: int, width: int) -> torch.Tensor:
        """Boxes `[G, 5]`: x1, y1, x2, y2 in the model's pixel edges, class index."""
        boxes = [[*b[:4], ds.spec.classes.index(str(b[4]))] for b in json.loads(value)]
        out = torch.tensor(boxes, dtype=torch.float32).view(-1, 5)
        out[:, 0:4:2] *= ds.img_size / width
        out[:, 1:4:2] *= ds.img_size / height
        return out

    def flip(self, target: torch.Tensor, size: int) -> torch.Tensor:
        """x1, x2 -> S - x2, S - x1."""
        return torch.stack([size - target[:, 2], target[:, 1], size - target[:, 0], target[:, 3], target[:, 4]], 1)

    def predict_batch(self, model: Any, batch: dict[str, Any], ds: Any, beam: int) -> tuple[list, list]:
        """Detections in the model's grid (IoU does not change with scale)."""
        return [d.cpu() for d in self.decode(model, model(batch["image"]).float())], list(batch["target"])

    def loss(self, spec: DatasetSpec, stats: Any = None, tokenizer: Any = None, head: Any = None) -> Loss:
        return detection_loss

    def metrics(self, pred: Any, true: Any, k: int, threshold: float | None = None, findings: Any = ()) -> dict:
        return detection_metrics(pred, true, k)

    def resampled(self, pred: Any, true: Any, k: int) -> Any:
        """Matched once; the resampled images' matches give the AP."""
        matched = match_detections(pred, true)
        return lambda idx: detection_ap([matched[i] for i in idx], k)["map50"]

    def mismatch(self, declared: Declared, spec: DatasetSpec, who: str = "job") -> str:
        return Classification().mismatch(declared, spec, who)  # the same declared classes

    def describe(self, declared: Declared) -> str:
        return Classification().describe(declared)

    def columns(self, head: TaskHead) -> list[str]:
        return ["file", "boxes", "count", "overlay"]

    def predict_image(
        self, model: Any, head: TaskHead, inputs: Any, img: Any, stem: str, out: Any, min_score: float
    ) -> list:
        """Boxes `[[x1, y1, x2, y2, class, score], ...]` in the input's pixels, those below `min_score` left out."""
        height, width = img.shape[-2:]
        det = self.decode(model, model(inputs.tensor(img)).float())[0]
        keep = det.scores >= min_score
        scale = torch.tensor([width, height, width, height]) / inputs.size
        boxes = [
            [*[round(v, 1) for v in (b * scale).tolist()], head.classes[int(c)], round(float(s), 4), int(c)]
            for b, s, c in zip(det.boxes[keep], det.scores[keep], det.classes[keep])
        ]
        draw(gray_of(img), boxes=boxes).save(out / f"{stem}_overlay.png")
        return [json.dumps([b[:6] for b in boxes]), str(len(boxes)), f"{stem}_overlay.png"]


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
