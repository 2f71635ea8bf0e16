"""Labelled samples of a site dataset (the contract of `data.contract`) as tensors for fine-tuning.

Images are resized to the model's square input; each task (`echocare_core.tasks`) reads its target from its
manifest column into the model's pixel grid.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from echocare_core.data.contract import DatasetSpec, patient_splits, read_manifest, task_column
from echocare_core.data.io import ImageReadError, read_image
from echocare_core.data.text import ReportTokenizer
from echocare_core.tasks import get_task

__all__ = ["TaskDataset", "collate_task", "split_rows"]

log = logging.getLogger(__name__)


def split_rows(folder: str | Path, split: str, seed: int = 0) -> list[dict[str, str]]:
    """The manifest rows of one split (patient-grouped with a fixed seed where `split` is empty)."""
    _, rows = read_manifest(folder)
    return [r for r, s in zip(rows, patient_splits(rows, seed)) if s == split]


class TaskDataset(Dataset):
    """`dataset[(epoch, i)]` -> image `[C, S, S]` (regression: clip `[T, C, S, S]`; report: its views
    `[V, C, S, S]`), its target (`Task.target`), its original size `[2]` (H, W) and its row.

    Training samples get a horizontal flip with probability 0.5, the target with them (`Task.flip`; some tasks
    are never flipped), drawn from (seed, epoch, i), so a resumed run sees the same samples. Reports read `views`
    images: `image`, and with 2 also `image2` (a row without one repeats its `image`).

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
        self.folder, self.spec, self.rows, self.task = Path(folder), spec, rows, get_task(spec.task)
        self.img_size, self.channels, self.train, self.seed, self.scale = img_size, channels, train, seed, scale
        self.frames, self.tokenizer, self.views = frames, tokenizer, views if spec.task == "report" else 1
        if tokenizer is not None:
            self._check_reports()

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
        return self.task.images_per_sample(self.frames, self.views)

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
            frames = self.task.read(self.folder / row["image"], self.channels, self.frames)  # [T, C, H, W]
            height, width = frames.shape[-2:]
            target = self.task.target(self, row[task_column(self.spec.task)], height, width)
            x = self._resize(frames)
            if self.views == 2:  # the study's second image
                second = read_image(self.folder / (row.get("image2") or row["image"]), self.channels)[None]
                x = torch.cat([x, self._resize(second)])
        except (ImageReadError, OSError):
            return {"skip": i}
        if self.train and np.random.default_rng([self.seed, epoch, i]).random() < 0.5:
            flipped = self.task.flip(target, self.img_size)
            if flipped is not None:
                x, target = x.flip(-1), flipped
        x = (x - self.scale[0]) / self.scale[1]
        return {
            "image": x if self.task.sample_parts else x[0],  # a clip, a report's views
            "target": target,
            "row": i,
            "size": torch.tensor([height, width]),
        }


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
