"""EchoCare pretraining model: SimMIM masked image modelling plus the hierarchical anatomy head."""

from __future__ import annotations

import torch
from timm.layers import trunc_normal_
from torch import nn

from echocare_core.data.ontology import Ontology
from echocare_core.models.hierarchy import HierarchyHead
from echocare_core.models.swin import EncoderConfig, SwinEncoder

__all__ = ["EchoCarePretrainModel", "mim_l1_loss"]


def mim_l1_loss(images: torch.Tensor, pred: torch.Tensor, pixel_mask: torch.Tensor) -> torch.Tensor:
    """L1 reconstruction loss on masked pixels only (EchoCare eq. 1).

    Args:
        images: `[B, C, H, W]` targets.
        pred: `[B, C, H, W]` reconstruction.
        pixel_mask: `[B, 1, H, W]`, 1 on masked pixels.
    """
    err = (images - pred.float()).abs() * pixel_mask
    return err.sum() / (pixel_mask.sum() * images.shape[1] + 1e-5)


class EchoCarePretrainModel(nn.Module):
    """Encoder + learned mask token + light pixel decoder + hierarchical anatomy head.

    The pixel decoder is SimMIM's: a 1x1 convolution to `stride^2 * in_chans` channels and a pixel
    shuffle back to image resolution. The anatomy head reads the pooled feature of the same (masked)
    forward pass, so one pass serves both losses.
    """

    def __init__(self, cfg: EncoderConfig, ontology: Ontology) -> None:
        super().__init__()
        self.encoder = SwinEncoder(cfg)
        self.mask_token = nn.Parameter(torch.zeros(self.encoder.embed_dim))
        trunc_normal_(self.mask_token, std=0.02)
        stride = cfg.stride
        self.decoder = nn.Sequential(
            nn.Conv2d(self.encoder.num_features, stride**2 * cfg.in_chans, kernel_size=1), nn.PixelShuffle(stride)
        )
        self.hierarchy = HierarchyHead(self.encoder.num_features, ontology)

    def forward(
        self, images: torch.Tensor, token_mask: torch.Tensor, anatomy: torch.Tensor, hie_weight: float = 1.0
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """Compute `L_MIM + hie_weight * L_HIE`.

        Args:
            images: `[B, C, H, W]`, normalised.
            token_mask: `[B, H/p, W/p]`, 1 where a patch is masked.
            anatomy: `[B]` ontology node index, -1 where the image has no anatomy label.
            hie_weight: lambda of the total loss.

        Returns:
            `(loss, parts, pred)`: parts holds detached `loss_mim`, `loss_hie` and `labelled`.
        """
        feats = self.encoder.forward_features(images, token_mask, self.mask_token)  # [B, h, w, C]
        pred = self.decoder(feats.permute(0, 3, 1, 2))  # [B, C, H, W]
        p = self.encoder.cfg.patch_size
        pixel_mask = token_mask.repeat_interleave(p, 1).repeat_interleave(p, 2).unsqueeze(1).to(images.dtype)
        loss_mim = mim_l1_loss(images, pred, pixel_mask)
        hie, labelled = self.hierarchy.loss(self.hierarchy(feats.mean(dim=(1, 2))), anatomy)
        # the sum keeps the head in the graph when no image is labelled (DDP needs every grad)
        loss_hie = (hie * labelled).sum() / labelled.sum().clamp(min=1)
        loss = loss_mim + hie_weight * loss_hie
        parts = {"loss_mim": loss_mim.detach(), "loss_hie": loss_hie.detach(), "labelled": labelled.sum().detach()}
        return loss, parts, pred
