"""Synthetic dataset folders (the site data contract of DESIGN.md section 3), one per simulated site.

Each site gets its own device profile, patients with 1-3 images each, a patient-grouped
train/val/test split and the task's label column; see `write_dataset`.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import shutil
from collections.abc import Callable
from typing import Any
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from echocare_core.data.synthetic import (CLASSES, LESIONS, MAX_SIZE, MIN_SIZE, SCENES, SPLIT_FRACTIONS, TASKS,
                                          lookup_option, generate_image, profile_for_site)

__all__ = ["manifest_anatomy", "write_dataset"]

logger = logging.getLogger(__name__)


def manifest_anatomy(path: str, rng: np.random.Generator) -> str:
    """Return the label a pretraining manifest records for `path`: full (60%), region/organ (15%),
    region (10%) or "" for missing (15%), as real archives label images to varying depth."""
    parts, u = path.split("/"), rng.random()
    if u < 0.60:
        return path
    if u < 0.75:
        return "/".join(parts[:2])
    return parts[0] if u < 0.85 else ""


def _patients(n_images: int, rng: np.random.Generator) -> list[int]:
    """Patient index of each image; each patient contributes 1-3 images."""
    out: list[int] = []
    patient = 0
    while len(out) < n_images:
        out += [patient] * int(rng.integers(1, 4))
        patient += 1
    return out[:n_images]


def _split_of_patients(n_patients: int, rng: np.random.Generator) -> list[str]:
    """Split of each patient, ~70/15/15 train/val/test; val and test get one each from 3 patients."""
    n_val = max(1, round(SPLIT_FRACTIONS["val"] * n_patients)) if n_patients >= 3 else 0
    n_test = max(1, round(SPLIT_FRACTIONS["test"] * n_patients)) if n_patients >= 3 else 0
    splits = ["val"] * n_val + ["test"] * n_test + ["train"] * (n_patients - n_val - n_test)
    return [splits[i] for i in rng.permutation(n_patients)]


def _patient_lesions(task: str, n_patients: int, rng: np.random.Generator) -> list[str | None]:
    """One lesion kind per patient (their images are views of the same lesion); for
    classification, half the patients (rounded down) have a malignant lesion."""
    if task == "pretrain":
        return [None] * n_patients
    if task == "segmentation":
        return [str(k) for k in rng.choice(LESIONS, n_patients)]
    benign = rng.choice(["cyst", "hyperechoic", "hypoechoic"], n_patients, p=[0.4, 0.3, 0.3])
    malignant = rng.permutation(n_patients) < n_patients // 2
    return ["irregular" if m else str(b) for m, b in zip(malignant, benign)]


def _check_site_folders(folders: list[Path], overwrite: bool) -> None:
    for folder in folders:
        if folder.exists() and not folder.is_dir():
            raise FileExistsError(f"{folder} exists and is not a folder; choose another output folder")
        if folder.is_dir() and any(folder.iterdir()) and not overwrite:
            raise FileExistsError(f"{folder} is not empty; pass overwrite=True (CLI: --overwrite) to "
                                  "replace its images/, masks/, manifest.csv and dataset.yaml")


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8", newline="")
    os.replace(tmp, path)


def _write_site(folder: Path, task: str, site: int, per_site: int, size: int, seed: int,
                on_image: Callable[[], None] | None) -> None:
    """Write one site's dataset folder (images, masks, manifest.csv, then dataset.yaml)."""
    for sub in ("images", "masks"):
        shutil.rmtree(folder / sub, ignore_errors=True)
    (folder / "images").mkdir(parents=True)
    if task == "segmentation":
        (folder / "masks").mkdir()
    profile = profile_for_site(site)
    rng = np.random.default_rng([seed, site])  # site-level draws: patients, splits, lesion kinds
    patient_of = _patients(per_site, rng)
    split_of = _split_of_patients(patient_of[-1] + 1, rng)
    lesion_of = _patient_lesions(task, len(split_of), rng)
    extra = {"classification": "label", "segmentation": "mask", "pretrain": "anatomy"}[task]
    rows = [("image", "patient", "split", extra)]
    width = max(5, len(str(per_site - 1)))
    for i, p in enumerate(patient_of):
        img_rng = np.random.default_rng([seed, site, i])
        scene = str(img_rng.choice(list(SCENES))) if task == "pretrain" else None
        sample = generate_image(img_rng, size, profile, scene=scene, lesion=lesion_of[p])
        name = f"{i:0{width}d}.png"
        Image.fromarray(sample.image, mode="L").save(folder / "images" / name)
        if task == "segmentation":
            Image.fromarray(sample.mask, mode="L").save(folder / "masks" / name)
            value = f"masks/{name}"
        elif task == "classification":
            value = sample.label or ""
        else:
            value = manifest_anatomy(sample.anatomy or "", img_rng)
        rows.append((f"images/{name}", f"site{site:02d}_p{p:04d}", split_of[p], value))
        if on_image is not None:
            on_image()
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows(rows)
    _write_text_atomic(folder / "manifest.csv", text.getvalue())
    meta: dict[str, Any] = {"name": f"synthetic_{task}_site_{site:02d}", "task": task, "channels": 1}
    if task == "classification":
        meta["classes"] = list(CLASSES)
    elif task == "segmentation":
        meta["labels"] = {0: "background", 1: "lesion"}
    meta |= {"device_profile": profile, "synthetic": True}
    header = (f"# Synthetic ultrasound dataset written by echocare_core.data.synthetic "
              f"(seed {seed}, site {site}, {per_site} images of {size}x{size}).\n")
    _write_text_atomic(folder / "dataset.yaml", header + yaml.safe_dump(meta, sort_keys=False))
    logger.debug("wrote %s: %d images, %d patients, profile %s", folder, per_site, len(split_of), profile)


def write_dataset(out: Path | str, task: str, sites: int, per_site: int, size: int = 128, seed: int = 0,
                  *, overwrite: bool = False, on_image: Callable[[], None] | None = None) -> list[Path]:
    """Write one synthetic dataset folder per site, `out/site_00`, `out/site_01`, ...

    Each folder follows the site data contract: dataset.yaml, manifest.csv (image, patient, split and
    label / mask / anatomy), images/ and, for segmentation, masks/ (PNG, values 0/1). Site i uses the
    device profile `profile_for_site(i)`; its content depends only on (seed, i), not on `sites`.

    Args:
        out: parent folder; created if missing.
        task: one of TASKS.
        sites: number of site folders, >= 1.
        per_site: images per site, >= 1.
        size: image height and width in pixels.
        seed: base seed; the same seed writes byte-identical files.
        overwrite: replace images/, masks/, manifest.csv and dataset.yaml in non-empty site folders.
        on_image: called once after each image is written (progress reporting).

    Returns:
        The site folders, in site order.

    Raises:
        ValueError: if task, sites, per_site or size is invalid.
        FileExistsError: if a site folder is not empty and overwrite is False, or is a file.
    """
    task = lookup_option("task", task, TASKS)
    for key, value in (("sites", sites), ("per_site", per_site)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be an integer >= 1, got {value!r}")
    if not isinstance(size, int) or not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"size must be an integer in [{MIN_SIZE}, {MAX_SIZE}], got {size!r}")
    folders = [Path(out) / f"site_{i:02d}" for i in range(sites)]
    _check_site_folders(folders, overwrite)
    for site, folder in enumerate(folders):
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("dataset.yaml", "manifest.csv"):  # an interrupted rewrite must not look complete
            (folder / name).unlink(missing_ok=True)
        _write_site(folder, task, site, per_site, size, seed, on_image)
    return folders
