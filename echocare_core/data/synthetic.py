"""Synthetic ultrasound B-mode images and dataset folders, for tests, demos and benchmarks.

The image chain follows a real scanner closely enough for speckle statistics to be realistic:
a complex Gaussian scatterer field (fully developed speckle) weighted by a tissue reflectivity map
is convolved (FFT) with a point-spread function (Gaussian envelope with an axial cosine carrier);
the envelope is attenuated along each beam, partly restored by time-gain compensation, log-compressed
to the device's dynamic range, scan-converted from the beam grid (depth x line) to the Cartesian
image with bilinear interpolation, and quantised. Everything draws from the caller's
`np.random.Generator`, so one seed gives byte-identical images. numpy only.

Scenes and device profiles are data: a scene is a list of primitives painted in order in image
coordinates (x to the right, z down, both in image heights; the probe face is at z = 0).
"""

from __future__ import annotations

import difflib
import functools
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["CLASSES", "DEFAULT_SCENE", "DEVICE_PROFILES", "GEOMETRIES", "LESIONS", "SCENES", "TASKS",
           "SyntheticSample", "generate_image", "lesion_label", "profile_for_site"]

TASKS = ("classification", "segmentation", "pretrain")
LESIONS = ("cyst", "hypoechoic", "hyperechoic", "irregular")
CLASSES = ("benign", "malignant")
SPLIT_FRACTIONS = {"train": 0.70, "val": 0.15, "test": 0.15}
MIN_SIZE, MAX_SIZE = 32, 1024

# Probe geometries: half_angle of the fan (radians; 0 = linear array) and the distance of the
# virtual apex above the probe face, in image heights. The beam depth always spans one image height.
GEOMETRIES: dict[str, dict[str, float]] = {
    "linear": {"half_angle": 0.0, "apex": 0.0},
    "convex": {"half_angle": math.radians(30.0), "apex": 0.6},
    "sector": {"half_angle": math.radians(40.0), "apex": 0.02},
}

# Scanner image chains. PSF sigmas and carrier period are in pixels of a 128-sample beam grid
# (they scale with image size) and set the speckle size; `lines` is beam lines per image width;
# attenuation_db is the round-trip loss over the full depth in soft tissue, `tgc` the fraction of
# it that time-gain compensation restores; `bits` is the grey-level depth of the scanner's output.
DEVICE_PROFILES: dict[str, dict[str, Any]] = {
    "highend_linear": dict(geometry="linear", psf_axial=0.6, psf_lateral=0.9, carrier=2.2, lines=1.0,
                           gain_db=0.0, dynamic_range_db=60.0, noise_db=-50.0, attenuation_db=36.0,
                           tgc=0.95, bits=8),
    "portable_convex": dict(geometry="convex", psf_axial=1.2, psf_lateral=2.0, carrier=3.2, lines=0.6,
                            gain_db=-4.0, dynamic_range_db=48.0, noise_db=-32.0, attenuation_db=30.0,
                            tgc=0.7, bits=7),
    "legacy_sector": dict(geometry="sector", psf_axial=1.6, psf_lateral=1.8, carrier=3.6, lines=0.5,
                          gain_db=5.0, dynamic_range_db=42.0, noise_db=-28.0, attenuation_db=32.0,
                          tgc=0.6, bits=6),
    "midrange_linear": dict(geometry="linear", psf_axial=0.9, psf_lateral=1.4, carrier=2.8, lines=0.8,
                            gain_db=3.0, dynamic_range_db=54.0, noise_db=-42.0, attenuation_db=40.0,
                            tgc=0.85, bits=8),
    "highend_convex": dict(geometry="convex", psf_axial=0.8, psf_lateral=1.2, carrier=2.4, lines=0.9,
                           gain_db=0.0, dynamic_range_db=64.0, noise_db=-48.0, attenuation_db=28.0,
                           tgc=0.95, bits=8),
    "cardiac_sector": dict(geometry="sector", psf_axial=0.9, psf_lateral=1.1, carrier=2.6, lines=0.9,
                           gain_db=1.0, dynamic_range_db=58.0, noise_db=-44.0, attenuation_db=24.0,
                           tgc=0.9, bits=8),
}

