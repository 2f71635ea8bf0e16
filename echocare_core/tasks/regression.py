"""Regression over cine clips (e.g. ejection fraction): frames encoded alike, pooled over time, an MLP; smooth L1 on
standardised targets; MAE, RMSE, bias and Pearson's r."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from echocare_core.data.io import read_clip
from echocare_core.data.spec import DatasetSpec
from echocare_core.models.heads import ClipRegressionHead
from echocare_core.tasks.base import Loss, Task

__all__ = ["Regression", "regression_metrics"]


class Regression(Task):
    name = "regression"
    main_metric = "mae"
    lower_is_better = True
    sample_parts = "a clip's frames"

    def head(self, cfg: Any, outputs: int, feature_size: int, report: Any, decoder: str = "unetr") -> nn.Module:
        return ClipRegressionHead(cfg.stage_channels[-1])

    def forward(self, model: Any, images: torch.Tensor, ids: Any = None) -> torch.Tensor:
        """Clips `[B, T, C, H, W]` -> `[B]`. The B*T frames go through the encoder as one batch: per-sample
        gradients (DP) must sum a clip's frames."""
        b, t = images.shape[:2]
        return model.head(model.encoder(images.flatten(0, 1)).view(b, t, -1))

    def decode(self, model: Any, out: torch.Tensor) -> torch.Tensor:
        """Values `[B]` in the target's units (the head predicts standardised ones)."""
        return out * model.target_stats[1] + model.target_stats[0]

    def read(self, path: Path, channels: int, frames: int) -> np.ndarray:
        return read_clip(path, channels, frames)

    def images_per_sample(self, frames: int, views: int) -> int:
        return frames

    def target(self, ds: Any, value: str, height: int, width: int) -> torch.Tensor:
        return torch.tensor(float(value))

    def loss(
        self, spec: DatasetSpec, stats: tuple[float, float] = (0.0, 1.0), tokenizer: Any = None, head: Any = None
    ) -> Loss:
        mean, std = stats
        return lambda pred, target: F.smooth_l1_loss(pred, (target - mean) / std)

    def metrics(self, pred: Any, true: Any, k: int, threshold: float | None = None, findings: Any = ()) -> dict:
        return regression_metrics(pred, true)

    def predict_image(self, model: Any, head: Any, inputs: Any, img: Any, stem: str, out: Any, _: float) -> list:
        return [f"{float(self.decode(model, model(inputs.tensor(img)[None]).float())[0]):.4f}"]


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
