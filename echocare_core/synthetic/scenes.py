"""Scenes, device profiles and probe geometries of the synthetic ultrasound generator: data, not code.

A scene is a list of primitives painted in order in image coordinates (x to the right, z down, both
in image heights; the probe face is at z = 0); see `echocare_core.synthetic.ultrasound`.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["DEFAULT_SCENE", "DEVICE_PROFILES", "GEOMETRIES", "HEART_SCENE", "LV_PART", "SCENES"]

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
    "highend_linear": dict(
        geometry="linear",
        psf_axial=0.6,
        psf_lateral=0.9,
        carrier=2.2,
        lines=1.0,
        gain_db=0.0,
        dynamic_range_db=60.0,
        noise_db=-50.0,
        attenuation_db=36.0,
        tgc=0.95,
        bits=8,
    ),
    "portable_convex": dict(
        geometry="convex",
        psf_axial=1.2,
        psf_lateral=2.0,
        carrier=3.2,
        lines=0.6,
        gain_db=-4.0,
        dynamic_range_db=48.0,
        noise_db=-32.0,
        attenuation_db=30.0,
        tgc=0.7,
        bits=7,
    ),
    "legacy_sector": dict(
        geometry="sector",
        psf_axial=1.6,
        psf_lateral=1.8,
        carrier=3.6,
        lines=0.5,
        gain_db=5.0,
        dynamic_range_db=42.0,
        noise_db=-28.0,
        attenuation_db=32.0,
        tgc=0.6,
        bits=6,
    ),
    "midrange_linear": dict(
        geometry="linear",
        psf_axial=0.9,
        psf_lateral=1.4,
        carrier=2.8,
        lines=0.8,
        gain_db=3.0,
        dynamic_range_db=54.0,
        noise_db=-42.0,
        attenuation_db=40.0,
        tgc=0.85,
        bits=8,
    ),
    "highend_convex": dict(
        geometry="convex",
        psf_axial=0.8,
        psf_lateral=1.2,
        carrier=2.4,
        lines=0.9,
        gain_db=0.0,
        dynamic_range_db=64.0,
        noise_db=-48.0,
        attenuation_db=28.0,
        tgc=0.95,
        bits=8,
    ),
    "cardiac_sector": dict(
        geometry="sector",
        psf_axial=0.9,
        psf_lateral=1.1,
        carrier=2.6,
        lines=0.9,
        gain_db=1.0,
        dynamic_range_db=58.0,
        noise_db=-44.0,
        attenuation_db=24.0,
        tgc=0.9,
        bits=8,
    ),
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
    "Thorax/Breast/Radial": dict(
        geometry="linear",
        base=(0.8, 1.0),
        texture=0.35,
        parts=[
            ("layer", 0.0, 1.8, 1.0),
            ("layer", 0.025, 0.3, 0.9),
            ("tube", 0.1, 0.05, 0.35, 0.24, 0.004, 1.6, 1.0, 0.0),  # Cooper's ligaments
            ("tube", 0.6, 0.06, 0.85, 0.25, 0.004, 1.6, 1.0, 0.0),
            ("layer", 0.24, 0.85, 1.0),
            ("layer", 0.74, 0.3, 0.9),  # glandular tissue, retromammary fat
            ("layer", 0.80, 0.5, 1.0),
            ("stripes", 0.80, 0.93, 0.03, 0.5, 8.0),  # pectoralis
            ("ellipse", 0.3, 0.99, 0.12, 0.05, 0.0, 2.5, 25.0, 2.0),
        ],
    ),  # rib and its shadow
    "Neck/Thyroid/Transverse": dict(
        geometry="linear",
        base=(0.5, 1.0),
        texture=0.15,
        parts=[
            *_WALL,
            ("stripes", 0.09, 0.2, 0.025, 0.4, 0.0),
            ("layer", 0.2, 0.55, 1.0),
            ("ellipse", 0.45, 0.42, 0.30, 0.17, 4.0, 1.0, 1.0, 0.8),  # thyroid lobe, capsule
            ("ellipse", 0.83, 0.47, 0.085, 0.085, 0.0, 0.02, 0.15, 1.2),  # common carotid artery
            ("ellipse", 0.97, 0.36, 0.07, 0.05, 0.0, 0.03, 0.15, 0.5),  # internal jugular vein
            ("ellipse", 0.0, 0.40, 0.13, 0.13, 0.0, 0.1, 6.0, 2.5),  # trachea: air shadow
            ("ellipse", 0.62, 0.8, 0.22, 0.08, 0.0, 0.35, 1.0, 0.5),
        ],
    ),  # longus colli
    "Abdomen/Liver/Subcostal oblique": dict(
        geometry="convex",
        base=(0.6, 1.0),
        texture=0.12,
        parts=[
            *_WALL,
            ("layer", 0.14, 1.8, 1.0),
            ("layer", 0.155, 0.6, 1.0),
            ("tube", 0.2, 0.3, 0.47, 0.82, 0.028, 0.02, 0.2, 0.0),  # hepatic veins
            ("tube", 0.52, 0.25, 0.5, 0.82, 0.024, 0.02, 0.2, 0.0),
            ("tube", 0.85, 0.35, 0.53, 0.82, 0.03, 0.02, 0.2, 0.0),
            ("ellipse", 0.5, 0.86, 0.09, 0.05, 0.0, 0.02, 0.2, 0.0),  # inferior vena cava
            ("tube", 0.25, 0.58, 0.45, 0.52, 0.018, 0.03, 0.2, 1.5),  # portal branch, bright wall
            ("ring", 0.5, 1.45, 0.75, 0.52, 0.0, 0.02, 3.0, 1.0),
        ],
    ),  # diaphragm
    "Thorax/Heart/Apical four-chamber": dict(
        geometry="sector",
        base=(0.25, 1.0),
        texture=0.2,
        parts=[
            ("ellipse", 0.5, 0.56, 0.34, 0.46, 0.0, 0.75, 1.0, 1.2),  # myocardium, pericardium
            ("ellipse", 0.6, 0.38, 0.1, 0.21, -10.0, 0.03, 0.1, 0.0),  # LV
            ("ellipse", 0.38, 0.42, 0.085, 0.18, 12.0, 0.03, 0.1, 0.0),  # RV
            ("ellipse", 0.61, 0.78, 0.1, 0.09, 0.0, 0.03, 0.1, 0.0),  # LA
            ("ellipse", 0.38, 0.77, 0.09, 0.09, 0.0, 0.03, 0.1, 0.0),  # RA
            ("tube", 0.52, 0.63, 0.7, 0.62, 0.006, 1.6, 1.0, 0.0),  # mitral annulus
            ("tube", 0.3, 0.62, 0.46, 0.63, 0.006, 1.6, 1.0, 0.0),
        ],
    ),  # tricuspid annulus
    "Pelvis/Bladder/Transverse": dict(
        geometry="convex",
        base=(0.55, 1.0),
        texture=0.2,
        parts=[
            *_WALL,
            ("stripes", 0.09, 0.18, 0.03, 0.4, 0.0),
            ("layer", 0.18, 0.6, 1.0),
            ("ellipse", 0.5, 0.46, 0.3, 0.22, 0.0, 0.015, 0.05, 1.0, ((4, 0.07, math.pi, 1),)),
            ("ellipse", 0.5, 0.86, 0.2, 0.09, 0.0, 0.7, 1.0, 0.4),
        ],
    ),  # uterus / prostate
    "Fetus/Fetal head/Transthalamic": dict(
        geometry="convex",
        base=(0.5, 1.0),
        texture=0.2,
        parts=[
            ("layer", 0.0, 1.5, 1.0),
            ("layer", 0.02, 0.35, 0.9),
            ("layer", 0.1, 0.6, 1.0),
            ("ellipse", 0.5, 0.6, 0.55, 0.42, 0.0, 0.03, 0.1, 0.6),  # amniotic fluid
            ("ellipse", 0.5, 0.56, 0.27, 0.21, 12.0, 0.3, 1.0, 0.0),  # brain
            ("tube", 0.256, 0.508, 0.744, 0.612, 0.004, 1.4, 1.0, 0.0),  # midline echo
            ("ellipse", 0.491, 0.604, 0.05, 0.035, 12.0, 0.12, 1.0, 0.0),  # thalami
            ("ellipse", 0.509, 0.516, 0.05, 0.035, 12.0, 0.12, 1.0, 0.0),
            ("ellipse", 0.402, 0.539, 0.035, 0.018, 12.0, 0.02, 0.2, 0.3),  # cavum septi pellucidi
            ("ring", 0.5, 0.56, 0.28, 0.22, 12.0, 0.02, 3.5, 15.0),
        ],
    ),  # skull
    "Abdomen/Kidney/Longitudinal": dict(
        geometry="convex",
        base=(0.55, 1.0),
        texture=0.15,
        parts=[
            *_WALL,
            ("layer", 0.16, 0.55, 1.0),
            ("ellipse", 0.15, 0.2, 0.45, 0.3, 20.0, 0.6, 1.0, 0.5),  # liver tip
            ("ellipse", 0.52, 0.55, 0.34, 0.16, -12.0, 0.85, 1.0, 0.8),  # perirenal fat
            ("ellipse", 0.52, 0.55, 0.30, 0.13, -12.0, 0.35, 1.0, 0.0),  # cortex
            *[
                ("ellipse", x, z, 0.035, 0.03, -12.0, 0.12, 1.0, 0.0)  # medullary pyramids
                for x, z in ((0.375, 0.494), (0.629, 0.44), (0.411, 0.66), (0.665, 0.606))
            ],
            ("ellipse", 0.52, 0.55, 0.17, 0.05, -12.0, 1.6, 1.0, 0.0),
        ],
    ),  # renal sinus fat
    "Limbs/Muscle/Longitudinal": dict(
        geometry="linear",
        base=(0.45, 1.0),
        texture=0.1,
        parts=[
            ("layer", 0.0, 1.8, 1.0),
            ("layer", 0.02, 0.3, 0.9),
            ("layer", 0.16, 1.6, 1.0),
            ("layer", 0.175, 0.45, 1.0),
            ("stripes", 0.175, 0.8, 0.035, 0.6, 12.0),
            ("tube", -0.1, 0.5, 1.1, 0.46, 0.006, 1.5, 1.0, 0.0),  # intermuscular septum
            ("tube", -0.1, 0.83, 1.1, 0.83, 0.008, 4.0, 1.0, 0.0),  # bone surface
            ("layer", 0.84, 0.5, 60.0),
        ],
    ),  # acoustic shadow
    "Thorax/Lung/Pleural line": dict(
        geometry="linear",
        base=(0.4, 1.0),
        texture=0.1,
        parts=[
            *_WALL,
            ("stripes", 0.09, 0.3, 0.03, 0.4, 0.0),
            ("layer", 0.33, 0.12, 0.3),
            ("tube", -0.1, 0.335, 1.1, 0.335, 0.008, 3.0, 1.0, 0.0),  # pleural line
            ("tube", -0.1, 0.67, 1.1, 0.67, 0.007, 1.2, 0.3, 0.0),  # A-line reverberation
            ("ellipse", 0.05, 0.3, 0.1, 0.045, 0.0, 2.5, 25.0, 2.0),  # ribs and shadows
            ("ellipse", 0.95, 0.3, 0.1, 0.045, 0.0, 2.5, 25.0, 2.0),
        ],
    ),
}
DEFAULT_SCENE = "Thorax/Breast/Radial"
HEART_SCENE = "Thorax/Heart/Apical four-chamber"
LV_PART = 1  # index of the left ventricle in SCENES[HEART_SCENE]["parts"]
