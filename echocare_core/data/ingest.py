"""`echocare-data ingest`: a site's ultrasound archive in, a clean anonymised dataset out (paper section 4.4).

For every file under the source folder (DICOM single- or multi-frame, PNG/JPG/BMP/TIFF, and cine videos
when PyAV is installed):

1. frames: a still gives one; a cine loop every `frame_step`-th frame (paper: 10);
2. scan region: the ultrasound sector or rectangle is found as the largest connected textured region (in
   a cine, the pixels that change between frames: burned-in text, logos, rulers and colour bars are
   static); everything outside its convex hull is blanked and the image cropped to it; in a cine, small
   saturated marks that stay put inside it (text, markers) are blanked too (in a still they cannot be told
   from bright anatomy such as calcifications, so they stay);
3. frames with fewer than `min_nonzero` non-zero pixels are dropped, and so are near-duplicates of a frame
   already kept for the same patient (64-bit perceptual hash within `dedup_bits`);
4. what is kept is written as PNG under fresh names (`images/000001.png`), with a manifest row that
   carries a pseudonymous patient id (HMAC-SHA256 of the patient id under the site's secret, so patient-
   level splits still work and the same patient gets the same id in every run) and an allow-list of
   device fields (manufacturer, model, transducer, frequency, modality); no other tag, no date, no name,
   no source path reaches the dataset. Classification labels are the class folders the site lists.

What became of each file and frame goes to a log outside the dataset (mode 0600: it maps the output back
to source files). `data_card` summarises a dataset with counts only, for the coordinator.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import os
import secrets
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image, ImageDraw
from pydicom import dcmread
from pydicom.multival import MultiValue
from scipy import ndimage
from scipy.fft import dct
from scipy.spatial import ConvexHull, QhullError

from echocare_core.data.contract import load_spec, patient_splits, read_manifest
from echocare_core.data.io import ImageReadError, is_dicom, is_image_file, read_frames, read_image
from echocare_core.files import write_atomic

__all__ = [
    "DEVICE_COLUMNS",
    "IngestResult",
    "IngestSettings",
    "data_card",
    "ingest",
    "load_secret",
    "phash",
    "pseudonym",
    "scan_region",
]

DEVICE_COLUMNS = ("manufacturer", "model", "transducer", "frequency_mhz", "modality")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".wmv", ".mpg", ".mpeg")
_DOPPLER_TYPES = {2, 3, 4}  # RegionDataType: colour flow, PW, CW
REGION_FRAMES = 32  # frames (evenly spaced) a cine's scan region is found from


@dataclass(frozen=True)
class IngestSettings:
    frame_step: int = 10  # cine loops: every k-th frame
    min_nonzero: int = 1000  # drop frames with fewer non-zero pixels (after the scan region is cut out)
    dedup_bits: int = 4  # drop a frame within this Hamming distance (of 64) of one kept for the patient; -1: off
    task: str = "pretrain"  # pretrain (unlabelled) | classification (class = first folder level under SRC)
    classes: tuple[str, ...] = ()  # classification: the class folders to read (others are left out)

    def __post_init__(self) -> None:
        if self.frame_step < 1 or self.min_nonzero < 0 or not -1 <= self.dedup_bits <= 64:
            raise ValueError(
                f"need frame_step >= 1, min_nonzero >= 0 and -1 <= dedup_bits <= 64; got "
                f"{self.frame_step}, {self.min_nonzero}, {self.dedup_bits}"
            )
        if self.task not in ("pretrain", "classification"):
            raise ValueError(
                f"task {self.task!r}: ingest makes pretrain or classification datasets (labels from "
                f"folder names); other tasks need their annotation columns added to the manifest"
            )
        if (self.task == "classification") != bool(self.classes) or len(set(self.classes)) < len(self.classes):
            raise ValueError(
                f"classes {list(self.classes)}: classification needs the class folders listed "
                f"(--classes benign malignant), each once; pretrain takes none"
            )


@dataclass
class IngestResult:
    out: Path
    log: Path
    files: int = 0
    images: int = 0
    patients: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> frames or files


def load_secret(path: Path) -> tuple[bytes, bool]:
    """The site's pseudonymisation secret (32 random bytes, mode 0600), made when `path` does not exist.
    Returns it and whether it was made now.

    Raises:
        ValueError: the file is shorter than 16 bytes, or others than its owner may read it.
    """
    if path.is_file():
        if path.stat().st_mode & 0o077:
            raise ValueError(f"{path}: a site secret must be readable by its owner only (chmod 600 {path})")
        secret = path.read_bytes()
        if len(secret) < 16:
            raise ValueError(f"{path}: a site secret has at least 16 bytes; this file has {len(secret)}")
        return secret, False
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secrets.token_bytes(32))
    return path.read_bytes(), True


def pseudonym(secret: bytes, patient: str) -> str:
    """A stable pseudonymous patient id: the first 16 hex digits of HMAC-SHA256(secret, patient id)."""
    return hmac.new(secret, patient.encode("utf-8"), hashlib.sha256).hexdigest()[:16]


def phash(img: np.ndarray) -> int:
    """64-bit perceptual hash (the DCT hash of imagehash.phash): the 8x8 lowest frequencies of a 32x32
    grayscale thumbnail, each above or below their median."""
    gray = Image.fromarray(img).convert("L").resize((32, 32), Image.Resampling.LANCZOS)
    low = dct(dct(np.asarray(gray, np.float64), axis=0), axis=1)[:8, :8]
    return int("".join("1" if b else "0" for b in (low > np.median(low)).ravel()), 2)


def _gray(frame: np.ndarray) -> np.ndarray:
    return frame.max(axis=-1) if frame.ndim == 3 else frame


def _largest(candidate: np.ndarray) -> np.ndarray | None:
    """The largest connected component after an opening (specks out), closed and filled (padded, so that a
    region touching the border keeps its edge)."""
    pad = 4
    candidate = ndimage.binary_opening(np.pad(candidate, pad), iterations=2)
    labels, n = ndimage.label(candidate)
    if n == 0:
        return None
    largest = labels == (int(np.argmax(np.bincount(labels.ravel())[1:])) + 1)
    return ndimage.binary_fill_holes(ndimage.binary_closing(largest, iterations=3))[pad:-pad, pad:-pad]


def _textured(gray: np.ndarray) -> np.ndarray:
    """Pixels with speckle: not black and a local (5 x 5) standard deviation above 2 grey levels."""
    g = gray.astype(np.float32)
    mean = ndimage.uniform_filter(g, 5)
    return (g > 4) & (np.sqrt(np.maximum(ndimage.uniform_filter(g * g, 5) - mean * mean, 0)) > 2.0)


def scan_region(frames: list[np.ndarray]) -> np.ndarray | None:
    """Boolean `[H, W]` mask of the ultrasound scan region (sector or rectangle), filled to its convex hull;
    None when no region is found.

    In a cine (2 frames or more) it is where the pixels change between frames (over at most `REGION_FRAMES`
    evenly spaced ones); in a still, or a cine where less than 1% of the image changes (a frozen loop), where
    there is speckle texture. The largest connected component of that, closed and filled.
    """
    picked = [frames[i] for i in np.linspace(0, len(frames) - 1, min(len(frames), REGION_FRAMES)).astype(int)]
    grays = np.stack([_gray(f) for f in picked]).astype(np.float32)  # [T, H, W]
    moving = grays.std(axis=0) > 1.0 if len(grays) > 1 else None
    candidate = moving if moving is not None and moving.mean() > 0.01 else _textured(grays[0])
    largest = _largest(candidate)
    if largest is None:
        return None
    points = np.argwhere(largest)
    try:
        hull = points[ConvexHull(points).vertices]
    except (QhullError, ValueError):  # a line or a few points: nothing that looks like a scan
        return None
    canvas = Image.new("1", (largest.shape[1], largest.shape[0]), 0)
    ImageDraw.Draw(canvas).polygon([(int(x), int(y)) for y, x in hull], fill=1)
    return np.asarray(canvas, bool) | largest


def static_marks(frames: list[np.ndarray]) -> np.ndarray | None:
    """In a cine, the pixels that are near-white (>= 250) in every frame: burned-in text, markers and
    calipers stay put while anatomy moves (None for a still, where they cannot be told apart)."""
    if len(frames) < 2:
        return None
    marks = np.logical_and.reduce([_gray(f) >= 250 for f in frames])
    return ndimage.binary_dilation(marks, iterations=1) if marks.any() else None


def _clean(frame: np.ndarray, mask: np.ndarray, marks: np.ndarray | None) -> np.ndarray:
    """The frame zero outside the mask and on `marks`, cut to the mask's bounding box."""
    keep = mask & ~marks if marks is not None else mask
    ys, xs = np.nonzero(mask)
    box = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
    return np.where(keep[..., None] if frame.ndim == 3 else keep, frame, 0)[box]