# Primitives, painted in order (echo = amplitude reflectivity, att = attenuation relative to tissue):
#   ("layer", z0, echo, att)                          everything deeper than z0 (wavy boundary)
#   ("stripes", z0, z1, period, amp, angle_deg)       fibrillar modulation of echo within z0..z1
#   ("ellipse", cx, cz, a, b, rot_deg, echo, att, rim[, harmonics])  filled; a across, b down
#   ("ring", cx, cz, a, b, rot_deg, thickness, echo, att)
#   ("tube", x0, z0, x1, z1, radius, echo, att, rim)  a capsule (vessel, fascia, specular line)
# harmonics: ((k, amplitude, phase, power), ...) modulate the ellipse radius (power > 1: spicules).
_WALL = [("layer", 0.0, 1.8, 1.0), ("layer", 0.02, 0.3, 0.9), ("layer", 0.09, 0.45, 1.0)]
SCENES: dict[str, dict[str, Any]] = {
    "Thorax/Breast/Radial": dict(geometry="linear", base=(0.8, 1.0), texture=0.35, parts=[
        ("layer", 0.0, 1.8, 1.0), ("layer", 0.025, 0.3, 0.9),
        ("tube", 0.1, 0.05, 0.35, 0.24, 0.004, 1.6, 1.0, 0.0),   # Cooper's ligaments
        ("tube", 0.6, 0.06, 0.85, 0.25, 0.004, 1.6, 1.0, 0.0),
        ("layer", 0.24, 0.85, 1.0), ("layer", 0.74, 0.3, 0.9),  # glandular tissue, retromammary fat
        ("layer", 0.80, 0.5, 1.0), ("stripes", 0.80, 0.93, 0.03, 0.5, 8.0),  # pectoralis
        ("ellipse", 0.3, 0.99, 0.12, 0.05, 0.0, 2.5, 25.0, 2.0)]),  # rib and its shadow
    "Neck/Thyroid/Transverse": dict(geometry="linear", base=(0.5, 1.0), texture=0.15, parts=[
        *_WALL, ("stripes", 0.09, 0.2, 0.025, 0.4, 0.0), ("layer", 0.2, 0.55, 1.0),
        ("ellipse", 0.45, 0.42, 0.30, 0.17, 4.0, 1.0, 1.0, 0.8),     # thyroid lobe, capsule
        ("ellipse", 0.83, 0.47, 0.085, 0.085, 0.0, 0.02, 0.15, 1.2),  # common carotid artery
        ("ellipse", 0.97, 0.36, 0.07, 0.05, 0.0, 0.03, 0.15, 0.5),    # internal jugular vein
        ("ellipse", 0.0, 0.40, 0.13, 0.13, 0.0, 0.1, 6.0, 2.5),       # trachea: air shadow
        ("ellipse", 0.62, 0.8, 0.22, 0.08, 0.0, 0.35, 1.0, 0.5)]),    # longus colli
    "Abdomen/Liver/Subcostal oblique": dict(geometry="convex", base=(0.6, 1.0), texture=0.12, parts=[
        *_WALL, ("layer", 0.14, 1.8, 1.0), ("layer", 0.155, 0.6, 1.0),
        ("tube", 0.2, 0.3, 0.47, 0.82, 0.028, 0.02, 0.2, 0.0),        # hepatic veins
        ("tube", 0.52, 0.25, 0.5, 0.82, 0.024, 0.02, 0.2, 0.0),
        ("tube", 0.85, 0.35, 0.53, 0.82, 0.03, 0.02, 0.2, 0.0),
        ("ellipse", 0.5, 0.86, 0.09, 0.05, 0.0, 0.02, 0.2, 0.0),      # inferior vena cava
        ("tube", 0.25, 0.58, 0.45, 0.52, 0.018, 0.03, 0.2, 1.5),      # portal branch, bright wall
        ("ring", 0.5, 1.45, 0.75, 0.52, 0.0, 0.02, 3.0, 1.0)]),       # diaphragm
    "Thorax/Heart/Apical four-chamber": dict(geometry="sector", base=(0.25, 1.0), texture=0.2, parts=[
        ("ellipse", 0.5, 0.56, 0.34, 0.46, 0.0, 0.75, 1.0, 1.2),      # myocardium, pericardium
        ("ellipse", 0.6, 0.38, 0.1, 0.21, -10.0, 0.03, 0.1, 0.0),     # LV
        ("ellipse", 0.38, 0.42, 0.085, 0.18, 12.0, 0.03, 0.1, 0.0),   # RV
        ("ellipse", 0.61, 0.78, 0.1, 0.09, 0.0, 0.03, 0.1, 0.0),      # LA
        ("ellipse", 0.38, 0.77, 0.09, 0.09, 0.0, 0.03, 0.1, 0.0),     # RA
        ("tube", 0.52, 0.63, 0.7, 0.62, 0.006, 1.6, 1.0, 0.0),        # mitral annulus
        ("tube", 0.3, 0.62, 0.46, 0.63, 0.006, 1.6, 1.0, 0.0)]),      # tricuspid annulus
    "Pelvis/Bladder/Transverse": dict(geometry="convex", base=(0.55, 1.0), texture=0.2, parts=[
        *_WALL, ("stripes", 0.09, 0.18, 0.03, 0.4, 0.0), ("layer", 0.18, 0.6, 1.0),
        ("ellipse", 0.5, 0.46, 0.3, 0.22, 0.0, 0.015, 0.05, 1.0, ((4, 0.07, math.pi, 1),)),
        ("ellipse", 0.5, 0.86, 0.2, 0.09, 0.0, 0.7, 1.0, 0.4)]),      # uterus / prostate
    "Fetus/Fetal head/Transthalamic": dict(geometry="convex", base=(0.5, 1.0), texture=0.2, parts=[
        ("layer", 0.0, 1.5, 1.0), ("layer", 0.02, 0.35, 0.9), ("layer", 0.1, 0.6, 1.0),
        ("ellipse", 0.5, 0.6, 0.55, 0.42, 0.0, 0.03, 0.1, 0.6),       # amniotic fluid
        ("ellipse", 0.5, 0.56, 0.27, 0.21, 12.0, 0.3, 1.0, 0.0),      # brain
        ("tube", 0.256, 0.508, 0.744, 0.612, 0.004, 1.4, 1.0, 0.0),   # midline echo
        ("ellipse", 0.491, 0.604, 0.05, 0.035, 12.0, 0.12, 1.0, 0.0),  # thalami
        ("ellipse", 0.509, 0.516, 0.05, 0.035, 12.0, 0.12, 1.0, 0.0),
        ("ellipse", 0.402, 0.539, 0.035, 0.018, 12.0, 0.02, 0.2, 0.3),  # cavum septi pellucidi
        ("ring", 0.5, 0.56, 0.28, 0.22, 12.0, 0.02, 3.5, 15.0)]),      # skull
    "Abdomen/Kidney/Longitudinal": dict(geometry="convex", base=(0.55, 1.0), texture=0.15, parts=[
        *_WALL, ("layer", 0.16, 0.55, 1.0),
        ("ellipse", 0.15, 0.2, 0.45, 0.3, 20.0, 0.6, 1.0, 0.5),       # liver tip
        ("ellipse", 0.52, 0.55, 0.34, 0.16, -12.0, 0.85, 1.0, 0.8),   # perirenal fat
        ("ellipse", 0.52, 0.55, 0.30, 0.13, -12.0, 0.35, 1.0, 0.0),   # cortex
        *[("ellipse", x, z, 0.035, 0.03, -12.0, 0.12, 1.0, 0.0)        # medullary pyramids
          for x, z in ((0.375, 0.494), (0.629, 0.44), (0.411, 0.66), (0.665, 0.606))],
        ("ellipse", 0.52, 0.55, 0.17, 0.05, -12.0, 1.6, 1.0, 0.0)]),  # renal sinus fat
    "Limbs/Muscle/Longitudinal": dict(geometry="linear", base=(0.45, 1.0), texture=0.1, parts=[
        ("layer", 0.0, 1.8, 1.0), ("layer", 0.02, 0.3, 0.9), ("layer", 0.16, 1.6, 1.0),
        ("layer", 0.175, 0.45, 1.0), ("stripes", 0.175, 0.8, 0.035, 0.6, 12.0),
        ("tube", -0.1, 0.5, 1.1, 0.46, 0.006, 1.5, 1.0, 0.0),         # intermuscular septum
        ("tube", -0.1, 0.83, 1.1, 0.83, 0.008, 4.0, 1.0, 0.0),        # bone surface
        ("layer", 0.84, 0.5, 60.0)]),                                  # acoustic shadow
    "Thorax/Lung/Pleural line": dict(geometry="linear", base=(0.4, 1.0), texture=0.1, parts=[
        *_WALL, ("stripes", 0.09, 0.3, 0.03, 0.4, 0.0), ("layer", 0.33, 0.12, 0.3),
        ("tube", -0.1, 0.335, 1.1, 0.335, 0.008, 3.0, 1.0, 0.0),      # pleural line
        ("tube", -0.1, 0.67, 1.1, 0.67, 0.007, 1.2, 0.3, 0.0),        # A-line reverberation
        ("ellipse", 0.05, 0.3, 0.1, 0.045, 0.0, 2.5, 25.0, 2.0),      # ribs and shadows
        ("ellipse", 0.95, 0.3, 0.1, 0.045, 0.0, 2.5, 25.0, 2.0)]),
}
DEFAULT_SCENE = "Thorax/Breast/Radial"

