"""Decode one image file (PNG/JPEG/BMP/TIFF or DICOM) into a uint8 ``[C, H, W]`` array,
or a cine loop into ``[T, C, H, W]``.

This is the only place the toolkit turns bytes on disk into pixels for training,
so it runs in DataLoader workers over millions of files: it reads only what it
needs (DICOM headers with ``stop_before_pixels`` + ``specific_tags``, and only the
used frames of a cine loop) and keeps no global state.

Error messages name the file and what went wrong, never pixel values or DICOM
element values (patient data). The original exception is chained as
``__cause__`` for local debugging.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydicom import dcmread
from pydicom.datadict import DicomDictionary
from pydicom.dataset import Dataset
from pydicom.pixels import (
    apply_color_lut,
    apply_modality_lut,
    apply_voi_lut,
    get_decoder,
    iter_pixels,
)
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

logger = logging.getLogger(__name__)

__all__ = [
    "IMAGE_SUFFIXES",
    "ImageReadError",
    "count_frames",
    "is_dicom",
    "is_image_file",
    "nonzero_pixels",
    "read_clip",
    "read_frames",
    "read_image",
    "sampled_frames",
]

PathType = str | PathLike[str]

#: Lower-case suffixes (with the dot, as :attr:`pathlib.Path.suffix` gives them).
IMAGE_SUFFIXES: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom"})
_DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})
_DICM_OFFSET = 128  # the 128-byte preamble precedes the b"DICM" magic

# Everything in group 0028 (image pixel, frames, palette, rescale, VOI LUT): the
# reader skips all other elements, so patient data is never even parsed.
_HEADER_TAGS: list[int] = sorted(tag for tag in DicomDictionary if tag >> 16 == 0x0028)
_FRAMES_TAG = [0x00280008]  # NumberOfFrames

# Photometric interpretations whose 3-sample output pydicom's pixel_array (with the
# default raw=False) hands back as RGB: YBR_FULL(_422) are converted by pydicom, the
# JPEG 2000 ICT/RCT transforms are undone by the codec.
_RGB_LIKE = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT"})
_MONO = frozenset({"MONOCHROME1", "MONOCHROME2"})
# pydicom states plugin requirements by import name; PyPI ships GDCM as python-gdcm.
_PIP_NAMES = {"gdcm": "python-gdcm"}


class ImageReadError(Exception):
    """A file could not be decoded into an image (missing, corrupt, unsupported)."""


def is_image_file(path: PathType) -> bool:
    """Return whether ``path`` looks like an image this module can read.

    Matches :data:`IMAGE_SUFFIXES` case-insensitively. Files with no suffix, or
    a numeric one (DICOM files are often named by UID, e.g. ``1.2.840.113619.2``),
    are sniffed for the ``DICM`` magic at byte 128.

    Args:
        path: File path.

    Returns:
        True for a matching suffix or a sniffed DICOM file, else False.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return True
    if suffix and not suffix[1:].isdigit():
        return False
    return _has_dicm_magic(p)