def _video_frames(path: Path, step: int) -> list[np.ndarray]:
    try:
        import av
    except ImportError as exc:
        raise ImageReadError(f"{path}: reading videos needs PyAV (pip install av)") from exc
    try:
        with av.open(str(path)) as container:
            frames = [f.to_ndarray(format="rgb24") for i, f in enumerate(container.decode(video=0)) if i % step == 0]
    except av.FFmpegError as exc:
        raise ImageReadError(f"{path}: cannot decode video ({type(exc).__name__})") from exc
    gray = all(int(np.ptp(f[::8, ::8].astype(np.int16), axis=-1).max()) <= 4 for f in frames[:5])  # codec noise
    return [f[..., 0].copy() for f in frames] if gray else frames


def _header(path: Path) -> Any:
    try:
        return dcmread(path, stop_before_pixels=True, force=True)
    except Exception:  # noqa: BLE001 - the pixel reader reports what is wrong with the file
        return None


def _device(ds: Any) -> dict[str, str]:
    """The allow-listed device fields of a DICOM header (nothing that names a person, a place or a date).

    Raises:
        ValueError, TypeError, AttributeError: a malformed field (e.g. a frequency that is not a number).
    """
    if ds is None:
        return dict.fromkeys(DEVICE_COLUMNS, "")
    regions = list(ds.get("SequenceOfUltrasoundRegions", []))
    freq = next((float(r.TransducerFrequency) / 1000 for r in regions if r.get("TransducerFrequency")), None)
    text = " ".join([*map(str, ds.get("ImageType", [])), str(ds.get("SeriesDescription", ""))]).upper()
    modality = "b-mode"
    if any(int(r.get("RegionDataType", 0)) in _DOPPLER_TYPES for r in regions) or "DOPPLER" in text:
        modality = "doppler"
    elif any(int(r.get("RegionSpatialFormat", 0)) == 2 for r in regions) or "M-MODE" in text:
        modality = "m-mode"
    if any(k in text for k in ("ELAST", "SWE", "STRAIN")):
        modality = "elastography"
    if (
        ds.get("ContrastBolusAgent")
        or "ContrastBolusAgentSequence" in ds
        or any(k in text for k in ("CEUS", "CONTRAST"))
    ):
        modality = "ceus"
    transducer = ds.get("TransducerData") or ds.get("TransducerType") or ""
    if isinstance(transducer, MultiValue):
        transducer = transducer[0]
    return {
        "manufacturer": str(ds.get("Manufacturer", "")).strip(),
        "model": str(ds.get("ManufacturerModelName", "")).strip(),
        "transducer": str(transducer).strip(),
        "frequency_mhz": f"{freq:g}" if freq else "",
        "modality": modality,
    }


