"""No-reference image quality, NIQE and PIQE (lower is better for both), written here after the published
algorithms and MATLAB's reference behaviour, in numpy/scipy.

- NIQE: A. Mittal, R. Soundararajan, A. C. Bovik, "Making a 'completely blind' image quality analyzer", IEEE
  Signal Processing Letters 20(3), 2013, as in the authors' MATLAB release (`computequality.m`,
  `estimatemodelparam.m`) and BasicSR's Apache-2.0 port: grey 0-255 image cropped to whole 96x96 blocks; MSCN
  coefficients (7x7 Gaussian, sigma 7/6, replicate border); per block an AGGD fit of the MSCN coefficients and of
  their products with 4 neighbours (18 features), at full and half size (MATLAB's bicubic antialiased
  `imresize`, blocks 48x48): 36 features; the score is the distance between the multivariate Gaussian of the
  image's blocks and that of pristine images. The pristine model (mean and covariance of those features) is
  read from a local file given by the user, never bundled or downloaded; `fit_niqe_params` makes one from a
  site's own high-quality images, as `estimatemodelparam.m` does.
- PIQE: N. Venkatanath, D. Praneeth, M. C. Bh, S. S. Channappayya, S. S. Medasani, "Blind image quality evaluation
  using perception based features", NCC 2015, as in MATLAB's `piqe` (2018): 16x16 blocks of the MSCN image;
  active blocks (variance > 0.1) are scored for noticeable artifacts (an edge segment of 6 pixels with standard
  deviation < 0.1) and for noise (centre-surround deviation); score in [0, 100]. Needs no model.

Why no package (PyPI, checked 2026): pyiqa has both but is licensed for non-commercial use only; piq 0.8 and
torchmetrics 1.9 have neither; pypiqe 1.2 (MIT, PIQE only, one author, last release 2024) requires the full
opencv-python (about 74 MB, GUI build) for a blur and a grey conversion, and divides by the image maximum and
pads symmetrically where MATLAB does neither; scikit-video 1.1.11 (BSD, last release 2018) fails on current scipy (`scipy.misc.imresize`) and
numpy (`np.int`); basicsr 1.4.2 (Apache-2.0, 2022) pulls opencv-python, lmdb, tb-nightly and more, and its
package import fails on torchvision >= 0.17; the `niqe` package (2022) carries GPL-3 code and no model fitting.

Checked against those ports outside the repository (tests/engine/test_quality.py keeps some of their values): NIQE
within 1e-5 of BasicSR's `niqe()` on the same double-precision image (its `calculate_niqe` casts to float32 first,
up to 1e-3 apart), PIQE within 1e-12 of pypiqe's where the two differences above do not apply.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import correlate
from scipy.special import gamma

from echocare_core.files import write_atomic

__all__ = ["NIQE_BLOCK", "NiqeParams", "fit_niqe_params", "load_niqe_params", "niqe", "piqe", "save_niqe_params"]

log = logging.getLogger(__name__)

NIQE_BLOCK = 96  # the published patch size; a fitted model may use another (even) one
NIQE_SHARPNESS = 0.75  # the paper's p: pristine blocks sharper than p * the image's sharpest block
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm")
_ALPHA = np.arange(0.2, 10.001, 0.001)  # MATLAB's grid 0.2:0.001:10 for the AGGD shape
_RATIO = gamma(2 / _ALPHA) ** 2 / (gamma(1 / _ALPHA) * gamma(3 / _ALPHA))
_RGB2GRAY = np.array([0.298936021293775, 0.587043074451121, 0.114020904255103])  # MATLAB's rgb2gray


def _gaussian_window(size: int = 7, sigma: float = 7 / 6) -> np.ndarray:
    x = np.arange(size) - (size - 1) / 2
    w = np.exp(-(x[:, None] ** 2 + x[None, :] ** 2) / (2 * sigma**2))
    return w / w.sum()  # [size, size], MATLAB's fspecial('gaussian', 7, 7/6)


_WINDOW = _gaussian_window()


@dataclass(frozen=True)
class NiqeParams:
    """NIQE's pristine model: feature mean `[36]` and covariance `[36, 36]`, and the block size it was fitted at."""

    mu: np.ndarray
    cov: np.ndarray
    block_size: int = NIQE_BLOCK


