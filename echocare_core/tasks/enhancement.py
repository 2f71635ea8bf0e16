"""Enhancement with the dense decoder: an image out (sigmoid), trained on paired images with L1 + (1 - SSIM); SSIM,
PSNR and L1 (MONAI's metrics; FID, BRISQUE, NIQE and PIQE in `engine/quality.py`)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from monai.losses import SSIMLoss
from monai.metrics import PSNRMetric, SSIMMetric

from echocare_core.data.contract import DatasetSpec
from echocare_core.tasks.base import Loss, Task

__all__ = ["Enhancement", "enhancement_metrics"]


class Enhancement(Task):
    name = "enhancement"
    main_metric = "ssim"

    def loss(self, spec: DatasetSpec, stats: Any = None, tokenizer: Any = None, head: Any = None) -> Loss:
        ssim = SSIMLoss(spatial_dims=2, data_range=1.0)  # on the enhanced image in [0, 1]
        return lambda logits, target: F.l1_loss(logits.sigmoid(), target) + ssim(logits.sigmoid(), target)

    def metrics(self, pred: Any, true: Any, k: int, threshold: float | None = None, findings: Any = ()) -> dict:
        return enhancement_metrics(pred, true)


def enhancement_metrics(pred: torch.Tensor, true: torch.Tensor) -> dict[str, float]:
    """PSNR (dB) and SSIM (11 x 11 Gaussian window) of enhanced images against their paired targets, both
    `[N, C, H, W]` in [0, 1], averaged over images (MONAI's PSNRMetric and SSIMMetric). Identical images
    give PSNR infinity and SSIM 1."""
    pred, true = pred.float().clamp(0, 1), true.float()
    psnr = PSNRMetric(max_val=1.0, reduction="none")(pred, true).flatten()
    ssim = SSIMMetric(spatial_dims=2, data_range=1.0, reduction="none")(pred, true).flatten()
    mae = (pred - true).abs().flatten(1).mean(1)
    return {"ssim": float(ssim.mean()), "psnr": float(psnr.mean()), "l1": float(mae.mean())}
