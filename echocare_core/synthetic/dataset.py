"""Synthetic dataset folders (the site data contract of `echocare_core.data.contract`), one per simulated site.

Each site gets its own device profile, patients with 1-3 images (or echo clips) each, a
patient-grouped train/val/test split and the task's label column; see `write_dataset`.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, UltrasoundMultiFrameImageStorage

from echocare_core.data.contract import task_column
from echocare_core.files import write_atomic
from echocare_core.synthetic.ultrasound import (
    CLASSES,
    ENHANCEMENT_PAIR,
    LANDMARK_NAMES,
    LESIONS,
    MAX_SIZE,
    MIN_SIZE,
    SCENES,
    SPLIT_FRACTIONS,
    TASKS,
    generate_echo_clip,
    generate_image,
    lookup_option,
    profile_for_site,
)

__all__ = [
    "CLIP_FRAMES",
    "DETECTION_CLASSES",
    "REPORT_FINDINGS",
    "keep_patients",
    "lesion_report",
    "manifest_anatomy",
    "pool_sites",
    "write_dataset",
]

logger = logging.getLogger(__name__)

DETECTION_CLASSES = ("cyst", "solid")  # box class of a lesion kind: cyst, else solid
CLIP_FRAMES = 16  # one cardiac cycle per regression clip, frame 0 at end-diastole
EF_RANGE = (20.0, 75.0)  # ejection fraction (%), uniform per patient
ED_SCALE_RANGE = (0.85, 1.1)  # end-diastolic ventricle size; above ~1.1 the septum thins to nothing
_FRAME_TIME_MS = 1000.0 / CLIP_FRAMES  # one beat a second (60 beats per minute)
FIELD_MM = 40.0  # report: the image's width in millimetres
# report: what each lesion kind looks like, in words (echogenicity, margin, behind the lesion, impression)
_REPORT_WORDS = {
    "cyst": ("anechoic", "smooth", "posterior acoustic enhancement", "likely benign"),
    "hypoechoic": ("hypoechoic", "smooth", "", "likely benign"),
    "hyperechoic": ("hyperechoic", "smooth", "", "likely benign"),
    "irregular": ("hypoechoic", "irregular", "posterior acoustic shadowing", "suspicious for malignancy"),
}
REPORT_FINDINGS = (
    "anechoic",
    "hypoechoic",
    "hyperechoic",
    "irregular margin",
    "posterior acoustic enhancement",
    "posterior acoustic shadowing",
)


@dataclass(frozen=True)
class _Site:
    """What every sample of one site folder shares."""

    folder: Path
    task: str
    index: int
    size: int
    seed: int
    profile: str


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


def _patient_lesions(task: str, n_patients: int, rng: np.random.Generator) -> list[str | tuple[str, ...] | None]:
    """Lesion kind(s) per patient (their images are views of the same lesions); for classification,
    half the patients (rounded down) have a malignant lesion; for detection, 1 or 2 lesions, half cysts."""
    if task == "pretrain":
        return [None] * n_patients
    if task in ("segmentation", "landmarks"):
        return [str(k) for k in rng.choice(LESIONS, n_patients)]
    if task == "detection":
        counts = rng.integers(1, 3, n_patients)
        kinds = rng.choice(LESIONS, (n_patients, 2), p=[0.5, 1 / 6, 1 / 6, 1 / 6])
        return [tuple(str(k) for k in row[:n]) for row, n in zip(kinds, counts)]
    benign = rng.choice(["cyst", "hyperechoic", "hypoechoic"], n_patients, p=[0.4, 0.3, 0.3])
    malignant = rng.permutation(n_patients) < n_patients // 2
    return ["irregular" if m else str(b) for m, b in zip(malignant, benign)]


def _patient_hearts(n_patients: int, rng: np.random.Generator) -> list[tuple[float, float]]:
    """(ejection fraction in %, rounded to 0.1, end-diastolic ventricle scale) per patient."""
    ef = np.round(rng.uniform(*EF_RANGE, n_patients), 1)
    ed_scale = rng.uniform(*ED_SCALE_RANGE, n_patients)
    return [(float(e), float(s)) for e, s in zip(ef, ed_scale)]


def _check_site_folders(folders: list[Path], overwrite: bool) -> None:
    for folder in folders:
        if folder.exists() and not folder.is_dir():
            raise FileExistsError(f"{folder} exists and is not a folder; choose another output folder")
        if folder.is_dir() and any(folder.iterdir()) and not overwrite:
            raise FileExistsError(
                f"{folder} is not empty; pass overwrite=True (CLI: --overwrite) to "
                "replace its images/, masks/, clips/, manifest.csv and dataset.yaml"
            )


def _write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, text)


def _write_site(
    folder: Path, task: str, site: int, per_site: int, size: int, seed: int, on_image: Callable[[], None] | None
) -> None:
    """Write one site's dataset folder (images or clips, masks, manifest.csv, then dataset.yaml)."""
    for sub in ("images", "masks", "clips", "targets"):
        shutil.rmtree(folder / sub, ignore_errors=True)
    (folder / ("clips" if task == "regression" else "images")).mkdir(parents=True)
    if task in ("segmentation", "enhancement"):
        (folder / ("masks" if task == "segmentation" else "targets")).mkdir()
    ctx = _Site(folder, task, site, size, seed, profile_for_site(site))
    rng = np.random.default_rng([seed, site])  # site-level draws: patients, splits, lesions or hearts
    patient_of = _patients(per_site, rng)
    split_of = _split_of_patients(patient_of[-1] + 1, rng)
    draw_of = (
        _patient_hearts(len(split_of), rng) if task == "regression" else _patient_lesions(task, len(split_of), rng)
    )
    rows = [("image", "patient", "split", task_column(task) or "anatomy", *(["image2"] if task == "report" else []))]
    width = max(5, len(str(per_site - 1)))
    for i, p in enumerate(patient_of):
        patient, img_rng = f"site{site:02d}_p{p:04d}", np.random.default_rng([seed, site, i])
        image, *values = _write_sample(ctx, f"{i:0{width}d}", img_rng, draw_of[p], patient)
        rows.append((image, patient, split_of[p], *values))
        if on_image is not None:
            on_image()
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows(rows)
    _write_text_atomic(folder / "manifest.csv", text.getvalue())
    what = f"clips of {CLIP_FRAMES} frames" if task == "regression" else "images"
    header = (
        f"# Synthetic ultrasound dataset written by echocare_core.synthetic.ultrasound "
        f"(seed {seed}, site {site}, {per_site} {what} of {size}x{size}).\n"
    )
    _write_text_atomic(folder / "dataset.yaml", header + yaml.safe_dump(_site_meta(ctx), sort_keys=False))
    logger.debug("wrote %s: %d %s, %d patients, profile %s", folder, per_site, what, len(split_of), ctx.profile)


