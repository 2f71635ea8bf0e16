"""Landmarks with the dense decoder: one heatmap per point, sub-pixel peaks; mean radial error and successful
detection rates."""

from __future__ import annotations

import json
from typing import Any

import torch

from echocare_core.data.spec import DatasetSpec
from echocare_core.models.landmarks import decode_heatmaps, heatmap_loss
from echocare_core.tasks.base import Declared, Loss, Task, TaskHead
from echocare_core.tasks.drawing import draw, gray_of

__all__ = ["SDR_RADII", "Landmarks", "from_model_points", "landmark_metrics", "to_model_points"]

SDR_RADII = (2, 4, 10)  # pixels: the successful detection rates the paper reports


class Landmarks(Task):
    name = "landmarks"
    main_metric = "mre"
    lower_is_better = True

    def outputs(self, classes: int, labels: int, landmarks: int, tokenizer: Any = None) -> int:
        return landmarks

    def decode(self, model: Any, out: torch.Tensor) -> torch.Tensor:
        """Landmark (x, y) `[B, K, 2]` in the model's pixels."""
        return decode_heatmaps(out)

    def target(self, ds: Any, value: str, height: int, width: int) -> torch.Tensor:
        points = torch.tensor(json.loads(value), dtype=torch.float32).view(-1, 2)
        return to_model_points(points, height, width, ds.img_size)

    def flip(self, target: torch.Tensor, size: int) -> None:
        return None  # the points' order can depend on the side

    def predict_batch(self, model: Any, batch: dict[str, Any], ds: Any, beam: int) -> tuple[list, list]:
        """Points in the images' own pixels."""
        pred = self.decode(model, model(batch["image"]).float()).cpu()
        size = batch["image"].shape[-1]
        return [from_model_points(pred, batch["size"], size)], [from_model_points(batch["target"], batch["size"], size)]

    def loss(self, spec: DatasetSpec, stats: Any = None, tokenizer: Any = None, head: Any = None) -> Loss:
        return heatmap_loss

    def metrics(self, pred: Any, true: Any, k: int, threshold: float | None = None, findings: Any = ()) -> dict:
        return landmark_metrics(pred, true)

    def describe(self, declared: Declared) -> str:
        return str(declared.landmarks)

    def mismatch(self, declared: Declared, spec: DatasetSpec, who: str = "job") -> str:
        if spec.landmark_names and declared.landmarks != len(spec.landmark_names):
            return f"{who} has {declared.landmarks} landmarks but the dataset has {len(spec.landmark_names)}"
        return ""

    def columns(self, head: TaskHead) -> list[str]:
        return ["file", *[f"{n}_{a}" for n in head.points for a in "xy"], "overlay"]

    def predict_image(self, model: Any, head: TaskHead, inputs: Any, img: Any, stem: str, out: Any, _: float) -> list:
        height, width = img.shape[-2:]
        points = self.decode(model, model(inputs.tensor(img)).float())
        points = from_model_points(points, torch.tensor([[height, width]]), inputs.size)[0].tolist()
        draw(gray_of(img), points=points).save(out / f"{stem}_overlay.png")
        return [*[f"{c:.2f}" for p in points for c in p], f"{stem}_overlay.png"]


def to_model_points(points: torch.Tensor, height: int, width: int, size: int) -> torch.Tensor:
    """(x, y) pixel coordinates `[..., 2]` of an H x W image in the model's S x S grid (pixel centres at integers)."""
    return (points + 0.5) * torch.tensor([size / width, size / height]) - 0.5


def from_model_points(points: torch.Tensor, sizes: torch.Tensor, size: int) -> torch.Tensor:
    """Inverse of `to_model_points` for a batch: `points` `[B, K, 2]`, original `sizes` `[B, 2]` (H, W)."""
    scale = sizes.flip(-1).float()[:, None, :] / size  # [B, 1, 2]: (W, H) / S
    return (points + 0.5) * scale - 0.5


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