def _check_images(images: torch.Tensor) -> None:
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be [N, C, H, W] with C = 1 or 3, got shape {tuple(images.shape)}")


def _gray255(images: torch.Tensor) -> np.ndarray:
    """`[N, C, H, W]` in [0, 1] (C = 1 or 3) -> `[N, H, W]` float64 grey levels rounded to 0..255, as the reference
    implementations see an 8-bit image."""
    _check_images(images)
    x = images.detach().double().clamp(0, 1).cpu().numpy()
    gray = x[:, 0] if x.shape[1] == 1 else np.einsum("nchw,c->nhw", x, _RGB2GRAY)
    return np.round(255 * gray)


def _mscn(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean-subtracted contrast-normalised coefficients and the local deviation, per image of `[..., H, W]`."""
    w = _WINDOW.reshape((1,) * (img.ndim - 2) + _WINDOW.shape)
    mu = correlate(img, w, mode="nearest")  # MATLAB's imfilter(..., 'replicate')
    sigma = np.sqrt(np.abs(correlate(img * img, w, mode="nearest") - mu * mu))
    return (img - mu) / (sigma + 1), sigma


def _blocks(img: np.ndarray, size: int) -> np.ndarray:
    """`[H, W]` (multiples of size) -> `[B, size, size]`, row-major block order."""
    h, w = img.shape
    return img.reshape(h // size, size, w // size, size).swapaxes(1, 2).reshape(-1, size, size)


def _aggd(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Moment-matching AGGD fit of each row of `[B, P]` (MATLAB's estimateaggdparam): shape alpha, left and right
    scales. A row without negative or positive values gives NaN scales, which the pooling leaves out."""
    neg, pos = x < 0, x > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        left = np.sqrt((x * x * neg).sum(1) / neg.sum(1))
        right = np.sqrt((x * x * pos).sum(1) / pos.sum(1))
        g = left / right
        r = np.abs(x).mean(1) ** 2 / (x * x).mean(1)
        r_norm = r * (g**3 + 1) * (g + 1) / (g**2 + 1) ** 2
    # [B, len(_ALPHA)]; a NaN row picks the first shape, as MATLAB's min does
    alpha = _ALPHA[np.argmin((_RATIO[None, :] - r_norm[:, None]) ** 2, axis=1)]
    scale = np.sqrt(gamma(1 / alpha) / gamma(3 / alpha))
    return alpha, left * scale, right * scale


def _block_features(blocks: np.ndarray) -> np.ndarray:
    """NIQE's 18 features of each MSCN block `[B, s, s]` -> `[B, 18]` (MATLAB's computefeature)."""
    alpha, bl, br = _aggd(blocks.reshape(len(blocks), -1))
    feats = [alpha, (bl + br) / 2]
    for shift in ((0, 1), (1, 0), (1, 1), (-1, 1)):  # horizontal, vertical, two diagonals (circular, as circshift)
        pair = blocks * np.roll(blocks, shift, axis=(1, 2))
        alpha, bl, br = _aggd(pair.reshape(len(blocks), -1))
        feats += [alpha, (br - bl) * gamma(2 / alpha) / gamma(1 / alpha), bl, br]
    return np.stack(feats, axis=1)


def _cubic(x: np.ndarray) -> np.ndarray:
    a = np.abs(x)
    return np.where(a <= 1, 1.5 * a**3 - 2.5 * a**2 + 1, np.where(a <= 2, -0.5 * a**3 + 2.5 * a**2 - 4 * a + 2, 0))


# MATLAB's imresize(x, 0.5) (bicubic, antialiased): output o is the 8-tap filter below on inputs 2o-3 .. 2o+4,
# with symmetric borders; the taps sum to 1.
_HALF_TAPS = 0.5 * _cubic(0.5 * (3.5 - np.arange(8)))


def _half(img: np.ndarray) -> np.ndarray:
    """MATLAB's `imresize(img, 0.5)` of `[H, W]` -> `[ceil(H/2), ceil(W/2)]`."""
    for axis in (0, 1):  # rows first, as MATLAB for equal scales
        n = img.shape[axis]
        m = math.ceil(n / 2)
        pad = [(0, 0), (0, 0)]
        pad[axis] = (3, 4)
        p = np.moveaxis(np.pad(img, pad, mode="symmetric"), axis, 0)
        img = np.moveaxis(sum(t * p[k : k + 2 * m : 2] for k, t in enumerate(_HALF_TAPS)), 0, axis)
    return img


def _niqe_features(img: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Features `[B, 36]` of the whole size x size blocks of one grey image `[H, W]` (0..255), and each block's
    sharpness `[B]` (mean local deviation at full size), in row-major block order."""
    h, w = img.shape
    img = img[: h - h % size, : w - w % size]
    mscn, sigma = _mscn(img)
    sharpness = _blocks(sigma, size).mean(axis=(1, 2))
    fine = _block_features(_blocks(mscn, size))
    coarse = _block_features(_blocks(_mscn(_half(img))[0], size // 2))
    return np.concatenate([fine, coarse], axis=1), sharpness


def _pooled(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Mean (NaN-skipping) and covariance (complete rows) of block features `[B, 36]`, as MATLAB's nanmean and
    nancov; None when fewer than 2 blocks have all their features (e.g. a flat image)."""
    complete = feats[~np.isnan(feats).any(axis=1)]
    if len(complete) < 2:
        return None
    return np.nanmean(feats, axis=0), np.cov(complete, rowvar=False)


def _check_block(block_size: int) -> None:
    if not isinstance(block_size, (int, np.integer)) or block_size < 16 or block_size % 2:
        raise ValueError(f"NIQE block_size must be an even integer >= 16 (published: {NIQE_BLOCK}), got {block_size!r}")


def niqe(images: torch.Tensor, params: NiqeParams) -> np.ndarray:
    """NIQE of each image against a pristine model (lower is better; NaN for an image without texture).

    Args:
        images: `[N, C, H, W]` in [0, 1], C = 1 or 3 (grey by MATLAB's rgb2gray); rounded to 8 bits first.
        params: the pristine model, from `load_niqe_params` or `fit_niqe_params`.

    Returns:
        `[N]` scores.

    Raises:
        ValueError: bad shape, or an image holding fewer than two whole blocks of `params.block_size`.
    """
    _check_images(images)
    b, (h, w) = params.block_size, images.shape[2:]
    if (h // b) * (w // b) < 2:
        raise ValueError(
            f"NIQE needs at least two {b}x{b} blocks per image, got {h}x{w} images (fit a model with "
            f"a smaller block_size for small images)"
        )
    scores = np.full(len(images), np.nan)
    for i in range(len(images)):  # one at a time: float64 copies of a whole test set would not fit in memory
        pooled = _pooled(_niqe_features(_gray255(images[i : i + 1])[0], b)[0])
        if pooled is None:
            continue
        d = params.mu - pooled[0]  # [36]
        scores[i] = math.sqrt(max(float(d @ np.linalg.pinv((params.cov + pooled[1]) / 2) @ d), 0.0))
    return scores


def _read_grey(files: list[Path]) -> Iterator[np.ndarray]:
    """The files as grey 0..255 float images `[H, W]`, one at a time; unreadable ones are skipped and counted."""
    from echocare_core.data.io import ImageReadError, read_image

    skipped = 0
    for path in files:
        try:
            yield read_image(path, channels=1)[0].astype(np.float64)
        except ImageReadError:
            skipped += 1
    if skipped:
        log.warning("NIQE pristine images: %d of %d files could not be read and were left out", skipped, len(files))


def _pristine_images(images: str | Path | torch.Tensor) -> Iterable[np.ndarray]:
    """Grey 0..255 images `[H, W]` from a `[N, C, H, W]` tensor in [0, 1] or from the image files of a folder
    (read one at a time)."""
    if isinstance(images, torch.Tensor):
        return list(_gray255(images))

    folder = Path(images)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"NIQE pristine images: {folder} is not a folder (give a folder of image files or a [N, C, H, W] tensor)"
        )
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"NIQE pristine images: no image file ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    return _read_grey(files)


def fit_niqe_params(
    images: str | Path | torch.Tensor, block_size: int = NIQE_BLOCK, sharpness: float = NIQE_SHARPNESS
) -> NiqeParams:
    """Fit NIQE's pristine model to high-quality images, as the authors' `estimatemodelparam.m`: the features of
    each image's blocks sharper than `sharpness` times its sharpest block, pooled over all images.

    Args:
        images: a folder of image files (read as grey, searched recursively) or `[N, C, H, W]` in [0, 1].
        block_size: block side in pixels; images to be scored need two whole blocks.
        sharpness: fraction of each image's peak block sharpness a block must exceed (paper: 0.75;
            MATLAB's fitniqe defaults to 0, i.e. every block).

    Raises:
        FileNotFoundError: `images` is a path that is not a folder.
        ValueError: bad block_size or sharpness, no image file, or fewer than 2 usable blocks.
    """
    _check_block(block_size)
    if not 0 <= sharpness < 1:
        raise ValueError(f"NIQE sharpness must be in [0, 1), got {sharpness!r}")
    rows = []
    for img in _pristine_images(images):
        if min(img.shape) < block_size:
            continue
        feats, sharp = _niqe_features(img, block_size)
        rows.append(feats[sharp > sharpness * sharp.max()])
    pooled = _pooled(np.concatenate(rows)) if rows else None
    if pooled is None:
        raise ValueError(
            f"NIQE fit: fewer than 2 usable {block_size}x{block_size} blocks in the pristine images "
            f"(give more or larger images, or a smaller block_size)"
        )
    n = sum(len(r) for r in rows)
    if n <= pooled[0].size:
        log.warning(
            "NIQE fit: %d blocks for %d features; the covariance is singular (NIQE uses its "
            "pseudo-inverse): more pristine images give a steadier model",
            n,
            pooled[0].size,
        )
    return NiqeParams(pooled[0], pooled[1], int(block_size))


def save_niqe_params(path: str | Path, params: NiqeParams) -> None:
    """Write a model as an .npz in BasicSR's layout (`mu_pris_param` [1, 36], `cov_pris_param` [36, 36],
    `gaussian_window` [7, 7]) plus `block_size`."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: numpy adds no suffix
            np.savez(
                f,
                mu_pris_param=params.mu[None, :],
                cov_pris_param=params.cov,
                gaussian_window=_WINDOW,
                block_size=np.array(params.block_size),
            )

    write_atomic(path, write)


# (mean key, covariance key) of the files NIQE's model comes in
_NPZ_KEYS = ("mu_pris_param", "cov_pris_param")  # BasicSR's niqe_pris_params.npz, and save_niqe_params
_MAT_KEYS = ("mu_prisparam", "cov_prisparam")  # modelparameters.mat of the authors' MATLAB release


def load_niqe_params(path: str | Path) -> NiqeParams:
    """Read a NIQE pristine model from a local .npz (keys `mu_pris_param`, `cov_pris_param`, optional
    `block_size`, default 96) or .mat (`mu_prisparam`, `cov_prisparam`, blocks of 96).

    Raises:
        FileNotFoundError: no such file.
        ValueError: another suffix, missing keys, or arrays that are not a 36-vector and a 36x36 matrix.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"NIQE params: {path} is not a file (nothing is downloaded: give a local "
            f".npz or .mat, or make one with fit_niqe_params)"
        )
    suffix = path.suffix.lower()
    if suffix not in (".npz", ".mat"):
        raise ValueError(f"NIQE params: {path} has suffix {path.suffix!r}; allowed: .npz, .mat")
    try:
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                found, keys = dict(data), _NPZ_KEYS
        else:
            from scipy.io import loadmat

            found, keys = loadmat(path), _MAT_KEYS
    except (ValueError, OSError, EOFError, NotImplementedError) as exc:  # not an npz; scipy: not MATLAB v5 (v7.3)
        raise ValueError(
            f"NIQE params: {path} does not load as {suffix} ({type(exc).__name__}: {str(exc)[:200]})"
        ) from exc
    if not set(keys) <= set(found):
        raise ValueError(
            f"NIQE params: {path} lacks {' and '.join(k for k in keys if k not in found)} (has "
            f"{sorted(k for k in found if not k.startswith('__'))}); expected {keys[0]} and {keys[1]}"
        )
    mu, cov = np.asarray(found[keys[0]], float).ravel(), np.asarray(found[keys[1]], float)
    block = int(found["block_size"]) if "block_size" in found else NIQE_BLOCK
    if mu.shape != (36,) or cov.shape != (36, 36) or not (np.isfinite(mu).all() and np.isfinite(cov).all()):
        raise ValueError(
            f"NIQE params: {path} holds {keys[0]} of shape {mu.shape} and {keys[1]} of shape "
            f"{cov.shape}; expected finite (36,) and (36, 36)"
        )
    _check_block(block)
    return NiqeParams(mu, cov, block)


PIQE_BLOCK = 16
_ACTIVITY, _IMPAIRED, _SEGMENT = 0.1, 0.1, 6  # MATLAB piqe's thresholds and edge-segment length


def _piqe_blocks(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """PIQE's distortion score `[B]` (0 where inactive) and activity `[B]` of each MSCN block `[B, 16, 16]`."""
    n = len(blocks)
    var = blocks.reshape(n, -1).var(axis=1, ddof=1)
    active = var > _ACTIVITY
    # noticeable artifacts: some 6-pixel segment of an edge row or column is (nearly) flat
    edges = np.stack([blocks[:, 0, :], blocks[:, :, -1], blocks[:, -1, :], blocks[:, :, 0]], axis=1)  # [B, 4, 16]
    segments = np.lib.stride_tricks.sliding_window_view(edges, _SEGMENT, axis=2)  # [B, 4, 11, 6]
    impaired = (segments.std(axis=3, ddof=1) < _IMPAIRED).any(axis=(1, 2))
    # noise: the two centre columns against the rest. MATLAB deletes column 8 and then "column 9" of what is left,
    # i.e. original columns 8 and 10 (1-based); kept so that scores agree with MATLAB's.
    centre = blocks[:, :, 7:9].reshape(n, -1)
    surround = np.delete(blocks, [7, 9], axis=2).reshape(n, -1)
    sigma = np.sqrt(var)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.nan_to_num(centre.std(axis=1, ddof=1) / surround.std(axis=1, ddof=1), nan=0.0, posinf=np.inf)
        beta = np.abs(sigma - ratio) / np.maximum(sigma, ratio)
    noisy = sigma > 2 * beta  # False where beta is NaN, as in MATLAB
    score = impaired * (1 - var) + noisy * var
    return np.where(active, score, 0.0), active


def piqe(images: torch.Tensor) -> np.ndarray:
    """PIQE of each image, in [0, 100] (lower is better; 100 for a flat image). Any size: images are padded to
    whole 16x16 blocks by repeating the last row and column, as MATLAB's.

    Args:
        images: `[N, C, H, W]` in [0, 1], C = 1 or 3 (grey by MATLAB's rgb2gray); rounded to 8 bits first.

    Returns:
        `[N]` scores.

    Raises:
        ValueError: bad shape.
    """
    _check_images(images)
    h, w = images.shape[2:]
    scores = np.empty(len(images))
    for i in range(len(images)):  # one at a time, as niqe
        gray = np.pad(_gray255(images[i : i + 1])[0], [(0, -h % PIQE_BLOCK), (0, -w % PIQE_BLOCK)], mode="edge")
        distortion, active = _piqe_blocks(_blocks(_mscn(gray)[0], PIQE_BLOCK))
        # the 1s are MATLAB's C, which keeps an image without active blocks finite (at 100)
        scores[i] = (distortion.sum() + 1) / (active.sum() + 1) * 100
    return scores
