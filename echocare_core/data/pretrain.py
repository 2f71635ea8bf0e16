"""Pretraining data: image index at scale, SimMIM masks, augmentations, sharded sampling.

The index of millions of images is kept in a few numpy arrays (paths packed into one byte buffer),
never in Python lists, so DataLoader workers share it copy-on-write instead of copying it. Every
random choice of a sample (frame, crop, flip, jitter, mask) comes from a generator seeded by
(seed, epoch, index), so results do not depend on the number of workers and resume exactly.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler

from echocare_core.data.io import (
    ImageReadError,
    count_frames,
    is_image_file,
    nonzero_pixels,
    read_image,
    sampled_frames,
)
from echocare_core.data.ontology import Ontology

__all__ = [
    "PathTable",
    "ImageIndex",
    "build_index",
    "MaskGenerator",
    "AugmentConfig",
    "PretrainDataset",
    "collate_skipping",
    "ShardedSampler",
]

log = logging.getLogger(__name__)


class PathTable:
    """Strings packed into one uint8 buffer plus int64 offsets: `table[i] -> str`."""

    def __init__(self, data: np.ndarray, offsets: np.ndarray) -> None:
        self.data, self.offsets = data, offsets

    @classmethod
    def from_strings(cls, items: Sequence[str]) -> PathTable:
        encoded = [s.encode("utf-8") for s in items]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=offsets[1:])
        return cls(np.frombuffer(b"".join(encoded), dtype=np.uint8).copy(), offsets)

    @classmethod
    def from_arrow(cls, array: Any) -> PathTable:
        """From a pyarrow string array, without making one Python object per row."""
        import pyarrow as pa

        array = array.cast(pa.large_string())  # int64 offsets
        offsets = np.frombuffer(array.buffers()[1], dtype=np.int64)[array.offset : array.offset + len(array) + 1]
        data = np.frombuffer(array.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
        return cls(data.copy(), offsets - offsets[0])

    @classmethod
    def concat(cls, tables: Sequence[PathTable]) -> PathTable:
        starts = np.cumsum([0] + [len(t.data) for t in tables[:-1]])
        offsets = np.concatenate([[0]] + [t.offsets[1:] + s for t, s in zip(tables, starts)]).astype(np.int64)
        return cls(np.concatenate([t.data for t in tables]), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        return self.data[self.offsets[i] : self.offsets[i + 1]].tobytes().decode("utf-8")


@dataclass
class ImageIndex:
    """All pretraining samples. A sample is a file, or one sampled frame of a multi-frame DICOM.

    Attributes:
        paths: one entry per file.
        anatomy: int32 `[files]`, ontology node of each file (-1: no anatomy label).
        file: int64 `[samples]`, the file of each sample.
        pick: float32 `[samples]`, which of the file's sampled frames (`read_image`'s `frame_pick`).
    """

    paths: PathTable
    anatomy: np.ndarray
    file: np.ndarray
    pick: np.ndarray

    def __len__(self) -> int:
        return len(self.file)


def _read_manifest(folder: Path, ontology: Ontology) -> tuple[PathTable, np.ndarray]:
    """Read `manifest.csv` with pyarrow (fast at millions of rows); resolve anatomy labels once per value."""
    import pyarrow as pa
    import pyarrow.compute as pc
    from pyarrow import csv as pacsv

    file = folder / "manifest.csv"
    try:
        table = pacsv.read_csv(
            file,
            convert_options=pacsv.ConvertOptions(
                column_types={"image": "string", "anatomy": "string"}, strings_can_be_null=True
            ),
        )
    except Exception as exc:  # noqa: BLE001 - pyarrow raises ArrowInvalid with the row
        raise ValueError(f"{file}: cannot be read as CSV: {exc}") from None
    if "image" not in table.column_names:
        raise ValueError(f"{file}: missing required column 'image' (found: {', '.join(table.column_names)})")
    images = table.column("image").combine_chunks()
    empty = pc.or_(pc.is_null(images), pc.equal(pc.utf8_length(images), 0))
    if pc.any(empty).as_py():
        row = int(np.argmax(empty.to_numpy(zero_copy_only=False))) + 2
        raise ValueError(f"{file}, row {row}: column 'image' is empty")
    joined = pc.binary_join_element_wise(pa.scalar(str(folder) + os.sep), images, "")
    paths = PathTable.from_arrow(pc.if_else(pc.starts_with(images, "/"), images, joined))  # relative to the folder
    if "anatomy" not in table.column_names:
        return paths, np.full(len(paths), -1, dtype=np.int32)
    encoded = pc.dictionary_encode(table.column("anatomy").combine_chunks())
    codes = np.asarray(encoded.indices.fill_null(-1).to_numpy(zero_copy_only=False), dtype=np.int64)
    nodes = []
    for value in encoded.dictionary.to_pylist():
        try:
            nodes.append(ontology.lookup(value))
        except ValueError as exc:
            row = int(np.argmax(codes == len(nodes))) + 2
            raise ValueError(f"{file}, row {row}, column 'anatomy': {exc}") from None
    lut = np.asarray(nodes + [-1], dtype=np.int32)
    return paths, lut[codes]  # code -1 (empty cell) hits the last entry


def _scan_folder(folder: Path) -> list[str]:
    found = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        found += [os.path.join(root, f) for f in sorted(files) if is_image_file(os.path.join(root, f))]
    return found


def _sampled_frame_counts(paths: PathTable, frame_step: int) -> np.ndarray:
    """Sampled frames per file: 1, or ceil(frames / frame_step) for a multi-frame `.dcm`/`.dicom` file.

    Only DICOM headers are read (in threads: archives often sit on network storage). A header that
    cannot be read counts as one frame; reading the file later reports it.
    """
    counts = np.ones(len(paths), dtype=np.int64)
    last = paths.data[paths.offsets[1:] - 1] | 0x20  # last character, lower-cased; both suffixes end in "m"
    rows = [i for i in np.flatnonzero(last == ord("m")) if paths[i].lower().endswith((".dcm", ".dicom"))]
    if not rows:
        return counts

    def frames(i: int) -> int:
        try:
            return len(sampled_frames(count_frames(paths[i]), frame_step))
        except ImageReadError:
            return 1

    with ThreadPoolExecutor(max_workers=8) as pool:
        counts[rows] = list(pool.map(frames, rows, chunksize=256))
    return counts


def build_index(sources: Sequence[str | os.PathLike], ontology: Ontology, frame_step: int = 10) -> ImageIndex:
    """Index every source: a dataset folder with `manifest.csv`, or a plain folder of images.

    Every `frame_step`-th frame of a multi-frame DICOM becomes a sample of its own (paper section 4.4).

    Raises:
        FileNotFoundError: a source does not exist.
        ValueError: a manifest is malformed or names an anatomy path not in the ontology, or no image found.
    """
    paths: list[PathTable] = []
    anatomy: list[np.ndarray] = []
    for src in map(Path, sources):
        if not src.is_dir():
            raise FileNotFoundError(f"data source not found or not a folder: {src}")
        if (src / "manifest.csv").is_file():
            p, a = _read_manifest(src, ontology)
        else:
            p = PathTable.from_strings(_scan_folder(src))
            a = np.full(len(p), -1, dtype=np.int32)
        log.info("%s: %d images, %d with anatomy labels", src, len(p), int((a >= 0).sum()))
        paths.append(p)
        anatomy.append(a)
    if not sum(map(len, paths)):
        raise ValueError(
            f"no images found in {', '.join(map(str, sources))} "
            f"(looked for a manifest.csv or PNG/JPG/BMP/TIFF/DICOM files)"
        )
    table = PathTable.concat(paths)
    counts = _sampled_frame_counts(table, frame_step)
    file = np.repeat(np.arange(len(table), dtype=np.int64), counts)
    ordinal = np.arange(len(file)) - np.repeat(np.cumsum(counts) - counts, counts)
    pick = ((ordinal + 0.5) / np.repeat(counts, counts)).astype(np.float32)
    if len(file) > len(table):
        log.info(
            "%d multi-frame files give %d frames (every %d-th)",
            int((counts > 1).sum()),
            int(counts[counts > 1].sum()),
            frame_step,
        )
    return ImageIndex(table, np.concatenate(anatomy), file, pick)


class MaskGenerator:
    """SimMIM random masking: `ratio` of the mask patches, expanded to the model's patch grid."""

    def __init__(self, img_size: int, mask_patch_size: int, model_patch_size: int, ratio: float) -> None:
        if img_size % mask_patch_size or mask_patch_size % model_patch_size:
            raise ValueError(
                f"mask_patch_size={mask_patch_size} must divide img_size={img_size} and be a "
                f"multiple of the model patch size {model_patch_size}"
            )
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"mask ratio {ratio} must be in (0, 1)")
        self.grid = img_size // mask_patch_size
        self.scale = mask_patch_size // model_patch_size
        self.count = int(np.ceil(self.grid**2 * ratio))

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        mask = np.zeros(self.grid**2, dtype=np.float32)
        mask[rng.permutation(self.grid**2)[: self.count]] = 1.0
        mask = mask.reshape(self.grid, self.grid)
        return mask.repeat(self.scale, 0).repeat(self.scale, 1)  # [H/p, W/p]


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentations: random resized crop, flips, weak brightness/contrast jitter."""

    crop_scale: tuple[float, float] = (0.5, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 1.333)
    hflip: float = 0.5
    vflip: float = 0.0
    brightness: float = 0.1
    contrast: float = 0.1

    def __post_init__(self) -> None:
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"crop_scale {self.crop_scale}: need 0 < min <= max <= 1")
        if not 0.0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ValueError(f"crop_ratio {self.crop_ratio}: need 0 < min <= max")
        if self.brightness < 0 or self.contrast < 0:
            raise ValueError(f"brightness={self.brightness}, contrast={self.contrast}: must be >= 0")
        for name in ("hflip", "vflip"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)}: a probability in [0, 1]")


def _crop_box(rng: np.random.Generator, h: int, w: int, aug: AugmentConfig) -> tuple[int, int, int, int]:
    for _ in range(10):
        area = h * w * rng.uniform(*aug.crop_scale)
        ratio = np.exp(rng.uniform(np.log(aug.crop_ratio[0]), np.log(aug.crop_ratio[1])))
        cw, ch = int(round(np.sqrt(area * ratio))), int(round(np.sqrt(area / ratio)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    side = min(h, w)
    return (h - side) // 2, (w - side) // 2, side, side


def augment(
    img: np.ndarray, size: int, rng: np.random.Generator, aug: AugmentConfig | None, scale: tuple[float, float]
) -> torch.Tensor:
    """uint8 `[C, H, W]` -> normalised float32 `[C, size, size]`."""
    x = torch.from_numpy(img).float().div_(255.0)
    if aug is not None:
        top, left, ch, cw = _crop_box(rng, x.shape[1], x.shape[2], aug)
        x = x[:, top : top + ch, left : left + cw]
    x = F.interpolate(x[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    if aug is not None:
        if rng.random() < aug.hflip:
            x = x.flip(-1)
        if rng.random() < aug.vflip:
            x = x.flip(-2)
        gain = 1.0 + rng.uniform(-aug.contrast, aug.contrast)
        shift = rng.uniform(-aug.brightness, aug.brightness)
        x = ((x - x.mean()) * gain + x.mean() + shift).clamp_(0.0, 1.0)
    return (x - scale[0]) / scale[1]


class PretrainDataset(Dataset):
    """Images for MIM + hierarchy pretraining. Unreadable or near-empty images come back as skips."""

    def __init__(
        self,
        index: ImageIndex,
        img_size: int,
        channels: int,
        masks: MaskGenerator,
        augment_cfg: AugmentConfig | None,
        scale: tuple[float, float],
        frame_step: int = 10,
        min_nonzero: int = 1000,
        seed: int = 0,
    ) -> None:
        self.index, self.img_size, self.channels, self.scale = index, img_size, channels, scale
        self.masks, self.augment_cfg = masks, augment_cfg
        self.frame_step, self.min_nonzero, self.seed = frame_step, min_nonzero, seed

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        """Sample `i` as seen in `epoch`; the key comes from `ShardedSampler`."""
        epoch, i = key
        rng = np.random.default_rng([self.seed, epoch, i])
        file = int(self.index.file[i])
        path = self.index.paths[file]
        try:
            img = read_image(path, self.channels, self.frame_step, frame_pick=float(self.index.pick[i]))
        except ImageReadError as exc:
            return {"skip": "unreadable", "path": path, "reason": str(exc), "epoch": epoch}
        except Exception as exc:  # noqa: BLE001 - a decoder bug on one odd file must not end a days-long run
            # the type only: a decoder's message may quote header values (patient data)
            return {"skip": "unreadable", "path": path, "reason": f"{path}: {type(exc).__name__}", "epoch": epoch}
        if nonzero_pixels(img) < self.min_nonzero:
            return {
                "skip": "near-empty",
                "path": path,
                "reason": f"fewer than {self.min_nonzero} non-zero pixels",
                "epoch": epoch,
            }
        return {
            "image": augment(img, self.img_size, rng, self.augment_cfg, self.scale),
            "token_mask": torch.from_numpy(self.masks(rng)),
            "anatomy": int(self.index.anatomy[file]),
        }


def collate_skipping(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the good samples; list the skipped ones as `(kind, path, reason)`, each file once: in epoch 0."""
    good = [it for it in items if "skip" not in it]
    skipped = [(it["skip"], it["path"], it["reason"]) for it in items if "skip" in it and it["epoch"] == 0]
    if not good:
        return {"image": None, "skipped": skipped}
    return {
        "image": torch.stack([g["image"] for g in good]),
        "token_mask": torch.stack([g["token_mask"] for g in good]),
        "anatomy": torch.tensor([g["anatomy"] for g in good], dtype=torch.long),
        "skipped": skipped,
    }