# echo, att, rim per lesion kind: cysts enhance behind, irregular masses shadow.
_LESION_LOOK = {"cyst": (0.015, 0.02, 0.5), "hypoechoic": (0.25, 1.0, 0.3),
                "hyperechoic": (2.4, 1.4, 0.0), "irregular": (0.15, 3.5, 0.6)}


@dataclass(frozen=True, eq=False)
class SyntheticSample:
    """One synthetic B-mode image.

    Attributes:
        image: [H, W] uint8 B-mode image; 0 outside the field of view.
        mask: [H, W] uint8, 1 inside the lesion, 0 elsewhere (all 0 without a lesion).
        label: "benign" or "malignant" when a lesion was drawn, else None.
        anatomy: full ontology path of the scene template.
    """

    image: np.ndarray
    mask: np.ndarray
    label: str | None
    anatomy: str | None


def lookup_option(what: str, value: str, allowed: Mapping[str, Any] | tuple[str, ...]) -> str:
    if value in allowed:
        return value
    close = difflib.get_close_matches(str(value), list(allowed), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"unknown {what} {value!r}; allowed: {', '.join(allowed)}{hint}")


def profile_for_site(site: int) -> str:
    """Return the device profile name of site `site` (round-robin over DEVICE_PROFILES)."""
    names = list(DEVICE_PROFILES)
    return names[site % len(names)]