def _patient_key(ds: Any, rel: str, top: int) -> str:
    """What identifies the patient before pseudonymisation: PatientID, else the name, else the study; without a
    DICOM header, the folder that holds the file when it lies `top` + 1 folders deep or more (one folder per
    patient, below the class folders), else the file itself."""
    for key in ("PatientID", "PatientName", "StudyInstanceUID"):
        value = str(ds.get(key, "")).strip() if ds is not None else ""
        if value:
            return f"{key}:{value}"
    parts = rel.split("/")
    return f"folder:{'/'.join(parts[top:-1])}" if len(parts) > top + 1 else f"file:{rel}"


def _skipped(rel: str) -> bool:
    """System files and folders: hidden (.DS_Store, .thumbnails), NAS and macOS metadata (@eaDir, __MACOSX)."""
    return any(part.startswith((".", "@", "__")) for part in rel.split("/"))


def _frames(path: Path, step: int) -> list[np.ndarray]:
    if path.suffix.lower() in VIDEO_SUFFIXES:
        return _video_frames(path, step)
    if not is_image_file(path):
        raise ImageReadError("not an image, DICOM or video file")
    return read_frames(path, step)


def ingest(
    src: str | Path,
    out: str | Path,
    secret: bytes,
    settings: IngestSettings = IngestSettings(),
    log: str | Path | None = None,
    on_file: Callable[[int, int], None] | None = None,
) -> IngestResult:
    """Write the dataset of `src` to `out` (which must not exist; written under a temporary name, then renamed).

    Args:
        secret: the site's pseudonymisation secret (`load_secret`).
        log: where to write what became of each file (default: `<out>.ingest.csv` beside `out`; mode 0600).
        on_file: called with (files done, files in all) as the files go (a progress bar).

    Raises:
        FileExistsError: `out` exists.
        FileNotFoundError: `src` is not a folder.
        ValueError: nothing usable was found (the log says why for each file).
    """
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise FileNotFoundError(f"{src} is not a folder")
    if out.exists():
        raise FileExistsError(f"{out} exists: choose a new output folder (nothing is overwritten)")
    sources = sorted(p for p in src.rglob("*") if p.is_file() and not _skipped(p.relative_to(src).as_posix()))
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    result = IngestResult(out, Path(log) if log else out.with_name(f"{out.name}.ingest.csv"), files=len(sources))
    rows, outcomes, seen = [], [], {}  # seen: pseudonym -> hashes kept
    colour, top = False, int(settings.task == "classification")
    try:
        for done, path in enumerate(sources):
            if on_file:
                on_file(done, len(sources))
            rel = path.relative_to(src).as_posix()
            label = rel.split("/")[0] if top and "/" in rel else ""
            if top and label not in settings.classes:
                outcomes.append((rel, "", f"not in a class folder ({', '.join(settings.classes)})"))
                result.dropped["not in a class folder"] += 1
                continue
            try:
                frames = _frames(path, settings.frame_step)
                header = _header(path) if is_dicom(path) else None
                device = _device(header)
            except ImageReadError as exc:
                outcomes.append((rel, "", f"unreadable: {exc}"))
                result.dropped["unreadable"] += 1
                continue
            except (ValueError, TypeError, AttributeError) as exc:  # a malformed device field in the header
                outcomes.append((rel, "", f"unreadable DICOM header ({type(exc).__name__}: {exc})"))
                result.dropped["unreadable"] += 1
                continue
            mask = scan_region(frames)
            if mask is None:
                outcomes.append((rel, "", "no scan region found"))
                result.dropped["no scan region"] += len(frames)
                continue
            patient, marks = pseudonym(secret, _patient_key(header, rel, top)), static_marks(frames)
            for index, frame in enumerate(frames):
                where = f"frame {index * settings.frame_step}" if len(frames) > 1 else ""
                clean = _clean(frame, mask, marks)
                if int(np.count_nonzero(_gray(clean))) < settings.min_nonzero:
                    outcomes.append((rel, where, f"near-empty (< {settings.min_nonzero} non-zero pixels)"))
                    result.dropped["near-empty"] += 1
                    continue
                code = phash(clean)
                kept = seen.setdefault(patient, [])
                if settings.dedup_bits >= 0 and any((code ^ k).bit_count() <= settings.dedup_bits for k in kept):
                    outcomes.append((rel, where, "near-duplicate of a frame kept for the same patient"))
                    result.dropped["near-duplicate"] += 1
                    continue
                kept.append(code)
                name = f"images/{len(rows) + 1:06d}.png"
                Image.fromarray(clean).save(tmp / name)
                rows.append({"image": name, "patient": patient, **({"label": label} if label else {}), **device})
                colour |= clean.ndim == 3
                outcomes.append((rel, where, f"kept as {name}"))
        if not rows:
            raise ValueError(
                f"no usable image in {src} ({', '.join(f'{k} {v}' for k, v in result.dropped.items())}"
                f"; see {result.log})"
            )
        spec = {
            "name": out.name,
            "task": settings.task,
            "channels": 3 if colour else 1,
            **({"classes": list(settings.classes)} if top else {}),
            "description": f"ingested by echocare-data ingest (frame_step {settings.frame_step}, min_nonzero "
            f"{settings.min_nonzero}, dedup_bits {settings.dedup_bits})",
        }
        (tmp / "dataset.yaml").write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
        with (tmp / "manifest.csv").open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(
                f, ["image", "patient", *(["label"] if settings.task == "classification" else []), *DEVICE_COLUMNS]
            )
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        _write_log(result.log, outcomes)
    if on_file:
        on_file(len(sources), len(sources))
    result.images, result.patients = len(rows), sum(1 for kept in seen.values() if kept)
    return result


