"""The pictures `echocare-predict` writes beside its CSV for a clinician to open: label overlays, landmark crosses and
labelled boxes on the input image."""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["draw", "gray_of", "overlay"]

OVERLAY_COLOURS = np.array([[0, 0, 0], [255, 64, 64], [64, 200, 255], [255, 210, 0], [120, 255, 120]], np.uint8)


def _colour(i: int) -> tuple[int, ...]:
    return tuple(int(c) for c in OVERLAY_COLOURS[1 + i % (len(OVERLAY_COLOURS) - 1)])


def overlay(gray: np.ndarray, mask: np.ndarray) -> Image.Image:
    """The image in gray with each label tinted, half transparent."""
    rgb = np.repeat(gray[..., None], 3, axis=2).astype(np.float32)
    colours = OVERLAY_COLOURS[np.minimum(mask, len(OVERLAY_COLOURS) - 1)].astype(np.float32)
    tinted = np.where(mask[..., None] > 0, 0.5 * rgb + 0.5 * colours, rgb)
    return Image.fromarray(tinted.astype(np.uint8))


def draw(gray: np.ndarray, points: list[list[float]] = (), boxes: list[list[Any]] = ()) -> Image.Image:
    """The image with landmark crosses (one colour per point) or labelled boxes
    (`[x1, y1, x2, y2, name, score, class]`, one colour per class)."""
    im = Image.fromarray(np.repeat(gray[..., None], 3, axis=2))
    pen, r = ImageDraw.Draw(im), max(2, round(max(gray.shape) / 100))
    for i, (x, y) in enumerate(points):
        pen.line([(x - r, y), (x + r, y)], fill=_colour(i))
        pen.line([(x, y - r), (x, y + r)], fill=_colour(i))
    for x1, y1, x2, y2, name, score, c in boxes:
        pen.rectangle([x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)], outline=_colour(c))
        pen.text((x1 + 1, max(0, y1 - 11)), f"{name} {score:.2f}", fill=_colour(c))
    return im


def gray_of(img: np.ndarray) -> np.ndarray:
    """The first frame of `[T, C, H, W]` uint8 pixels as one gray `[H, W]` image."""
    return img[0].mean(0).astype(np.uint8)