def lesion_label(lesion: str) -> str:
    """Return the class ("benign" or "malignant") of a lesion kind from LESIONS."""
    return "malignant" if lookup_option("lesion", lesion, LESIONS) == "irregular" else "benign"


@functools.lru_cache(maxsize=32)
def _beam_coords(geometry: str, nd: int, nl: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Cartesian (x, z) of each beam sample, `pad` samples of margin around: [nd+2p, nl+2p]."""
    t = (np.arange(-pad, nd + pad) + 0.5) / nd  # depth fraction
    u = (np.arange(-pad, nl + pad) + 0.5) / nl  # line fraction
    g = GEOMETRIES[geometry]
    if g["half_angle"] == 0.0:
        x, z = np.meshgrid(u, t)
    else:
        theta = (u - 0.5) * 2.0 * g["half_angle"]
        r = g["apex"] + t
        x = 0.5 + r[:, None] * np.sin(theta)[None, :]
        z = r[:, None] * np.cos(theta)[None, :] - g["apex"]
    x.flags.writeable = z.flags.writeable = False
    return x, z


@functools.lru_cache(maxsize=32)
def _scan_map(geometry: str, size: int, nd: int, nl: int) -> tuple[np.ndarray, ...]:
    """Precomputed scan conversion: flat beam index, bilinear weights, fan mask, pixel x and z."""
    c = (np.arange(size) + 0.5) / size
    x, z = np.meshgrid(c, c)  # [H, W]
    g = GEOMETRIES[geometry]
    if g["half_angle"] == 0.0:
        t, u = z, x
    else:
        r = np.hypot(x - 0.5, z + g["apex"])
        t = r - g["apex"]
        u = np.arctan2(x - 0.5, z + g["apex"]) / (2.0 * g["half_angle"]) + 0.5
    valid = (t >= 0) & (t <= 1) & (u >= 0) & (u <= 1)
    fi = np.clip(t * nd - 0.5, 0, nd - 1)
    fj = np.clip(u * nl - 0.5, 0, nl - 1)
    i0 = np.minimum(fi.astype(np.int64), nd - 2)
    j0 = np.minimum(fj.astype(np.int64), nl - 2)
    out = (i0 * nl + j0, fi - i0, fj - j0, valid, x, z)
    for a in out:
        a.flags.writeable = False
    return out


@functools.lru_cache(maxsize=64)
def _psf_fft(sa: float, sl: float, carrier: float, shape: tuple[int, int]) -> np.ndarray:
    """FFT of the PSF placed for circular convolution, normalised to unit energy."""
    ha, hl = math.ceil(3 * sa), math.ceil(3 * sl)
    zz = np.arange(-ha, ha + 1, dtype=np.float64)[:, None]
    xx = np.arange(-hl, hl + 1, dtype=np.float64)[None, :]
    h = np.exp(-zz**2 / (2 * sa**2) - xx**2 / (2 * sl**2)) * np.cos(2 * np.pi * zz / carrier)
    h /= np.sqrt(np.sum(h**2))  # unit-echo tissue gives unit mean intensity
    k = np.zeros(shape)
    k[: 2 * ha + 1, : 2 * hl + 1] = h
    k = np.fft.fft2(np.roll(k, (-ha, -hl), axis=(0, 1)))
    k.flags.writeable = False
    return k


def _distance(part: tuple, x: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Approximate signed distance (image heights) to a shape's boundary; < 0 inside."""
    kind = part[0]
    if kind == "tube":
        x0, z0, x1, z1, radius = part[1:6]
        dx, dz = x1 - x0, z1 - z0
        s = np.clip(((x - x0) * dx + (z - z0) * dz) / max(dx * dx + dz * dz, 1e-12), 0, 1)
        return np.hypot(x - x0 - s * dx, z - z0 - s * dz) - radius
    cx, cz, a, b, rot = part[1:6]
    c, s = math.cos(math.radians(rot)), math.sin(math.radians(rot))
    u = ((x - cx) * c + (z - cz) * s) / a
    v = (-(x - cx) * s + (z - cz) * c) / b
    rho = np.hypot(u, v)
    boundary: np.ndarray | float = 1.0
    harmonics = part[9] if kind == "ellipse" and len(part) > 9 else ()
    if harmonics:
        phi = np.arctan2(v, u)
        for k, amp, phase, power in harmonics:
            wave = np.cos(k * phi + phase)
            boundary = boundary + amp * (wave if power == 1 else np.maximum(wave, 0) ** power)
    d = (rho - boundary) * min(a, b)
    return np.abs(d) - part[6] / 2 if kind == "ring" else d


def _paint(echo: np.ndarray, att: np.ndarray, x: np.ndarray, z: np.ndarray, part: tuple,
           rng: np.random.Generator, edge: float) -> None:
    """Paint one primitive in place onto the reflectivity and attenuation maps."""
    kind = part[0]
    if kind == "stripes":
        z0, z1, period, amp, angle = part[1:]
        a = math.radians(angle)
        band = (z >= z0) & (z < z1)
        phase = 2 * np.pi * (x * math.sin(a) + z * math.cos(a)) / period + rng.uniform(0, 2 * np.pi)
        echo *= np.where(band, 1.0 + amp * np.cos(phase), 1.0)
        return
    if kind == "layer":
        wave = 0.006 * np.sin(2 * np.pi * rng.uniform(0.5, 2.0) * x + rng.uniform(0, 2 * np.pi))
        d, (e, a), rim = part[1] + wave - z, part[2:4], 0.0
    elif kind in ("ellipse", "tube"):
        d, (e, a, rim) = _distance(part, x, z), part[6:9]
    elif kind == "ring":
        d, (e, a), rim = _distance(part, x, z), part[7:9], 0.0
    else:
        raise ValueError(f"unknown scene primitive {kind!r}; allowed: layer, stripes, ellipse, ring, tube")
    w = np.clip(0.5 - d / edge, 0.0, 1.0)
    echo += w * (e * math.exp(rng.normal(0.0, 0.1)) - echo)
    att += w * (a - att)
    if rim:
        echo += rim * np.exp(-((d / 0.01) ** 2))


def _texture(rng: np.random.Generator, x: np.ndarray, z: np.ndarray, amp: float) -> np.ndarray:
    """Smooth multiplicative echogenicity variation (sum of random plane waves)."""
    out = np.zeros_like(x)
    for f, a, p in zip(rng.uniform(1.5, 6.0, 5), rng.uniform(0, np.pi, 5), rng.uniform(0, 2 * np.pi, 5)):
        out += np.cos(2 * np.pi * f * (x * math.cos(a) + z * math.sin(a)) + p)
    return np.exp(amp * out / math.sqrt(2.5))


def _draw_lesion(rng: np.random.Generator, lesion: str, geometry: str) -> tuple:
    """Random lesion shape as an ellipse primitive; irregular ones are taller than wide."""
    cx = rng.uniform(0.38, 0.62) if geometry == "sector" else rng.uniform(0.3, 0.7)
    cz = rng.uniform(0.4, 0.62)
    a = rng.uniform(0.07, 0.13)
    if lesion == "irregular":
        b = a * rng.uniform(1.15, 1.5)
        harmonics = [(k, rng.uniform(0.05, 0.12) / math.sqrt(k - 1), rng.uniform(0, 2 * np.pi), 1)
                     for k in range(2, 8)]
        harmonics += [(int(k), rng.uniform(0.15, 0.35), rng.uniform(0, 2 * np.pi), 8)
                      for k in rng.integers(7, 14, 2)]  # spiculation
    else:
        b = a * rng.uniform(0.55, 0.85)
        harmonics = [(k, rng.uniform(0.0, 0.03), rng.uniform(0, 2 * np.pi), 1) for k in (2, 3)]
    echo, att, rim = _LESION_LOOK[lesion]
    return ("ellipse", cx, cz, a, b, rng.uniform(-15, 15), echo, att, rim, tuple(harmonics))


def _bmode(echo: np.ndarray, att: np.ndarray, rng: np.random.Generator, prof: Mapping[str, Any],
           psf: tuple[float, float, float], pad: int) -> np.ndarray:
    """Speckle, PSF, attenuation, TGC, noise and log compression on the beam grid -> [nd, nl] in [0, 1]."""
    shape = echo.shape  # [nd + 2p, nl + 2p]
    scat = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)) * (echo / math.sqrt(2))
    rf = np.fft.ifft2(np.fft.fft2(scat) * _psf_fft(*psf, shape))[pad:-pad, pad:-pad]  # [nd, nl]
    nd = rf.shape[0]
    a = att[pad:-pad, pad:-pad]
    loss_db = prof["attenuation_db"] * (np.cumsum(a, axis=0) - 0.5 * a) / nd  # path to mid-sample
    tgc_db = prof["tgc"] * prof["attenuation_db"] * (np.arange(nd) + 0.5) / nd
    noise = (rng.standard_normal(rf.shape) + 1j * rng.standard_normal(rf.shape)) * (
        10 ** (prof["noise_db"] / 20) / math.sqrt(2))
    env = np.abs(rf * 10 ** (-loss_db / 20) + noise)
    db = 20 * np.log10(env + 1e-12) + tgc_db[:, None] + prof["gain_db"]
    return np.clip(0.5 + db / prof["dynamic_range_db"], 0.0, 1.0)