def _site_meta(site: _Site) -> dict[str, Any]:
    """The content of dataset.yaml."""
    meta: dict[str, Any] = {"name": f"synthetic_{site.task}_site_{site.index:02d}", "task": site.task, "channels": 1}
    if site.task == "classification":
        meta["classes"] = list(CLASSES)
    elif site.task == "segmentation":
        meta["labels"] = {0: "background", 1: "lesion"}
    elif site.task == "landmarks":
        meta["landmark_names"] = list(LANDMARK_NAMES)
    elif site.task == "detection":
        meta["classes"] = list(DETECTION_CLASSES)
    elif site.task == "regression":
        meta["target_name"] = "ejection_fraction"
    elif site.task == "enhancement":
        return meta | {"device_profile": "->".join(ENHANCEMENT_PAIR), "synthetic": True}
    elif site.task == "report":
        meta["findings"] = list(REPORT_FINDINGS)
    return meta | {"device_profile": site.profile, "synthetic": True}


def lesion_report(kind: str, box: np.ndarray, size: int) -> str:
    """The templated report of one lesion: size (its box's width), echogenicity, location, margin, what is behind
    it and an impression; each of REPORT_FINDINGS is stated only when present."""
    echo, margin, behind, impression = _REPORT_WORDS[kind]
    x, y = (box[0] + box[2]) / 2 / size, (box[1] + box[3]) / 2 / size
    side = "left" if x < 1 / 3 else "central" if x < 2 / 3 else "right"
    mm = max(1, round(float(box[2] - box[0]) / size * FIELD_MM))
    article = "An" if str(mm).startswith("8") or mm in (11, 18) else "A"
    text = (
        f"{article} {mm} mm {echo} nodule in the {side} {'superficial' if y < 0.5 else 'deep'} field, with "
        f"{'an' if margin == 'irregular' else 'a'} {margin} margin{f' and {behind}' if behind else ''}."
    )
    return f"{text} Impression: {impression}."


