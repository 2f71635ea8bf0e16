"""Labelled samples of a site dataset (the contract of `data.contract`) as tensors for fine-tuning.

Images are resized to the model's square input; targets follow them into its pixel grid: landmarks
`[K, 2]` (x, y) with pixel centres at integers, boxes `[G, 5]` (x1, y1, x2, y2 in pixel edges, class).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from echocare_core.data.contract import DatasetSpec, patient_splits, read_manifest
from echocare_core.data.io import ImageReadError, read_clip, read_image
from echocare_core.data.text import ReportTokenizer

__all__ = ["TaskDataset", "collate_task", "from_model_points", "split_rows", "to_model_points"]

log = logging.getLogger(__name__)


def split_rows(folder: str | Path, split: str, seed: int = 0) -> list[dict[str, str]]:
    """The manifest rows of one split (patient-grouped with a fixed seed where `split` is empty)."""
    _, rows = read_manifest(folder)
    return [r for r, s in zip(rows, patient_splits(rows, seed)) if s == split]


class TaskDataset(Dataset):
    """`dataset[(epoch, i)]` -> image `[C, S, S]` (regression: clip `[T, C, S, S]`; report: its views
    `[V, C, S, S]`), its target, its original size `[2]` (H, W) and its row.

    Targets: class index or multi-hot `[K]`, mask `[S, S]`, landmarks `[K, 2]`, boxes `[G, 5]`, a
    value, the paired target image `[C, S, S]` in [0, 1] (enhancement), or the report's token ids
    `[max_tokens]`. Training samples get a horizontal flip with probability 0.5 (target with them; not
    for landmarks, whose order can depend on the side, nor reports, which say "left" and "right"), drawn
    from (seed, epoch, i), so a resumed run sees the same samples. Reports read `views` images: `image`, and
    with 2 also `image2` (a row without one repeats its `image`).

    Raises:
        ValueError: a report dataset without `tokenizer`.
    """

    def __init__(
        self,
        folder: str | Path,
        spec: DatasetSpec,
        rows: list[dict[str, str]],
        img_size: int,
        channels: int,
        train: bool,
        scale: tuple[float, float],
        seed: int = 0,
        frames: int = 16,
        tokenizer: ReportTokenizer | None = None,
        views: int = 1,
    ) -> None:
        if spec.task == "report" and tokenizer is None:
            raise ValueError("a report dataset needs the model's tokenizer")
        self.folder, self.spec, self.rows = Path(folder), spec, rows
        self.img_size, self.channels, self.train, self.seed, self.scale = img_size, channels, train, seed, scale
        self.frames, self.tokenizer, self.views = frames, tokenizer, views if spec.task == "report" else 1
        if tokenizer is not None:
            self._check_reports()
        # mask values (e.g. 0 and 255) -> class indices 0..K-1, in the order of the declared values
        self.lut = np.zeros(256, dtype=np.int64)
        self.lut[sorted(spec.labels)] = np.arange(len(spec.labels))

    def _check_reports(self) -> None:
        """Log (counts only: the site's log) what of the reports the model will not read."""
        lengths = [self.tokenizer.length(r["report"]) for r in self.rows]
        cut = sum(n > self.tokenizer.max_tokens for n in lengths)
        if cut:
            log.warning(
                "%d of %d reports are longer than max_tokens=%d and are cut (the longest needs %d)",
                cut,
                len(lengths),
                self.tokenizer.max_tokens,
                max(lengths),
            )
        if self.views == 1 and any(r.get("image2") for r in self.rows):
            log.info("the manifest names image2 but the model reads one image per report (report.views: 1)")

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def images_per_sample(self) -> int:
        """Images the encoder reads per sample: a clip's frames, a report's views, else 1."""
        return {"regression": self.frames, "report": self.views}.get(self.spec.task, 1)

    def _target(self, row: dict[str, str], height: int, width: int) -> torch.Tensor:
        task, s = self.spec.task, self.img_size
        if task == "classification" and self.spec.multi_label:  # "a;b" -> multi-hot [K]
            names = {n.strip() for n in row["label"].split(";")}
            return torch.tensor([float(c in names) for c in self.spec.classes])
        if task == "classification":
            return torch.tensor(self.spec.classes.index(row["label"]))
        if task == "segmentation":
            with Image.open(self.folder / row["mask"]) as im:
                mask = torch.from_numpy(self.lut[np.asarray(im)])
            return F.interpolate(mask[None, None].float(), size=(s, s), mode="nearest")[0, 0].long()
        if task == "landmarks":
            points = torch.tensor(json.loads(row["landmarks"]), dtype=torch.float32).view(-1, 2)
            return to_model_points(points, height, width, s)
        if task == "enhancement":
            target = torch.from_numpy(read_image(self.folder / row["target_image"], self.channels)).float()
            return F.interpolate(
                target[None].div_(255.0), size=(s, s), mode="bilinear", antialias=True, align_corners=False
            )[0]
        if task == "report":
            return self.tokenizer.encode(row["report"])
        if task == "detection":
            boxes = json.loads(row["boxes"])
            out = torch.tensor([[*b[:4], self.spec.classes.index(str(b[4]))] for b in boxes], dtype=torch.float32).view(
                -1, 5
            )
            out[:, 0:4:2] *= s / width
            out[:, 1:4:2] *= s / height
            return out
        return torch.tensor(float(row["target"]))

    def _resize(self, frames: np.ndarray) -> torch.Tensor:
        """`[T, C, H, W]` uint8 -> `[T, C, S, S]` in [0, 1]."""
        return F.interpolate(
            torch.from_numpy(frames).float().div_(255.0),
            size=(self.img_size,) * 2,
            mode="bilinear",
            antialias=True,
            align_corners=False,
        )

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, i = key
        row = self.rows[i]
        try:
            path = self.folder / row["image"]
            frames = (
                read_clip(path, self.channels, self.frames)
                if self.spec.task == "regression"
                else read_image(path, self.channels)[None]
            )  # [T, C, H, W], the model's channels
            height, width = frames.shape[-2:]
            target = self._target(row, height, width)
            x = self._resize(frames)
            if self.views == 2:  # the study's second image
                x = torch.cat(
                    [
                        x,
                        self._resize(
                            read_image(self.folder / (row.get("image2") or row["image"]), self.channels)[None]
                        ),
                    ]
                )
        except (ImageReadError, OSError):
            return {"skip": i}
        flip = self.train and np.random.default_rng([self.seed, epoch, i]).random() < 0.5
        if flip and self.spec.task not in ("landmarks", "report"):
            x = x.flip(-1)
            if self.spec.task == "detection":  # x1, x2 -> S - x2, S - x1
                target = torch.stack(
                    [
                        self.img_size - target[:, 2],
                        target[:, 1],
                        self.img_size - target[:, 0],
                        target[:, 3],
                        target[:, 4],
                    ],
                    dim=1,
                )
            elif self.spec.task in ("segmentation", "enhancement"):
                target = target.flip(-1)
        x = (x - self.scale[0]) / self.scale[1]
        return {
            "image": x if self.spec.task in ("regression", "report") else x[0],
            "target": target,
            "row": i,
            "size": torch.tensor([height, width]),
        }


def to_model_points(points: torch.Tensor, height: int, width: int, size: int) -> torch.Tensor:
    """(x, y) pixel coordinates `[..., 2]` of an H x W image in the model's S x S grid (pixel centres at integers)."""
    return (points + 0.5) * torch.tensor([size / width, size / height]) - 0.5


def from_model_points(points: torch.Tensor, sizes: torch.Tensor, size: int) -> torch.Tensor:
    """Inverse of `to_model_points` for a batch: `points` `[B, K, 2]`, original `sizes` `[B, 2]` (H, W)."""
    scale = sizes.flip(-1).float()[:, None, :] / size  # [B, 1, 2]: (W, H) / S
    return (points + 0.5) * scale - 0.5


def collate_task(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch the readable items; targets of different shapes (boxes per image) stay a list."""
    good = [it for it in items if "skip" not in it]
    out: dict[str, Any] = {"skipped": len(items) - len(good)}
    if good:
        out["image"] = torch.stack([g["image"] for g in good])
        targets = [g["target"] for g in good]
        same = all(t.shape == targets[0].shape for t in targets)
        out["target"] = torch.stack(targets) if same else targets
        out["row"] = torch.tensor([g["row"] for g in good])
        out["size"] = torch.stack([g["size"] for g in good])
    return out