def generate_image(rng: np.random.Generator, size: int = 128, profile: str = "highend_linear",
                   scene: str | None = None, lesion: str | None = None) -> SyntheticSample:
    """Generate one synthetic B-mode image.

    Args:
        rng: source of all randomness; the same generator state gives the same bytes.
        size: output height and width in pixels.
        profile: key of DEVICE_PROFILES (image chain; also the probe geometry when `scene` is None).
        scene: key of SCENES (an ontology path); it brings its own probe geometry, e.g. a sector
            for the heart. None: soft breast-like tissue imaged with the profile's geometry.
        lesion: one of LESIONS to draw a lesion with its mask and class, or None.

    Returns:
        The image, lesion mask, class label (None without lesion) and the scene's anatomy path.

    Raises:
        ValueError: if size is out of range or profile, scene or lesion is unknown.
    """
    if not isinstance(size, int) or not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"size must be an integer in [{MIN_SIZE}, {MAX_SIZE}], got {size!r}")
    prof = DEVICE_PROFILES[lookup_option("device profile", profile, DEVICE_PROFILES)]
    anatomy = lookup_option("scene", scene, SCENES) if scene is not None else DEFAULT_SCENE
    spec = SCENES[anatomy]
    geometry = spec["geometry"] if scene is not None else prof["geometry"]
    label = lesion_label(lesion) if lesion is not None else None
    nd, nl = size, max(16, round(size * prof["lines"]))
    psf = (prof["psf_axial"] * nd / 128, prof["psf_lateral"] * nl / 128, prof["carrier"] * nd / 128)
    pad = math.ceil(3 * max(psf[0], psf[1])) + 1
    x, z = _beam_coords(geometry, nd, nl, pad)
    # Small pose jitter of the scene (shift, scale, tilt) so no two views are identical.
    dx, dz, scale, rot = rng.uniform(-0.04, 0.04), rng.uniform(-0.02, 0.02), rng.uniform(0.92, 1.08), 0.0
    rot = math.radians(rng.uniform(-4, 4))
    xs = 0.5 + (math.cos(rot) * (x - 0.5 - dx) + math.sin(rot) * (z - 0.5 - dz)) / scale
    zs = 0.5 + (-math.sin(rot) * (x - 0.5 - dx) + math.cos(rot) * (z - 0.5 - dz)) / scale
    echo = np.full(x.shape, spec["base"][0])
    att = np.full(x.shape, spec["base"][1])
    for part in spec["parts"]:
        _paint(echo, att, xs, zs, part, rng, edge=1.0 / size)
    echo *= _texture(rng, xs, zs, spec["texture"])
    shape = _draw_lesion(rng, lesion, geometry) if lesion is not None else None
    if shape is not None:
        _paint(echo, att, x, z, shape, rng, edge=1.0 / size)
    beam = _bmode(echo, att, rng, prof, psf, pad).ravel()  # [nd * nl]
    idx, wi, wj, valid, px, pz = _scan_map(geometry, size, nd, nl)
    img = ((1 - wi) * ((1 - wj) * beam[idx] + wj * beam[idx + 1])
           + wi * ((1 - wj) * beam[idx + nl] + wj * beam[idx + nl + 1])) * valid  # [H, W]
    levels = 2 ** int(prof["bits"]) - 1
    image = (np.floor(img * levels + 0.5) * (255.0 / levels) + 0.5).astype(np.uint8)
    mask = np.zeros((size, size), np.uint8)
    if shape is not None:
        mask = ((_distance(shape, px, pz) <= 0) & valid).astype(np.uint8)
    return SyntheticSample(image=image, mask=mask, label=label, anatomy=anatomy)
