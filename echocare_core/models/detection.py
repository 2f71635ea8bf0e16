"""Box detection as centre heatmaps (CenterNet, Zhou et al. 2019) on the dense head's output.

The head gives `K + 2` maps at input resolution: one centre heatmap per class (logits) and the log
width and log height of the box centred at each pixel. Training: the penalty-reduced focal loss on
the heatmaps, against Gaussians around the true centres, plus an L1 loss on the log sizes at the
true centres, both per sample. Decoding: local maxima (3x3) of the heatmaps, the top `max_det`.
Boxes are `[x1, y1, x2, y2]` in pixel-edge coordinates (a box over pixel columns 10..19 has
x1 = 10, x2 = 20), with the class index in a fifth column for targets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["HEAT_PRIOR", "Detections", "centre_targets", "decode_detections", "detection_loss"]

HEAT_PRIOR = 0.01  # initial centre probability everywhere; the heat logits' bias starts at its logit


@dataclass
class Detections:
    """Detections of one image: boxes `[M, 4]`, scores `[M]`, class indices `[M]`, best first."""

    boxes: torch.Tensor
    scores: torch.Tensor
    classes: torch.Tensor

    def cpu(self) -> Detections:
        return Detections(self.boxes.cpu(), self.scores.cpu(), self.classes.cpu())


def centre_targets(boxes: torch.Tensor, k: int, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Heatmap targets `[K, H, W]` (1 at each centre pixel, Gaussian falloff with sigma = box size / 6)
    and the centre pixels `[G, 2]` (row, column) of one image's boxes `[G, 5]`."""
    h, w = size
    heat = torch.zeros(k, h, w, device=boxes.device)
    cx = ((boxes[:, 0] + boxes[:, 2]) / 2 - 0.5).clamp(0, w - 1)  # centre in pixel-centre coordinates
    cy = ((boxes[:, 1] + boxes[:, 3]) / 2 - 0.5).clamp(0, h - 1)
    sx = ((boxes[:, 2] - boxes[:, 0]) / 6).clamp_min(0.5)
    sy = ((boxes[:, 3] - boxes[:, 1]) / 6).clamp_min(0.5)
    ys = torch.arange(h, device=boxes.device, dtype=torch.float32)[:, None]
    xs = torch.arange(w, device=boxes.device, dtype=torch.float32)[None, :]
    centres = torch.stack([cy.round(), cx.round()], dim=1).long()  # [G, 2]
    for i in range(len(boxes)):
        c = int(boxes[i, 4])
        g = torch.exp(-((xs - centres[i, 1]) ** 2) / (2 * sx[i] ** 2) - ((ys - centres[i, 0]) ** 2) / (2 * sy[i] ** 2))
        heat[c] = torch.maximum(heat[c], g)  # exactly 1 at the centre pixel
    return heat, centres


def detection_loss(out: torch.Tensor, targets: list[torch.Tensor]) -> torch.Tensor:
    """Mean over images of focal loss (per object) + L1 on log box sizes at the centres.

    Args:
        out: `[B, K + 2, H, W]` head output.
        targets: per image `[G, 5]` boxes with class index.
    """
    k, size = out.shape[1] - 2, tuple(out.shape[-2:])
    losses = []
    for o, boxes in zip(out, targets):
        heat, centres = centre_targets(boxes.float(), k, size)
        logit = o[:k]
        p = logit.sigmoid()
        pos = heat == 1
        # log(p) and log(1 - p) from the logits, which stay finite where p rounds to 0 or 1
        focal = torch.where(pos, (1 - p) ** 2 * F.logsigmoid(logit), (1 - heat) ** 4 * p**2 * F.logsigmoid(-logit))
        n = max(len(boxes), 1)
        loss = -focal.sum() / n
        if len(boxes):
            wh = (boxes[:, 2:4] - boxes[:, 0:2]).float().clamp_min(1.0).log()  # [G, 2]
            pred = o[k:, centres[:, 0], centres[:, 1]].T  # [G, 2]
            loss = loss + F.l1_loss(pred, wh)
        losses.append(loss)
    return torch.stack(losses).mean() if losses else out.sum() * 0.0


@torch.no_grad()
def decode_detections(out: torch.Tensor, max_det: int = 100, min_score: float = 0.01) -> list[Detections]:
    """Boxes of the heatmaps' local maxima, best first, at most `max_det` per image.

    Args:
        out: `[B, K + 2, H, W]` head output.
    """
    k, (h, w) = out.shape[1] - 2, out.shape[-2:]
    heat = out[:, :k].float().sigmoid()
    peaks = heat * (heat == F.max_pool2d(heat, 3, stride=1, padding=1))  # [B, K, H, W]
    scores, idx = peaks.flatten(1).topk(min(max_det, k * h * w), dim=1)  # [B, D]
    result = []
    for b in range(out.shape[0]):
        keep = scores[b] >= min_score
        s, i = scores[b][keep], idx[b][keep]
        cls, pix = i // (h * w), i % (h * w)
        y, x = pix // w, pix % w
        size = out[b, k:].float().flatten(1)[:, pix].exp()  # [2, M]: width, height
        cx, cy = x.float() + 0.5, y.float() + 0.5
        boxes = torch.stack([cx - size[0] / 2, cy - size[1] / 2, cx + size[0] / 2, cy + size[1] / 2], dim=1)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        result.append(Detections(boxes, s, cls))
    return result