def _write_log(path: Path, log: list[tuple[str, str, str]]) -> None:
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["source", "frame", "outcome"])
    writer.writerows(log)
    write_atomic(path, text.getvalue(), mode=0o600)  # it maps the dataset back to the source files


def data_card(folder: str | Path) -> dict[str, Any]:
    """Counts a coordinator may see: samples and patients per split, per class, device and modality, and image
    sizes. No id, no file name, no value of a single sample."""
    folder = Path(folder)
    spec, (columns, rows) = load_spec(folder), read_manifest(folder)
    splits = patient_splits(rows, 0) if "split" not in columns else [r["split"] for r in rows]
    sizes: Counter = Counter()
    for r in rows:
        height, width = read_image(folder / r["image"]).shape[1:]  # DICOM too
        sizes[f"{width}x{height}"] += 1
    card = {
        "name": spec.name,
        "task": spec.task,
        "samples": len(rows),
        "patients": len({r.get("patient", "") for r in rows}) if "patient" in columns else None,
        "splits": dict(Counter(splits)),
        "classes": dict(Counter(r["label"] for r in rows)) if "label" in columns else {},
        "devices": dict(
            Counter(" ".join(filter(None, (r.get("manufacturer"), r.get("model")))) or "unknown" for r in rows)
        ),
        "modalities": dict(Counter(r.get("modality") or "unknown" for r in rows)),
        "image_sizes": dict(sizes.most_common(10)),
        "image_size_kinds": len(sizes),
    }
    return card
