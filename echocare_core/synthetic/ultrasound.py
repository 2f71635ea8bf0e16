"""Synthetic ultrasound B-mode images and dataset folders, for tests, demos and benchmarks.

The image chain follows a real scanner closely enough for speckle statistics to be realistic:
a complex Gaussian scatterer field (fully developed speckle) weighted by a tissue reflectivity map
is convolved (FFT) with a point-spread function (Gaussian envelope with an axial cosine carrier);
the envelope is attenuated along each beam, partly restored by time-gain compensation, log-compressed
to the device's dynamic range, scan-converted from the beam grid (depth x line) to the Cartesian
image with bilinear interpolation, and quantised. Everything draws from the caller's
`np.random.Generator`, so one seed gives byte-identical images. numpy only.

Scenes and device profiles are data (`scenes`): a scene is a list of primitives painted in
order in image coordinates (x to the right, z down, both in image heights; the probe face is at z = 0). Pixel
column j has its centre at x = (j + 0.5) / size, so a point's pixel coordinate is x * size - 0.5.

Lesions carry their own labels: masks, tight boxes and calipers (the points where the lesion's two
axes cross its boundary), so one image serves classification, segmentation, detection and
landmarks. `generate_echo_clip` animates the heart scene's left ventricle over one cardiac cycle.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from echocare_core.config import did_you_mean
from echocare_core.synthetic.scenes import DEFAULT_SCENE, DEVICE_PROFILES, GEOMETRIES, HEART_SCENE, LV_PART, SCENES

logger = logging.getLogger(__name__)

__all__ = [
    "CLASSES",
    "DEFAULT_SCENE",
    "DEVICE_PROFILES",
    "GEOMETRIES",
    "HEART_SCENE",
    "LANDMARK_NAMES",
    "LESIONS",
    "SCENES",
    "TASKS",
    "SyntheticSample",
    "generate_echo_clip",
    "generate_image",
    "lesion_label",
    "lv_scale",
    "profile_for_site",
]

TASKS = ("classification", "segmentation", "pretrain", "landmarks", "detection", "regression", "enhancement", "report")
ENHANCEMENT_PAIR = ("portable_convex", "highend_convex")  # enhancement: the input's device and the target's
LESIONS = ("cyst", "hypoechoic", "hyperechoic", "irregular")
CLASSES = ("benign", "malignant")
SPLIT_FRACTIONS = {"train": 0.70, "val": 0.15, "test": 0.15}
MIN_SIZE, MAX_SIZE = 32, 1024
MAX_LESIONS = 3

# Calipers, in this order. Each axis' "a" end is its left end (smaller x) when the axis is closer
# to horizontal, else its upper end (smaller z): lesions tilt at most 15 degrees, so no axis sits
# near the diagonal where that rule would flip.
LANDMARK_NAMES = ("long_axis_a", "long_axis_b", "short_axis_a", "short_axis_b")
# Several lesions share the field of view side by side: the x range (image heights) whose slots
# stay inside each geometry's fan at lesion depths, and the gap kept between neighbours.
_LESION_SPAN = {"linear": (0.06, 0.94), "convex": (0.08, 0.92), "sector": (0.22, 0.78)}
_LESION_GAP = 0.03

# echo, att, rim per lesion kind: cysts enhance behind, irregular masses shadow.
_LESION_LOOK = {
    "cyst": (0.015, 0.02, 0.5),
    "hypoechoic": (0.25, 1.0, 0.3),
    "hyperechoic": (2.4, 1.4, 0.0),
    "irregular": (0.15, 3.5, 0.6),
}


@dataclass(frozen=True, eq=False)
class SyntheticSample:
    """One synthetic B-mode image.

    Attributes:
        image: [H, W] uint8 B-mode image; 0 outside the field of view.
        mask: [H, W] uint8, 1 inside a lesion, 0 elsewhere (all 0 without a lesion).
        label: "benign" or "malignant" ("malignant" if any lesion is) when a lesion was drawn, else None.
        anatomy: full ontology path of the scene template.
        lesions: kind of each lesion (from LESIONS), left to right.
        boxes: [N, 4] int64 tight box of each lesion's mask, pixel edges x1, y1, x2, y2 (x2, y2 exclusive).
        calipers: [N, 4, 2] float64 pixel coordinates (x, y) of each lesion's points in LANDMARK_NAMES order.
    """

    image: np.ndarray
    mask: np.ndarray
    label: str | None
    anatomy: str | None
    lesions: tuple[str, ...]
    boxes: np.ndarray
    calipers: np.ndarray


def lookup_option(what: str, value: str, allowed: Mapping[str, Any] | tuple[str, ...]) -> str:
    if value in allowed:
        return value
    raise ValueError(f"unknown {what} {value!r}; allowed: {', '.join(allowed)}.{did_you_mean(value, list(allowed))}")


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


def _beam_position(geometry: str, x: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Depth and line fractions (t, u) of image points; both in [0, 1] inside the field of view."""
    g = GEOMETRIES[geometry]
    if g["half_angle"] == 0.0:
        return z, x
    r = np.hypot(x - 0.5, z + g["apex"])
    return r - g["apex"], np.arctan2(x - 0.5, z + g["apex"]) / (2.0 * g["half_angle"]) + 0.5


