"""Landmark localisation by heatmaps: one spatial distribution per point, decoded to sub-pixel positions.

The dense head gives one logit map per landmark; its softmax over the image is trained towards a
normalised Gaussian around the true point (a KL divergence per sample and point). Decoding takes the
most likely pixel and refines it with a parabola through the log-probabilities of its neighbours in
x and in y, which is exact for a Gaussian (as DARK, Zhang et al. 2020). Coordinates are in pixels of
the map with pixel centres at integers, `[..., 2]` = (x, y).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["decode_heatmaps", "gaussian_heatmaps", "heatmap_loss"]


def gaussian_heatmaps(points: torch.Tensor, size: tuple[int, int], sigma: float) -> torch.Tensor:
    """Target distributions: a Gaussian of `sigma` pixels around each point, summing to 1.

    Args:
        points: `[B, K, 2]` (x, y) pixel coordinates.
        size: (H, W) of the maps.

    Returns:
        `[B, K, H, W]`.
    """
    ys = torch.arange(size[0], device=points.device, dtype=torch.float32)[:, None]  # [H, 1]
    xs = torch.arange(size[1], device=points.device, dtype=torch.float32)[None, :]  # [1, W]
    d2 = (xs - points[..., 0, None, None]) ** 2 + (ys - points[..., 1, None, None]) ** 2  # [B, K, H, W]
    g = torch.exp(-d2 / (2 * sigma**2))
    return g / g.sum((-2, -1), keepdim=True).clamp_min(1e-12)


def heatmap_loss(logits: torch.Tensor, points: torch.Tensor, sigma: float = 2.0) -> torch.Tensor:
    """Mean over samples of the per-sample KL(target || softmax(logits)), averaged over points.

    Args:
        logits: `[B, K, H, W]`.
        points: `[B, K, 2]` true (x, y) in map pixels.
    """
    b, k = logits.shape[:2]
    target = gaussian_heatmaps(points, tuple(logits.shape[-2:]), sigma).flatten(2)  # [B, K, HW]
    logp = F.log_softmax(logits.flatten(2), dim=-1)
    per_sample = F.kl_div(logp, target, reduction="none").sum(-1).mean(-1)  # [B]
    return per_sample.mean() if b else logits.sum() * 0.0


def _parabola_offset(
    flat: torch.Tensor, centre: torch.Tensor, step: int, pos: torch.Tensor, length: int
) -> torch.Tensor:
    """Vertex offset, in [-0.5, 0.5], of the parabola through the values at centre - step, centre, centre + step."""
    inside = (pos > 0) & (pos < length - 1)
    left = flat.gather(-1, (centre - step * inside.long())[..., None])[..., 0]
    mid = flat.gather(-1, centre[..., None])[..., 0]
    right = flat.gather(-1, (centre + step * inside.long())[..., None])[..., 0]
    curve = left - 2 * mid + right
    offset = torch.where(inside & (curve < 0), 0.5 * (left - right) / curve.clamp_max(-1e-12), 0.0)
    return offset.clamp(-0.5, 0.5)


@torch.no_grad()
def decode_heatmaps(logits: torch.Tensor) -> torch.Tensor:
    """Sub-pixel (x, y) of each map's maximum (parabola fit in log space; none on the border).

    Args:
        logits: `[B, K, H, W]`.

    Returns:
        `[B, K, 2]`.
    """
    w = logits.shape[-1]
    flat = F.log_softmax(logits.float().flatten(2), dim=-1)  # [B, K, HW]
    peak = flat.argmax(-1)  # [B, K]
    py, px = peak // w, peak % w
    x = px + _parabola_offset(flat, peak, 1, px, w)
    y = py + _parabola_offset(flat, peak, w, py, logits.shape[-2])
    return torch.stack([x, y], dim=-1).float()
