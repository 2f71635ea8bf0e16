"""Landmarks with the dense decoder: one heatmap per point, sub-pixel peaks; mean radial error and successful
detection rates."""

from __future__ import annotations

from typing import Any

import torch

from echocare_core.data.contract import DatasetSpec
from echocare_core.models.landmarks import heatmap_loss
from echocare_core.tasks.base import Loss, Task

__all__ = ["SDR_RADII", "Landmarks", "landmark_metrics"]

SDR_RADII = (2, 4, 10)  # pixels: the successful detection rates the paper reports


class Landmarks(Task):
    name = "landmarks"
    main_metric = "mre"
    lower_is_better = True

    def outputs(self, classes: int, labels: int, landmarks: int, tokenizer: Any = None) -> int:
        return landmarks

    def loss(self, spec: DatasetSpec, stats: Any = None, tokenizer: Any = None, head: Any = None) -> Loss:
        return heatmap_loss

    def metrics(self, pred: Any, true: Any, k: int, threshold: float | None = None, findings: Any = ()) -> dict:
        return landmark_metrics(pred, true)

    def mismatch(self, wanted: Any, spec: DatasetSpec) -> str:
        if spec.landmark_names and wanted.landmarks != len(spec.landmark_names):
            return f"job has {wanted.landmarks} landmarks but the site has {len(spec.landmark_names)}"
        return ""


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