def _has_dicm_magic(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            head = f.read(_DICM_OFFSET + 4)
    except OSError:
        return False
    return head[_DICM_OFFSET:] == b"DICM"


def is_dicom(path: Path) -> bool:
    """A DICOM file by its suffix, or by the DICM magic when the suffix says nothing."""
    suffix = path.suffix.lower()
    if suffix in _DICOM_SUFFIXES:
        return True
    if suffix in IMAGE_SUFFIXES:
        return False
    return _has_dicm_magic(path)


def sampled_frames(n_frames: int, step: int = 10) -> list[int]:
    """Return the frame indices used from a cine loop: ``0, step, 2*step, ...``.

    Args:
        n_frames: Number of frames in the file (>= 0).
        step: Distance between sampled frames (>= 1).

    Returns:
        Indices ``< n_frames``; empty when ``n_frames`` is 0.

    Raises:
        ValueError: If ``step < 1`` or ``n_frames < 0``.
    """
    if step < 1:
        raise ValueError(f"frame step must be >= 1, got {step}; use 1 to keep every frame")
    if n_frames < 0:
        raise ValueError(f"n_frames must be >= 0, got {n_frames}")
    return list(range(0, n_frames, step))


def nonzero_pixels(img: np.ndarray) -> int:
    """Count pixels where any channel is > 0.

    Args:
        img: ``[C, H, W]`` or ``[H, W]`` image (uint8 from :func:`read_image`).

    Returns:
        Number of (h, w) positions with a non-zero value in any channel.

    Raises:
        ValueError: If ``img`` is not 2-D or 3-D.
    """
    if img.ndim == 2:
        return int(np.count_nonzero(img))
    if img.ndim != 3:
        raise ValueError(f"expected an image of shape [C, H, W] or [H, W], got shape {img.shape}")
    return int(np.count_nonzero((img > 0).any(axis=0)))


def count_frames(path: PathType) -> int:
    """Return the number of frames in ``path`` (1 for non-DICOM images).

    For DICOM only the header is read (up to the pixel data, NumberOfFrames only).

    Args:
        path: Image file.

    Returns:
        NumberOfFrames for DICOM (1 when absent), else 1.

    Raises:
        ImageReadError: If the file is missing or its DICOM header is unreadable.
    """
    p = Path(path)
    if not p.is_file():
        raise ImageReadError(f"{p}: file not found")
    if not is_dicom(p):
        return 1
    try:
        hdr = dcmread(p, stop_before_pixels=True, force=True, specific_tags=_FRAMES_TAG)
        return max(int(hdr.get("NumberOfFrames") or 1), 1)
    except Exception as exc:
        raise ImageReadError(f"{p}: unreadable DICOM header ({type(exc).__name__})") from exc


def read_image(
    path: PathType,
    channels: int = 1,
    frame_step: int = 10,
    frame_pick: float | None = None,
) -> np.ndarray:
    """Decode an image file to a uint8 array ``[channels, H, W]``.

    Grayscale output is luminance (ITU-R 601-2, as Pillow's ``convert("L")``);
    ``channels=3`` keeps RGB or replicates gray. Data deeper than 8 bits is
    windowed (DICOM VOI LUT / window) or min-max scaled. For a multi-frame DICOM
    one frame of :func:`sampled_frames` ``(n, frame_step)`` is decoded: index
    ``int(frame_pick * len(sampled))``, or the first when ``frame_pick`` is None.

    Args:
        path: PNG/JPEG/BMP/TIFF or DICOM file.
        channels: 1 (grayscale) or 3 (RGB).
        frame_step: Step between candidate frames of a cine loop (>= 1).
        frame_pick: Position in ``[0, 1)`` among the candidate frames, or None.

    Returns:
        ``np.uint8`` array of shape ``[channels, H, W]``.

    Raises:
        ValueError: If ``channels``, ``frame_step`` or ``frame_pick`` is invalid.
        ImageReadError: If the file is missing or cannot be decoded.
    """
    _check_channels(channels)
    if frame_step < 1:
        raise ValueError(f"frame_step must be >= 1, got {frame_step}")
    if frame_pick is not None and not 0.0 <= frame_pick < 1.0:
        raise ValueError(f"frame_pick must be in [0, 1) or None, got {frame_pick}")

    def pick(n_frames: int) -> list[int]:
        candidates = sampled_frames(n_frames, frame_step)
        return [candidates[int(frame_pick * len(candidates)) if frame_pick is not None else 0]]

    images, order = _read_frames(Path(path), pick)
    return _to_channels(images[order[0]], channels)


def read_frames(path: PathType, frame_step: int = 10) -> list[np.ndarray]:
    """Decode the frames :func:`sampled_frames` ``(n, frame_step)`` picks from a cine loop (a still image: its
    one frame), each ``[H, W]`` (gray) or ``[H, W, 3]`` (colour) uint8, converted as by :func:`read_image`.

    Raises:
        ValueError: If ``frame_step < 1``.
        ImageReadError: If the file is missing or cannot be decoded.
    """
    images, order = _read_frames(Path(path), lambda n: sampled_frames(n, frame_step))
    return [images[k] for k in order]


def read_clip(path: PathType, channels: int = 1, frames: int = 16) -> np.ndarray:
    """Decode ``frames`` evenly spaced frames of a cine loop to a uint8 array ``[frames, channels, H, W]``.

    Of an ``n``-frame DICOM, frame ``t`` of the clip is file frame ``floor((t + 0.5) * n / frames)``
    (the middle of the t-th of ``frames`` equal stretches); only those frames are decoded. A still
    image (PNG etc. or a 1-frame DICOM) gives ``frames`` copies. Pixels are converted as by
    :func:`read_image`.

    Args:
        path: DICOM cine loop or still image file.
        channels: 1 (grayscale) or 3 (RGB).
        frames: Number of frames T to return (>= 1).

    Returns:
        ``np.uint8`` array of shape ``[frames, channels, H, W]``.

    Raises:
        ValueError: If ``channels`` or ``frames`` is invalid.
        ImageReadError: If the file is missing or cannot be decoded.
    """
    _check_channels(channels)
    if not isinstance(frames, int) or frames < 1:
        raise ValueError(f"frames must be an integer >= 1, got {frames!r}")

    def pick(n_frames: int) -> list[int]:
        return [(2 * t + 1) * n_frames // (2 * frames) for t in range(frames)]  # floor((t + 0.5) n / T)

    images, order = _read_frames(Path(path), pick)
    converted = [_to_channels(img, channels) for img in images]
    return np.stack([converted[k] for k in order])  # [T, C, H, W]


def _check_channels(channels: int) -> None:
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")


def _read_frames(path: Path, pick: Callable[[int], list[int]]) -> tuple[list[np.ndarray], list[int]]:
    """The distinct frames ``pick(n_frames)`` asks for, as ``[H, W]`` or ``[H, W, 3]`` uint8, and for
    each index it returned, its position in that list; a still image has 1 frame."""
    if not path.is_file():
        raise ImageReadError(f"{path}: file not found")
    if is_dicom(path):
        return _read_dicom(path, pick)
    return [_read_pillow(path)], [0] * len(pick(1))


def _to_channels(img: np.ndarray, channels: int) -> np.ndarray:
    """``[H, W]`` or ``[H, W, 3]`` uint8 -> contiguous ``[channels, H, W]``."""
    if img.ndim == 3:
        if channels == 3:
            return np.ascontiguousarray(img.transpose(2, 0, 1))
        img = np.asarray(Image.fromarray(np.ascontiguousarray(img)).convert("L"))
    if channels == 3:
        return np.repeat(img[None], 3, axis=0)
    # Arrays viewed from Pillow are read-only; torch.from_numpy wants writable memory.
    out = np.ascontiguousarray(img[None])
    return out if out.flags.writeable else out.copy()


def _scale_to_uint8(arr: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """Map ``[lo, hi]`` (default: the array's min-max) linearly onto ``[0, 255]``."""
    if arr.dtype == np.uint8 and lo is None:
        return arr
    arr = arr.astype(np.float32, copy=False)
    lo = float(arr.min()) if lo is None else lo
    hi = float(arr.max()) if hi is None else hi
    if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)  # flat image: nothing to show
    out = (arr - lo) * (255.0 / (hi - lo))
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- Pillow


def _read_pillow(path: Path) -> np.ndarray:
    """Return ``[H, W]`` or ``[H, W, 3]`` uint8 from a raster file via Pillow."""
    try:
        with Image.open(path) as im:
            im.load()  # decode now so truncation surfaces here, not later
            return _pillow_to_array(im)
    except Exception as exc:  # Pillow raises OSError, ValueError, SyntaxError, ...
        raise ImageReadError(f"{path}: cannot decode image ({type(exc).__name__}: {exc})") from exc


def _pillow_to_array(im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode == "L":
        return np.asarray(im)
    if mode == "RGB":
        return np.asarray(im)
    if mode.startswith("I") or mode == "F":  # 16/32-bit gray, float
        return _scale_to_uint8(np.asarray(im))
    if mode in ("1", "LA", "La"):
        return np.asarray(im.convert("L"))
    if mode in ("P", "PA"):  # palette may be colour or gray; keep colour
        im = im.convert("RGBA")
    # RGBA/RGBa/CMYK/YCbCr/LAB/HSV: alpha is dropped, not composited
    return np.asarray(im.convert("RGB"))


# --------------------------------------------------------------------------- DICOM


def _read_dicom(path: Path, pick: Callable[[int], list[int]]) -> tuple[list[np.ndarray], list[int]]:
    """:func:`_read_frames` for DICOM: the header is read once, and only the distinct frames
    ``pick(n_frames)`` asks for are decoded, each once."""
    with path.open("rb") as f:
        try:
            hdr = dcmread(f, stop_before_pixels=True, force=True, specific_tags=_HEADER_TAGS)
            has_image = "Rows" in hdr
            n_frames = max(int(hdr.get("NumberOfFrames") or 1), 1)
            tsyntax = _transfer_syntax(hdr)
        except Exception as exc:
            raise ImageReadError(f"{path}: unreadable DICOM header ({type(exc).__name__})") from exc
        if not has_image:
            raise ImageReadError(f"{path}: DICOM file has no image (no Rows element)")
        _check_decoder(path, tsyntax)
        indices = pick(n_frames)
        wanted = sorted(set(indices))
        try:
            # A file object + indices: pydicom reads only these frames' bytes.
            decoded = list(iter_pixels(f, indices=wanted, transfer_syntax_uid=tsyntax))
        except Exception as exc:
            raise ImageReadError(_decode_failure(path, tsyntax, exc)) from exc
    position = {index: k for k, index in enumerate(wanted)}
    return [_dicom_to_uint8(path, arr, hdr) for arr in decoded], [position[i] for i in indices]


def _transfer_syntax(hdr: Dataset) -> UID:
    meta = getattr(hdr, "file_meta", None)
    if meta is not None and meta.get("TransferSyntaxUID"):
        return UID(meta.TransferSyntaxUID)
    # No file meta (bare dataset read with force=True): use the encoding pydicom saw.
    is_implicit, _ = hdr.original_encoding
    return ImplicitVRLittleEndian if is_implicit in (True, None) else ExplicitVRLittleEndian


def _syntax_label(tsyntax: UID) -> str:
    name = tsyntax.name
    return f"{name} ({tsyntax})" if name != str(tsyntax) else f"transfer syntax {tsyntax}"


def _check_decoder(path: Path, tsyntax: UID) -> None:
    """Raise ImageReadError when no installed handler can decode ``tsyntax``."""
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError as exc:
        raise ImageReadError(
            f"{path}: {_syntax_label(tsyntax)} is not supported by pydicom's pixel decoders "
            "(e.g. MPEG/HEVC video); convert the file to an image transfer syntax"
        ) from exc
    if not decoder.is_available:
        raise ImageReadError(f"{path}: {_syntax_label(tsyntax)} {_handler_hint(decoder)}")


def _handler_hint(decoder: Any) -> str:
    """'needs A + B or C: pip install a b' from pydicom's ``missing_dependencies``."""
    options: list[str] = []
    installs: list[str] = []
    for line in decoder.missing_dependencies:  # e.g. "pylibjpeg - requires x>=2.0 and y>=2.1"
        m = re.fullmatch(r"\s*(\S+) - requires (.+)", line)
        if m is None:
            options.append(line.strip())
            continue
        reqs = [r.strip() for r in re.split(r", | and ", m.group(2)) if r.strip() != "numpy"]
        names = [re.split(r"[<>=!~ ]", r, maxsplit=1)[0] for r in reqs]
        pip_names = [_PIP_NAMES.get(n, n) for n in names]
        options.append(" + ".join(pip_names))
        installs.append("pip install " + " ".join(pip_names))
    if not options:
        return "has no pixel data handler installed"
    return f"needs {' or '.join(options)}: {' or '.join(installs) or 'see pydicom docs'}"


def _decode_failure(path: Path, tsyntax: UID, exc: Exception) -> str:
    msg = f"{path}: cannot decode {_syntax_label(tsyntax)} pixel data ({type(exc).__name__})"
    if tsyntax.is_encapsulated:
        decoder = get_decoder(tsyntax)
        msg += f"; installed handler(s) {', '.join(decoder.available_plugins)} failed"
        if decoder.missing_dependencies:
            msg += f"; the data may be corrupt, or try another handler: {_handler_hint(decoder)}"
    else:
        msg += "; the file may be truncated or corrupt"
    return msg


def _dicom_to_uint8(path: Path, arr: np.ndarray, hdr: Dataset) -> np.ndarray:
    """Photometric handling of one decoded frame -> ``[H, W]`` or ``[H, W, 3]`` uint8."""
    pi = str(hdr.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if pi in _MONO:
        if arr.ndim != 2:
            raise ImageReadError(f"{path}: {pi} frame has unexpected shape {arr.shape}")
        out = _window_mono(path, arr, hdr)
        return 255 - out if pi == "MONOCHROME1" else out
    if pi == "PALETTE COLOR":
        try:
            arr = apply_color_lut(arr, hdr)
        except Exception as exc:
            raise ImageReadError(f"{path}: bad PALETTE COLOR lookup table ({type(exc).__name__})") from exc
        return arr if arr.dtype == np.uint8 else _scale_to_uint8(arr, 0, 65535)  # 16-bit LUT entries
    if pi in _RGB_LIKE and arr.ndim == 3 and arr.shape[-1] == 3:
        return _scale_to_uint8(arr)  # 8-bit passes through; deeper RGB is min-max scaled
    raise ImageReadError(
        f"{path}: unsupported photometric interpretation {pi!r} with pixel array shape "
        f"{arr.shape}; supported: MONOCHROME1/2, RGB, YBR_FULL(_422), YBR_ICT/RCT, PALETTE COLOR"
    )


def _window_mono(path: Path, arr: np.ndarray, hdr: Dataset) -> np.ndarray:
    """8-bit unsigned passes through; deeper data: modality LUT + VOI LUT/window, else min-max."""
    if arr.dtype == np.uint8:
        return arr
    try:
        arr = apply_modality_lut(arr, hdr)  # rescale slope/intercept (or LUT) first
        out = apply_voi_lut(arr, hdr)
        if out is arr:  # no VOI LUT / window in the header
            return _scale_to_uint8(arr)
        if out.dtype.kind == "f":  # windowing: output spans the full [y_min, y_max]
            lo, hi = apply_voi_lut(np.array([-np.inf, np.inf]), hdr)
            return _scale_to_uint8(out, float(lo), float(hi))
        return _scale_to_uint8(out)  # VOI LUT sequence: scale the used range
    except (ValueError, NotImplementedError, AttributeError, IndexError, TypeError) as exc:
        # A malformed window should not cost the image: fall back to min-max.
        logger.debug("%s: ignoring unusable VOI/modality LUT (%s)", path, type(exc).__name__)
        return _scale_to_uint8(arr)
