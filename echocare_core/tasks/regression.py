"""Regression over cine clips (e.g. ejection fraction): frames encoded alike, pooled over time, an MLP; smooth L1 on
standardised targets; MAE, RMSE, bias and Pearson's r."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from echocare_core.data.contract import DatasetSpec
from echocare_core.tasks.base import Loss, Task

__all__ = ["Regression", "regression_metrics"]


class Regression(Task):
    name = "regression"
    main_metric = "mae"
    lower_is_better = True
    sample_parts = "a clip's frames"

    def loss(
        self, spec: DatasetSpec, stats: tuple[float, float] = (0.0, 1.0), tokenizer: Any = None, head: Any = None
    ) -> Loss:
        mean, std = stats
        return lambda pred, target: F.smooth_l1_loss(pred, (target - mean) / std)

    def metrics(self, pred: Any, true: Any, k: int, threshold: float | None = None, findings: Any = ()) -> dict:
        return regression_metrics(pred, true)


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
