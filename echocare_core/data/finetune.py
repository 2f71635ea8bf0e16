"""Labelled samples of a site dataset (the contract of `data.contract`) as tensors for fine-tuning."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from echocare_core.data.contract import DatasetSpec, patient_splits, read_manifest
from echocare_core.data.io import ImageReadError, read_image
from echocare_core.data.pretrain import INPUT_MEAN, INPUT_STD

__all__ = ["TaskDataset", "collate_task", "split_rows"]


def split_rows(folder: str | Path, split: str, seed: int = 0) -> list[dict[str, str]]:
    """The manifest rows of one split (patient-grouped with a fixed seed where `split` is empty)."""
    _, rows = read_manifest(folder)
    return [r for r, s in zip(rows, patient_splits(rows, seed)) if s == split]


class TaskDataset(Dataset):
    """`dataset[(epoch, i)]` -> image `[C, S, S]` and target (class index, or mask `[S, S]`).

    Training samples get a horizontal flip with probability 0.5 (image and mask together), drawn
    from (seed, epoch, i), so a resumed run sees the same samples.
    """

    def __init__(self, folder: str | Path, spec: DatasetSpec, rows: list[dict[str, str]], img_size: int,
                 channels: int, train: bool, seed: int = 0) -> None:
        self.folder, self.spec, self.rows = Path(folder), spec, rows
        self.img_size, self.channels, self.train, self.seed = img_size, channels, train, seed
        # mask values (e.g. 0 and 255) -> class indices 0..K-1, in the order of the declared values
        self.lut = np.zeros(256, dtype=np.int64)
        self.lut[sorted(spec.labels)] = np.arange(len(spec.labels))

    def __len__(self) -> int:
        return len(self.rows)

    def _target(self, row: dict[str, str]) -> torch.Tensor:
        if self.spec.task == "classification" and self.spec.multi_label:  # "a;b" -> multi-hot [K]
            names = {n.strip() for n in row["label"].split(";")}
            return torch.tensor([float(c in names) for c in self.spec.classes])
        if self.spec.task == "classification":
            return torch.tensor(self.spec.classes.index(row["label"]))
        with Image.open(self.folder / row["mask"]) as im:
            mask = torch.from_numpy(self.lut[np.asarray(im)])
        return F.interpolate(mask[None, None].float(), size=(self.img_size,) * 2, mode="nearest")[0, 0].long()

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, i = key
        row = self.rows[i]
        try:
            img = read_image(self.folder / row["image"], self.channels)  # the model's channels
            target = self._target(row)
        except (ImageReadError, OSError):
            return {"skip": i}
        x = torch.from_numpy(img).float().div_(255.0)
        x = F.interpolate(x[None], size=(self.img_size,) * 2, mode="bilinear", antialias=True,
                          align_corners=False)[0]
        if self.train and np.random.default_rng([self.seed, epoch, i]).random() < 0.5:
            x = x.flip(-1)
            target = target.flip(-1) if target.ndim == 2 else target
        return {"image": (x - INPUT_MEAN) / INPUT_STD, "target": target, "row": i}


def collate_task(items: list[dict[str, Any]]) -> dict[str, Any]:
    good = [it for it in items if "skip" not in it]
    out: dict[str, Any] = {"skipped": len(items) - len(good)}
    if good:
        out["image"] = torch.stack([g["image"] for g in good])
        out["target"] = torch.stack([g["target"] for g in good])
        out["row"] = torch.tensor([g["row"] for g in good])
    return out