@functools.lru_cache(maxsize=32)
def _scan_map(geometry: str, size: int, nd: int, nl: int) -> tuple[np.ndarray, ...]:
    """Precomputed scan conversion: flat beam index, bilinear weights, fan mask, pixel x and z."""
    c = (np.arange(size) + 0.5) / size
    x, z = np.meshgrid(c, c)  # [H, W]
    t, u = _beam_position(geometry, x, z)
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
    h = np.exp(-(zz**2) / (2 * sa**2) - xx**2 / (2 * sl**2)) * np.cos(2 * np.pi * zz / carrier)
    h /= np.sqrt(np.sum(h**2))  # unit-echo tissue gives unit mean intensity
    k = np.zeros(shape)
    k[: 2 * ha + 1, : 2 * hl + 1] = h
    k = np.fft.fft2(np.roll(k, (-ha, -hl), axis=(0, 1)))
    k.flags.writeable = False
    return k


def _boundary(harmonics: Sequence[tuple], phi: np.ndarray) -> np.ndarray:
    """Boundary radius of a harmonic ellipse, in units of its semi-axes, at angle phi of its (u, v) frame."""
    boundary = np.ones_like(phi)
    for k, amp, phase, power in harmonics:
        wave = np.cos(k * phi + phase)
        boundary = boundary + amp * (wave if power == 1 else np.maximum(wave, 0) ** power)
    return boundary


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
    harmonics = part[9] if kind == "ellipse" and len(part) > 9 else ()
    boundary = _boundary(harmonics, np.arctan2(v, u)) if harmonics else 1.0
    d = (rho - boundary) * min(a, b)
    return np.abs(d) - part[6] / 2 if kind == "ring" else d


def _paint(
    echo: np.ndarray, att: np.ndarray, x: np.ndarray, z: np.ndarray, part: tuple, rng: np.random.Generator, edge: float
) -> None:
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
        harmonics = [(k, rng.uniform(0.05, 0.12) / math.sqrt(k - 1), rng.uniform(0, 2 * np.pi), 1) for k in range(2, 8)]
        harmonics += [
            (int(k), rng.uniform(0.15, 0.35), rng.uniform(0, 2 * np.pi), 8) for k in rng.integers(7, 14, 2)
        ]  # spiculation
    else:
        b = a * rng.uniform(0.55, 0.85)
        harmonics = [(k, rng.uniform(0.0, 0.03), rng.uniform(0, 2 * np.pi), 1) for k in (2, 3)]
    echo, att, rim = _LESION_LOOK[lesion]
    return ("ellipse", cx, cz, a, b, rng.uniform(-15, 15), echo, att, rim, tuple(harmonics))