class ShardedSampler(Sampler[tuple[int, int]]):
    """An endless stream of `(epoch, index)` keys: each epoch a seeded permutation split evenly across
    ranks (the tail that does not divide is dropped).

    One stream serves the whole run, so the DataLoader never drains and refills at epoch ends, and the
    epoch travels with each key, so persistent workers need no notice of it. `start_at(position)`
    skips the first `position` keys of this rank's stream (resume).
    """

    def __init__(self, size: int, rank: int, world: int, seed: int) -> None:
        if size < world:
            raise ValueError(f"{size} images cannot be shared by {world} processes")
        self.size, self.rank, self.world, self.seed = size, rank, world, seed
        self.per_rank = size // world
        self.position = 0

    def start_at(self, position: int) -> None:
        self.position = position

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, offset = divmod(self.position, self.per_rank)
        while True:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.size)
            share = order[self.rank * self.per_rank : (self.rank + 1) * self.per_rank]
            yield from ((epoch, int(i)) for i in share[offset:])
            epoch, offset = epoch + 1, 0


def write_skip_log(path: Path, rows: list[tuple[str, str, str]]) -> None:
    """Append skipped files to a CSV in the run folder, so nothing is silently lost."""
    new = not path.exists()
    with path.open("a", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(["kind", "path", "reason"])
        writer.writerows(rows)
