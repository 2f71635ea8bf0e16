"""Enhancement with the dense decoder: an image out (sigmoid), trained on paired images with L1 + (1 - SSIM); SSIM,
PSNR and L1 (MONAI's metrics; FID, BRISQUE, NIQE and PIQE in `engine/quality.py`)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import SSIMLoss
from monai.metrics import PSNRMetric, SSIMMetric
from PIL import Image
from torch import nn

from echocare_core.data.io import read_image
from echocare_core.data.spec import DatasetSpec
from echocare_core.models.heads import DECODERS
from echocare_core.tasks.base import Loss, Task, TaskHead

__all__ = ["Enhancement", "enhancement_metrics"]


class Enhancement(Task):
    name = "enhancement"
    main_metric = "ssim"

    def head(self, cfg: Any, outputs: int, feature_size: int, report: Any, decoder: str = "unetr") -> nn.Module:
        return DECODERS[decoder](cfg, cfg.in_chans, feature_size)  # an image of the input's channels

    def decode(self, model: Any, out: torch.Tensor) -> torch.Tensor:
        """Enhanced images `[B, C, H, W]` in [0, 1]."""
        return out.sigmoid()

    def target(self, ds: Any, value: str, height: int, width: int) -> torch.Tensor:
        """The paired image `[C, S, S]` in [0, 1]."""
        target = torch.from_numpy(read_image(ds.folder / value, ds.channels)).float()
        s = ds.img_size
        return F.interpolate(
            target[None].div_(255.0), size=(s, s), mode="bilinear", antialias=True, align_corners=False
        )[0]

    def flip(self, target: torch.Tensor, size: int) -> torch.Tensor:
        return target.flip(-1)

    def loss(self, spec: DatasetSpec, stats: Any = None, tokenizer: Any = None, head: Any = None) -> Loss:
        ssim = SSIMLoss(spatial_dims=2, data_range=1.0)  # on the enhanced image in [0, 1]
        return lambda logits, target: F.l1_loss(logits.sigmoid(), target) + ssim(logits.sigmoid(), target)

    def metrics(self, pred: Any, true: Any, k: int, threshold: float | None = None, findings: Any = ()) -> dict:
        return enhancement_metrics(pred, true)

    def resampled(self, pred: Any, true: Any, k: int) -> Any:
        """SSIM of each image once, then the mean of the resampled images'."""
        ssim = np.asarray([enhancement_metrics(pred[i : i + 1], true[i : i + 1])["ssim"] for i in range(len(pred))])
        return lambda idx: float(ssim[idx].mean())

    def columns(self, head: TaskHead) -> list[str]:
        return ["file", "enhanced", "side_by_side"]

    def predict_image(self, model: Any, head: TaskHead, inputs: Any, img: Any, stem: str, out: Any, _: float) -> list:
        """The model enhances at its own input size (e.g. 224 px) and the result is resized to the input's, so
        fine detail above that size is not restored."""
        height, width = img.shape[-2:]
        enhanced = self.decode(model, model(inputs.tensor(img)).float())
        enhanced = F.interpolate(enhanced, size=(height, width), mode="bilinear", align_corners=False)[0]
        pixels = (enhanced.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()  # [H, W, C]
        pixels = pixels[..., 0] if pixels.shape[-1] == 1 else pixels
        Image.fromarray(pixels).save(out / f"{stem}_enhanced.png")
        before = img[0].transpose(1, 2, 0)
        pair = np.concatenate([before[..., 0] if before.shape[-1] == 1 else before, pixels], axis=1)
        Image.fromarray(pair).save(out / f"{stem}_side_by_side.png")
        return [f"{stem}_enhanced.png", f"{stem}_side_by_side.png"]


def enhancement_metrics(pred: torch.Tensor, true: torch.Tensor) -> dict[str, float]:
    """PSNR (dB) and SSIM (11 x 11 Gaussian window) of enhanced images against their paired targets, both
    `[N, C, H, W]` in [0, 1], averaged over images (MONAI's PSNRMetric and SSIMMetric). Identical images
    give PSNR infinity and SSIM 1."""
    pred, true = pred.float().clamp(0, 1), true.float()
    psnr = PSNRMetric(max_val=1.0, reduction="none")(pred, true).flatten()
    ssim = SSIMMetric(spatial_dims=2, data_range=1.0, reduction="none")(pred, true).flatten()
    mae = (pred - true).abs().flatten(1).mean(1)
    return {"ssim": float(ssim.mean()), "psnr": float(psnr.mean()), "l1": float(mae.mean())}