def _boundary_offsets(shape: tuple, phi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Offsets (dx, dz) from an ellipse primitive's centre to its boundary at angles phi of its (u, v) frame."""
    a, b, rot = shape[3:6]
    r = _boundary(shape[9], phi)
    u, v = a * r * np.cos(phi), b * r * np.sin(phi)  # along the ellipse's own axes
    c, s = math.cos(math.radians(rot)), math.sin(math.radians(rot))
    return c * u - s * v, s * u + c * v


def _place_lesions(rng: np.random.Generator, kinds: tuple[str, ...], geometry: str) -> list[tuple]:
    """Lesion shapes; several go into side-by-side slots of the view, shrunk to fit, so they never touch."""
    shapes = [_draw_lesion(rng, kind, geometry) for kind in kinds]
    if len(shapes) == 1:
        return shapes
    lo, hi = _LESION_SPAN[geometry]
    slot = (hi - lo) / len(shapes)
    phi = np.linspace(-np.pi, np.pi, 720, endpoint=False)
    placed = []
    for k, shape in enumerate(shapes):
        primitive, _, cz, a, b, *rest = shape
        dx = _boundary_offsets(shape, phi)[0]  # [720]
        width = float(dx.max() - dx.min())
        scale = min(1.0, (slot - _LESION_GAP) / width)
        left = lo + k * slot + _LESION_GAP / 2 + rng.uniform(0.0, max(0.0, slot - _LESION_GAP - scale * width))
        placed.append((primitive, left - scale * float(dx.min()), cz, a * scale, b * scale, *rest))
    return placed


def _calipers(shape: tuple, geometry: str, size: int) -> np.ndarray:
    """Pixel (x, y) of the points where a lesion's axes cross its boundary, in LANDMARK_NAMES order: [4, 2].

    An axis end outside the image or the field of view is pulled back along the axis to its last
    visible point, where the lesion's visible mask ends too.
    """
    end_dx, end_dz = _boundary_offsets(shape, np.array([0.0, np.pi, np.pi / 2, -np.pi / 2]))  # [4] each
    steps = np.linspace(0.0, 1.0, 4 * size + 1)[:, None]  # [S, 1], finer than a quarter pixel
    x, z = shape[1] + steps * end_dx, shape[2] + steps * end_dz  # [S, 4]
    t, u = _beam_position(geometry, x, z)
    lo, hi = 0.5 / size, 1.0 - 0.5 / size  # pixel centres 0 and size - 1
    seen = (t >= 0) & (t <= 1) & (u >= 0) & (u <= 1) & (x >= lo) & (x <= hi) & (z >= lo) & (z <= hi)
    last = np.where(seen.all(axis=0), len(steps) - 1, np.argmin(seen, axis=0) - 1)  # [4]; the centre is seen
    points = np.stack([x[last, np.arange(4)], z[last, np.arange(4)]], axis=1) * size - 0.5  # [4, 2]
    # The measured longer axis first (sorted is stable: a tie keeps the ellipse's own first axis).
    axes = sorted((points[:2], points[2:]), key=lambda ends: -float(np.hypot(*(ends[1] - ends[0]))))
    return np.concatenate([_ordered_ends(ends) for ends in axes])


def _ordered_ends(ends: np.ndarray) -> np.ndarray:
    """An axis' two end points [2, 2], the "a" end first (see LANDMARK_NAMES)."""
    dx, dz = np.abs(ends[1] - ends[0])
    key = 0 if dx >= dz else 1  # x for a flat axis, z for a steep one
    return ends if ends[0, key] <= ends[1, key] else ends[::-1]


def _lesion_labels(
    shapes: list[tuple], geometry: str, size: int, px: np.ndarray, pz: np.ndarray, valid: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Union mask [H, W] uint8, boxes [N, 4] int64 and calipers [N, 4, 2] of the lesions, as seen in the view."""
    masks = [(_distance(shape, px, pz) <= 0) & valid for shape in shapes]  # N x [H, W]
    mask = np.zeros((size, size), np.uint8)
    boxes = np.zeros((len(shapes), 4), np.int64)
    for k, m in enumerate(masks):
        mask |= m.astype(np.uint8)
        rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
        boxes[k] = cols[0], rows[0], cols[-1] + 1, rows[-1] + 1
    calipers = np.array([_calipers(shape, geometry, size) for shape in shapes]).reshape(-1, 4, 2)
    return mask, boxes, calipers


def _bmode(
    echo: np.ndarray,
    att: np.ndarray,
    rng: np.random.Generator,
    prof: Mapping[str, Any],
    psf: tuple[float, float, float],
    pad: int,
) -> np.ndarray:
    """Speckle, PSF, attenuation, TGC, noise and log compression on the beam grid -> [nd, nl] in [0, 1]."""
    shape = echo.shape  # [nd + 2p, nl + 2p]
    scat = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)) * (echo / math.sqrt(2))
    rf = np.fft.ifft2(np.fft.fft2(scat) * _psf_fft(*psf, shape))[pad:-pad, pad:-pad]  # [nd, nl]
    nd = rf.shape[0]
    a = att[pad:-pad, pad:-pad]
    loss_db = prof["attenuation_db"] * (np.cumsum(a, axis=0) - 0.5 * a) / nd  # path to mid-sample
    tgc_db = prof["tgc"] * prof["attenuation_db"] * (np.arange(nd) + 0.5) / nd
    noise = (rng.standard_normal(rf.shape) + 1j * rng.standard_normal(rf.shape)) * (
        10 ** (prof["noise_db"] / 20) / math.sqrt(2)
    )
    env = np.abs(rf * 10 ** (-loss_db / 20) + noise)
    db = 20 * np.log10(env + 1e-12) + tgc_db[:, None] + prof["gain_db"]
    return np.clip(0.5 + db / prof["dynamic_range_db"], 0.0, 1.0)


def _lesion_kinds(lesion: str | Sequence[str] | None) -> tuple[str, ...]:
    kinds = () if lesion is None else (lesion,) if isinstance(lesion, str) else tuple(lesion)
    if lesion is not None and not 1 <= len(kinds) <= MAX_LESIONS:
        raise ValueError(f"lesion must be a kind or a sequence of 1 to {MAX_LESIONS} kinds, got {lesion!r}")
    for kind in kinds:
        lookup_option("lesion", kind, LESIONS)
    return kinds


def _scene_maps(
    rng: np.random.Generator, spec: Mapping[str, Any], parts: Sequence[tuple], x: np.ndarray, z: np.ndarray, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Reflectivity and attenuation of the scene under a small random pose: [nd + 2p, nl + 2p] each."""
    # Small pose jitter of the scene (shift, scale, tilt) so no two views are identical.
    dx, dz, scale = rng.uniform(-0.04, 0.04), rng.uniform(-0.02, 0.02), rng.uniform(0.92, 1.08)
    rot = math.radians(rng.uniform(-4, 4))
    xs = 0.5 + (math.cos(rot) * (x - 0.5 - dx) + math.sin(rot) * (z - 0.5 - dz)) / scale
    zs = 0.5 + (-math.sin(rot) * (x - 0.5 - dx) + math.cos(rot) * (z - 0.5 - dz)) / scale
    echo = np.full(x.shape, spec["base"][0])
    att = np.full(x.shape, spec["base"][1])
    for part in parts:
        _paint(echo, att, xs, zs, part, rng, edge=1.0 / size)
    echo *= _texture(rng, xs, zs, spec["texture"])
    return echo, att


def generate_image(
    rng: np.random.Generator,
    size: int = 128,
    profile: str = "highend_linear",
    scene: str | None = None,
    lesion: str | Sequence[str] | None = None,
    *,
    parts: Sequence[tuple] | None = None,
) -> SyntheticSample:
    """Generate one synthetic B-mode image.

    Args:
        rng: source of all randomness; the same generator state gives the same bytes.
        size: output height and width in pixels.
        profile: key of DEVICE_PROFILES (image chain; also the probe geometry when `scene` is None).
        scene: key of SCENES (an ontology path); it brings its own probe geometry, e.g. a sector
            for the heart. None: soft breast-like tissue imaged with the profile's geometry.
        lesion: one of LESIONS to draw a lesion with its mask, box, calipers and class; a sequence
            of 1 to MAX_LESIONS kinds for side-by-side lesions that never touch (left to right); or None.
        parts: scene primitives painted instead of the scene's own (see SCENES); the same kinds of
            primitive in the same order consume the same random draws, so a shape can change between
            calls with everything else (pose, tissue, speckle) unchanged.

    Returns:
        The image, lesion mask, class label (None without lesion), the scene's anatomy path and
        each lesion's kind, box and calipers.

    Raises:
        ValueError: if size is out of range, profile, scene or a lesion kind is unknown, there are
            too many lesions or a part is not a known primitive.
    """
    if not isinstance(size, int) or not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"size must be an integer in [{MIN_SIZE}, {MAX_SIZE}], got {size!r}")
    prof = DEVICE_PROFILES[lookup_option("device profile", profile, DEVICE_PROFILES)]
    anatomy = lookup_option("scene", scene, SCENES) if scene is not None else DEFAULT_SCENE
    spec = SCENES[anatomy]
    geometry = spec["geometry"] if scene is not None else prof["geometry"]
    kinds = _lesion_kinds(lesion)
    nd, nl = size, max(16, round(size * prof["lines"]))
    psf = (prof["psf_axial"] * nd / 128, prof["psf_lateral"] * nl / 128, prof["carrier"] * nd / 128)
    pad = math.ceil(3 * max(psf[0], psf[1])) + 1
    x, z = _beam_coords(geometry, nd, nl, pad)
    echo, att = _scene_maps(rng, spec, spec["parts"] if parts is None else parts, x, z, size)
    shapes = _place_lesions(rng, kinds, geometry) if kinds else []
    for shape in shapes:  # in image coordinates: lesions do not follow the scene's pose
        _paint(echo, att, x, z, shape, rng, edge=1.0 / size)
    beam = _bmode(echo, att, rng, prof, psf, pad).ravel()  # [nd * nl]
    idx, wi, wj, valid, px, pz = _scan_map(geometry, size, nd, nl)
    img = (
        (1 - wi) * ((1 - wj) * beam[idx] + wj * beam[idx + 1])
        + wi * ((1 - wj) * beam[idx + nl] + wj * beam[idx + nl + 1])
    ) * valid  # [H, W]
    levels = 2 ** int(prof["bits"]) - 1
    image = (np.floor(img * levels + 0.5) * (255.0 / levels) + 0.5).astype(np.uint8)
    mask, boxes, calipers = _lesion_labels(shapes, geometry, size, px, pz, valid)
    labels = {lesion_label(kind) for kind in kinds}
    label = ("malignant" if "malignant" in labels else "benign") if kinds else None
    return SyntheticSample(
        image=image, mask=mask, label=label, anatomy=anatomy, lesions=kinds, boxes=boxes, calipers=calipers
    )


def lv_scale(t: float, frames: int, ejection_fraction: float) -> float:
    """Left-ventricle scale at frame t of a `frames`-frame cycle.

    1 at end-diastole (t = 0) and s_min = (1 - EF/100)^(1/3) at end-systole (t = frames / 2), so the
    cavity volume (~ scale^3) falls by the ejection fraction: s(t) = 1 - (1 - s_min)(1 - cos(2 pi t / T)) / 2.

    Raises:
        ValueError: if ejection_fraction is not in (0, 100) or frames < 1.
    """
    if not 0.0 < ejection_fraction < 100.0:
        raise ValueError(f"ejection_fraction must be a percentage in (0, 100), got {ejection_fraction!r}")
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames!r}")
    s_min = (1.0 - ejection_fraction / 100.0) ** (1.0 / 3.0)
    return 1.0 - (1.0 - s_min) * (0.5 - 0.5 * math.cos(2.0 * math.pi * t / frames))