def _write_sample(site: _Site, name: str, rng: np.random.Generator, draw: Any, patient: str) -> tuple[str, ...]:
    """Write one sample's files; return its manifest `image` path and task column value (report: and `image2`)."""
    if site.task == "regression":
        ef, ed_scale = draw
        frames = generate_echo_clip(
            rng, site.size, site.profile, ejection_fraction=ef, ed_scale=ed_scale, frames=CLIP_FRAMES
        )  # [T, H, W]
        _save_clip(site.folder / "clips" / f"{name}.dcm", frames, patient, site.seed)
        return f"clips/{name}.dcm", f"{ef:.1f}"
    if site.task == "enhancement":  # the same phantom (same draws) by a low-end and a high-end device
        state = rng.bit_generator.state
        low = generate_image(rng, site.size, ENHANCEMENT_PAIR[0], lesion=draw).image
        rng.bit_generator.state = state
        Image.fromarray(low, mode="L").save(site.folder / "images" / f"{name}.png")
        high = generate_image(rng, site.size, ENHANCEMENT_PAIR[1], lesion=draw).image
        Image.fromarray(high, mode="L").save(site.folder / "targets" / f"{name}.png")
        return f"images/{name}.png", f"targets/{name}.png"
    if site.task == "report":  # two images of one study: the same phantom by the site's and another device
        state = rng.bit_generator.state
        sample = generate_image(rng, site.size, site.profile, lesion=draw)
        rng.bit_generator.state = state
        Image.fromarray(sample.image, mode="L").save(site.folder / "images" / f"{name}.png")
        second = generate_image(rng, site.size, profile_for_site(site.index + 1), lesion=draw).image
        Image.fromarray(second, mode="L").save(site.folder / "images" / f"{name}_view2.png")
        return f"images/{name}.png", lesion_report(draw, sample.boxes[0], site.size), f"images/{name}_view2.png"
    scene = str(rng.choice(list(SCENES))) if site.task == "pretrain" else None
    sample = generate_image(rng, site.size, site.profile, scene=scene, lesion=draw)
    Image.fromarray(sample.image, mode="L").save(site.folder / "images" / f"{name}.png")
    if site.task == "segmentation":
        Image.fromarray(sample.mask, mode="L").save(site.folder / "masks" / f"{name}.png")
        value = f"masks/{name}.png"
    elif site.task == "classification":
        value = sample.label or ""
    elif site.task == "landmarks":
        # + 0.0 turns a rounded -0.0 into 0.0
        value = json.dumps([[round(float(c), 2) + 0.0 for c in point] for point in sample.calipers[0]])
    elif site.task == "detection":
        value = json.dumps(
            [[*map(int, box), "cyst" if kind == "cyst" else "solid"] for box, kind in zip(sample.boxes, sample.lesions)]
        )
    else:
        value = manifest_anatomy(sample.anatomy or "", rng)
    return f"images/{name}.png", value


def _save_clip(path: Path, frames: np.ndarray, patient: str, seed: int) -> None:
    """Write [T, H, W] uint8 frames as a multi-frame ultrasound DICOM (Explicit VR Little Endian).

    UIDs are derived from (seed, patient, file name): one study per patient, one series per clip.
    No date or time is written, so the same arguments give the same bytes. Nothing here is real
    patient data.
    """
    study = f"{seed}/{patient}"
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.set_pixel_data(frames, "MONOCHROME2", 8, generate_instance_uid=False)
    ds.SOPClassUID = UltrasoundMultiFrameImageStorage
    ds.StudyInstanceUID = _uid(f"study/{study}")
    ds.SeriesInstanceUID = _uid(f"series/{study}/{path.stem}")
    ds.SOPInstanceUID = _uid(f"instance/{study}/{path.stem}")
    ds.Modality = "US"
    ds.Manufacturer = "echocare synthetic"
    ds.PatientName = f"SYNTHETIC^{patient}"
    ds.PatientID = patient
    ds.FrameTime = _FRAME_TIME_MS
    ds.FrameIncrementPointer = 0x00181063  # (0018,1063) Frame Time
    ds.save_as(path, enforce_file_format=True)


