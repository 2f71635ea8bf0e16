"""Task heads on the EchoCare encoder, built from MONAI blocks where MONAI has them.

Heads take the encoder's outputs (pooled feature or multi-scale maps) and hold no norm but
LayerNorm / InstanceNorm and no in-place activation, so per-sample gradients (DP) need no rewrite.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrUpBlock
from torch import nn

from echocare_core.models.swin import EncoderConfig

__all__ = [
    "DECODERS",
    "Decoder",
    "ClassificationHead",
    "ClipRegressionHead",
    "DenseHead",
    "LightDenseHead",
    "no_inplace",
]


def no_inplace(module: nn.Module) -> nn.Module:
    """Switch off `inplace` on every activation (MONAI's blocks default to in-place LeakyReLU)."""
    for m in module.modules():
        if hasattr(m, "inplace"):
            m.inplace = False
    return module


class ClassificationHead(nn.Module):
    """LayerNorm + linear layer on the pooled global feature: `[B, C] -> [B, num_outputs]` logits."""

    def __init__(self, in_features: int, num_outputs: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_features)
        self.fc = nn.Linear(in_features, num_outputs)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(pooled))


class ClipRegressionHead(nn.Module):
    """One number per clip from its frames' pooled features: mean and max over time, then a small MLP.

    `forward(frame_features [B, T, C]) -> [B]`. Mean and max together let the head compare frames
    (e.g. the ventricle at its largest and smallest for the ejection fraction).
    """

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(2 * in_features)
        self.fc1 = nn.Linear(2 * in_features, in_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(in_features, 1)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([frames.mean(1), frames.std(1, correction=0)], dim=-1)  # [B, 2C]
        return self.fc2(self.act(self.fc1(self.norm(pooled))))[:, 0]


class DenseHead(nn.Module):
    """SwinUNETR-style decoder: skip connections from the image and from each of the encoder's five outputs
    (the patch embedding at H/p, then the stages at H/2p ... H/16p).

    `forward(image, stage_maps) -> [B, out_channels, H, W]` at input resolution: mask logits
    (segmentation), landmark heatmaps or centre heatmaps and box sizes (detection).
    """

    def __init__(self, cfg: EncoderConfig, out_channels: int, feature_size: int = 16) -> None:
        super().__init__()
        f, norm = feature_size, ("instance", {"affine": True})
        depth = len(cfg.stage_channels)
        if cfg.stage_resolutions[-1] < 2:  # instance norm needs more than one pixel per map
            raise ValueError(
                f"img_size={cfg.img_size} leaves a 1x1 deepest feature map; dense heads need "
                f"img_size >= {2 * cfg.stride}"
            )
        self.stem = UnetrBasicBlock(2, cfg.in_chans, f, kernel_size=3, stride=1, norm_name=norm)
        self.skips = nn.ModuleList(
            UnetrBasicBlock(2, c, f * 2**i, kernel_size=3, stride=1, norm_name=norm)
            for i, c in enumerate(cfg.stage_channels)
        )
        # from the deepest stage up to stage 0, each step doubles the resolution and halves the width
        self.ups = nn.ModuleList(
            UnetrUpBlock(2, f * 2 ** (i + 1), f * 2**i, kernel_size=3, upsample_kernel_size=2, norm_name=norm)
            for i in reversed(range(depth - 1))
        )
        self.to_image = UnetrUpBlock(2, f, f, kernel_size=3, upsample_kernel_size=cfg.patch_size, norm_name=norm)
        self.out = UnetOutBlock(2, f, out_channels)
        no_inplace(self)

    def forward(self, image: torch.Tensor, stage_maps: list[torch.Tensor]) -> torch.Tensor:
        skips = [block(m) for block, m in zip(self.skips, stage_maps)]
        x = skips[-1]
        for up, skip in zip(self.ups, reversed(skips[:-1])):
            x = up(x, skip)
        return self.out(self.to_image(x, self.stem(image.contiguous())))

    @property
    def out_conv(self) -> nn.Conv2d:
        """The last convolution (its bias sets a detection head's prior)."""
        return self.out.conv.conv


class LightDenseHead(nn.Module):
    """A dense decoder with few parameters, for differential privacy: each of the encoder's five maps through a
    1x1 convolution to `feature_size` channels, upsampled to the first map's resolution and summed, then one 3x3
    convolution and a 1x1 to the outputs, upsampled to the image (about 10k parameters on the test encoder at
    width 16, against 790k for `DenseHead` at width 8). DP-SGD's noise grows with the square root of what trains.

    `forward(image, stage_maps) -> [B, out_channels, H, W]`, as `DenseHead`.
    """

    def __init__(self, cfg: EncoderConfig, out_channels: int, feature_size: int = 16) -> None:
        super().__init__()
        f = feature_size
        self.lateral = nn.ModuleList(nn.Conv2d(c, f, kernel_size=1) for c in cfg.stage_channels)
        self.fuse = nn.Conv2d(f, f, kernel_size=3, padding=1)
        self.out = nn.Conv2d(f, out_channels, kernel_size=1)

    def forward(self, image: torch.Tensor, stage_maps: list[torch.Tensor]) -> torch.Tensor:
        size = stage_maps[0].shape[-2:]
        x = sum(
            F.interpolate(lateral(m), size=size, mode="bilinear", align_corners=False)
            for lateral, m in zip(self.lateral, stage_maps)
        )
        x = self.out(F.gelu(self.fuse(F.gelu(x))))
        return F.interpolate(x, size=image.shape[-2:], mode="bilinear", align_corners=False)

    @property
    def out_conv(self) -> nn.Conv2d:
        return self.out


DECODERS = {"unetr": DenseHead, "light": LightDenseHead}  # the dense decoders a job or a fine-tuning config names
Decoder = Literal["unetr", "light"]