def generate_echo_clip(
    rng: np.random.Generator,
    size: int = 128,
    profile: str = "cardiac_sector",
    *,
    ejection_fraction: float,
    ed_scale: float = 1.0,
    frames: int = 16,
) -> np.ndarray:
    """One cardiac cycle of the apical four-chamber view (HEART_SCENE), frame 0 at end-diastole.

    Every frame is drawn from the same generator state, so pose, tissue and speckle stay put and only
    the left ventricle moves: it scales about its centre by `ed_scale * lv_scale(t, frames, ejection_fraction)`.
    `rng` ends where one `generate_image` call would leave it.

    Args:
        rng: source of all randomness.
        size: frame height and width in pixels.
        profile: key of DEVICE_PROFILES (the sector geometry comes from the scene).
        ejection_fraction: percent of the end-diastolic volume ejected, in (0, 100).
        ed_scale: size of the end-diastolic ventricle relative to the scene's, in [0.5, 1.5].
        frames: frames per cycle, >= 2.

    Returns:
        [frames, H, W] uint8 B-mode frames.

    Raises:
        ValueError: if ejection_fraction, ed_scale or frames is out of range, or as generate_image.
    """
    if not 0.5 <= ed_scale <= 1.5:
        raise ValueError(f"ed_scale must be in [0.5, 1.5] (1 = the scene's ventricle), got {ed_scale!r}")
    if not isinstance(frames, int) or frames < 2:
        raise ValueError(f"frames must be an integer >= 2 (one cardiac cycle), got {frames!r}")
    base = SCENES[HEART_SCENE]["parts"]
    kind, cx, cz, a, b, *rest = base[LV_PART]
    out = np.empty((frames, size, size), np.uint8)  # [T, H, W]
    for t in range(frames):
        scale = ed_scale * lv_scale(t, frames, ejection_fraction)  # checks ejection_fraction before any work
        parts = [*base[:LV_PART], (kind, cx, cz, a * scale, b * scale, *rest), *base[LV_PART + 1 :]]
        frame_rng = rng if t == frames - 1 else copy.deepcopy(rng)
        out[t] = generate_image(frame_rng, size, profile, scene=HEART_SCENE, parts=parts).image
    return out
