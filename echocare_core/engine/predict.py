"""Predictions of a fine-tuned checkpoint on image files: a CSV, and mask and overlay PNGs for dense tasks."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from echocare_core.checkpoint import build_from_checkpoint
from echocare_core.data.io import ImageReadError, is_image_file, read_image

__all__ = ["list_inputs", "predict_files"]

OVERLAY_COLOURS = np.array([[0, 0, 0], [255, 64, 64], [64, 200, 255], [255, 210, 0], [120, 255, 120]], np.uint8)


def list_inputs(source: str | Path) -> list[Path]:
    """An image file, or the images below a folder (sorted).

    Raises:
        FileNotFoundError: nothing there, or no image in the folder.
    """
    source = Path(source)
    if source.is_file():
        return [source]
    files = sorted(p for p in source.rglob("*") if p.is_file() and is_image_file(p)) if source.is_dir() else []
    if not files:
        raise FileNotFoundError(f"{source}: no PNG/JPG/BMP/TIFF/DICOM image found")
    return files


def _overlay(gray: np.ndarray, mask: np.ndarray) -> Image.Image:
    """The image in gray with each label tinted, half transparent: for a clinician to look at."""
    rgb = np.repeat(gray[..., None], 3, axis=2).astype(np.float32)
    colours = OVERLAY_COLOURS[np.minimum(mask, len(OVERLAY_COLOURS) - 1)].astype(np.float32)
    tinted = np.where(mask[..., None] > 0, 0.5 * rgb + 0.5 * colours, rgb)
    return Image.fromarray(tinted.astype(np.uint8))


def predict_files(checkpoint: str | Path, files: list[Path], out: str | Path) -> tuple[Path, int]:
    """Predict every file; returns the CSV written and the number of files that could not be read.

    Classification rows carry the predicted class and one probability per class; segmentation rows
    the mask and overlay PNGs (at the image's own size) and the foreground fraction.

    Raises:
        ValueError: the checkpoint is not a fine-tuned task model.
    """
    model, meta = build_from_checkpoint(checkpoint)
    if meta.get("model_kind") != "task":
        raise ValueError(f"{checkpoint}: not a fine-tuned checkpoint (echocare-finetune writes OUTPUT/best)")
    model.eval()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    size, channels, classes = meta["input"]["size"], meta["input"]["channels"], meta["head"]["classes"]
    header = ["file", "prediction", *[f"p_{c}" for c in classes]] if meta["task"] == "classification" \
        else ["file", "mask", "overlay", "foreground_fraction"]
    rows, unreadable = [], 0
    for i, file in enumerate(files):
        try:
            img = read_image(file, channels)
        except ImageReadError:
            unreadable += 1
            rows.append([str(file), "unreadable"] + [""] * (len(header) - 2))
            continue
        x = F.interpolate(torch.from_numpy(img).float()[None] / 255.0, size=(size, size), mode="bilinear",
                          antialias=True, align_corners=False)
        with torch.no_grad():
            logits = model((x - meta["input"]["mean"]) / meta["input"]["std"])[0].float()
        if meta["task"] == "classification":
            probs = model.probabilities(logits).tolist()
            label = (";".join(c for c, p in zip(classes, probs) if p >= 0.5) if model.multi_label
                     else classes[int(np.argmax(probs))])
            rows.append([str(file), label, *[f"{p:.6f}" for p in probs]])
            continue
        labels = F.interpolate(logits[None], size=img.shape[1:], mode="bilinear", align_corners=False)[0].argmax(0)
        values = np.array(sorted(int(v) for v in meta["head"]["labels"]), dtype=np.uint8)
        mask = values[labels.numpy()]  # class indices back to the dataset's declared mask values
        stem = f"{i:05d}_{file.stem}"
        Image.fromarray(mask).save(out / f"{stem}_mask.png")
        _overlay(img.mean(0).astype(np.uint8), mask).save(out / f"{stem}_overlay.png")
        rows.append([str(file), f"{stem}_mask.png", f"{stem}_overlay.png", f"{float((mask > 0).mean()):.6f}"])
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows([header, *rows])
    target = out / "predictions.csv"
    tmp = out / ".predictions.csv.tmp"
    tmp.write_text(text.getvalue(), encoding="utf-8")
    os.replace(tmp, target)
    return target, unreadable