def _uid(key: str) -> str:
    """A UUID-derived DICOM UID ("2.25." + the UUID as an integer), the same for the same key."""
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_URL, f'echocare-synthetic:{key}').int}"


def write_dataset(
    out: Path | str,
    task: str,
    sites: int,
    per_site: int,
    size: int = 128,
    seed: int = 0,
    *,
    overwrite: bool = False,
    on_image: Callable[[], None] | None = None,
) -> list[Path]:
    """Write one synthetic dataset folder per site, `out/site_00`, `out/site_01`, ...

    Each folder follows the site data contract: dataset.yaml, manifest.csv (columns image, patient,
    split and the task's: label, mask, anatomy, landmarks, boxes or target) and the files. Per task:

    - classification: images/NNNNN.png, label benign/malignant.
    - segmentation: images/ and masks/NNNNN.png (values 0/1), mask = "masks/NNNNN.png".
    - pretrain: images/ of random scenes, anatomy = an ontology path stopped at a random depth.
    - landmarks: one lesion per image; landmarks = JSON [[x, y], ...] pixel coordinates (2 decimals)
      of its calipers in LANDMARK_NAMES order (dataset.yaml landmark_names).
    - detection: 1 or 2 lesions; boxes = JSON [[x1, y1, x2, y2, class], ...], integer pixel edges
      (x2, y2 exclusive) of each lesion's mask, class from DETECTION_CLASSES.
    - regression: clips/NNNNN.dcm, 16-frame apical four-chamber cycles (multi-frame DICOM);
      target = ejection fraction in % (1 decimal), dataset.yaml target_name: ejection_fraction.
    - enhancement: images/NNNNN.png by a low-end portable convex probe and targets/NNNNN.png, the same
      phantom (lesions and tissue from the same draws; speckle differs with the probe's line density and
      blur) by a high-end convex probe; target_image = the latter.
    - report: one lesion per study, imaged by the site's device (`image`) and by the next site's (`image2`, the
      same phantom); report = a templated sentence of its size, echogenicity, location, margin and what lies
      behind it (`lesion_report`), dataset.yaml findings: REPORT_FINDINGS.

    Site i uses the device profile `profile_for_site(i)` (enhancement: always the pair ENHANCEMENT_PAIR); its
    content depends only on (seed, i), not on `sites`.

    Args:
        out: parent folder; created if missing.
        task: one of TASKS.
        sites: number of site folders, >= 1.
        per_site: images (clips) per site, >= 1.
        size: image height and width in pixels.
        seed: base seed; the same seed writes byte-identical files.
        overwrite: replace images/, masks/, clips/, manifest.csv and dataset.yaml in non-empty site folders.
        on_image: called once after each image or clip is written (progress reporting).

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


def _manifest_text(rows: list[dict[str, str]]) -> str:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def keep_patients(folder: Path, share: float) -> None:
    """Make a smaller site: keep the first `share` of each split's patients (at least one per split); the
    images stay on disk."""
    with (folder / "manifest.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    keep = set()
    for split in dict.fromkeys(r["split"] for r in rows):
        patients = list(dict.fromkeys(r["patient"] for r in rows if r["split"] == split))
        keep |= set(patients[: max(1, round(share * len(patients)))])
    _write_text_atomic(folder / "manifest.csv", _manifest_text([r for r in rows if r["patient"] in keep]))


def pool_sites(sites: list[Path], out: Path) -> Path:
    """One dataset of all sites' rows (file columns made absolute, splits kept): the centralised baseline
    that real hospitals cannot build."""
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for site in sites:
        with (site / "manifest.csv").open(newline="") as f:
            rows += [
                {**r, **{c: str(site / r[c]) for c in ("image", "mask", "target_image") if r.get(c)}}
                for r in csv.DictReader(f)
            ]
    _write_text_atomic(out / "manifest.csv", _manifest_text(rows))
    _write_text_atomic(out / "dataset.yaml", (sites[0] / "dataset.yaml").read_text(encoding="utf-8"))
    return out
