"""Predictions of a fine-tuned checkpoint on image files: a CSV, and mask and overlay PNGs a clinician can open.

CSV columns by task: classification the class and one probability per class; segmentation the mask
and overlay PNG names and the foreground fraction; landmarks `<name>_x, <name>_y` per point;
detection the boxes as JSON `[[x1, y1, x2, y2, class, score], ...]`; regression the value;
enhancement the enhanced image and a side-by-side PNG (input | enhanced): the model enhances at its own
input size (e.g. 224 px) and the result is resized to the input's, so fine detail above that size is not
restored; report generation one row per study (an image; for a two-view model the one or two images of a
folder) with the report, also written to `<study>_report.txt`, and the probability of each finding its
classifier scores (`p_<finding>`). All coordinates are pixels of the input image.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from echocare_core.checkpoint import build_from_checkpoint
from echocare_core.config import from_dict
from echocare_core.data.finetune import from_model_points
from echocare_core.data.io import ImageReadError, is_image_file, read_clip, read_image
from echocare_core.data.text import ReportTokenizer
from echocare_core.files import write_atomic
from echocare_core.models.report import ReportHeadConfig
from echocare_core.models.task import EchoCareTaskModel

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


def _colour(i: int) -> tuple[int, ...]:
    return tuple(int(c) for c in OVERLAY_COLOURS[1 + i % (len(OVERLAY_COLOURS) - 1)])


def _overlay(gray: np.ndarray, mask: np.ndarray) -> Image.Image:
    """The image in gray with each label tinted, half transparent: for a clinician to look at."""
    rgb = np.repeat(gray[..., None], 3, axis=2).astype(np.float32)
    colours = OVERLAY_COLOURS[np.minimum(mask, len(OVERLAY_COLOURS) - 1)].astype(np.float32)
    tinted = np.where(mask[..., None] > 0, 0.5 * rgb + 0.5 * colours, rgb)
    return Image.fromarray(tinted.astype(np.uint8))


def _draw(gray: np.ndarray, points: list[list[float]] = (), boxes: list[list[Any]] = ()) -> Image.Image:
    """The image with landmark crosses (one colour per point) or labelled boxes (one colour per class)."""
    im = Image.fromarray(np.repeat(gray[..., None], 3, axis=2))
    draw, r = ImageDraw.Draw(im), max(2, round(max(gray.shape) / 100))
    for i, (x, y) in enumerate(points):
        draw.line([(x - r, y), (x + r, y)], fill=_colour(i))
        draw.line([(x, y - r), (x, y + r)], fill=_colour(i))
    for x1, y1, x2, y2, name, score, c in boxes:
        draw.rectangle([x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)], outline=_colour(c))
        draw.text((x1 + 1, max(0, y1 - 11)), f"{name} {score:.2f}", fill=_colour(c))
    return im


def _header(meta: dict) -> list[str]:
    head, task = meta["head"], meta["task"]
    if task == "classification":
        return ["file", "prediction", *[f"p_{c}" for c in head["classes"]]]
    if task == "segmentation":
        return ["file", "mask", "overlay", "foreground_fraction"]
    if task == "landmarks":
        return ["file", *[f"{n}_{a}" for n in head["landmark_names"] for a in "xy"], "overlay"]
    if task == "detection":
        return ["file", "boxes", "count", "overlay"]
    if task == "enhancement":
        return ["file", "enhanced", "side_by_side"]
    if task == "report":
        return ["study", "images", "report_file", "report", *[f"p_{f}" for f in _classified(head)]]
    return ["file", head.get("target_name", "target")]


def _model_input(img: np.ndarray, meta: dict) -> torch.Tensor:
    """`[T, C, H, W]` uint8 -> the model's normalised input `[T, C, S, S]`."""
    size = meta["input"]["size"]
    x = F.interpolate(
        torch.from_numpy(img).float() / 255.0, size=(size, size), mode="bilinear", antialias=True, align_corners=False
    )
    return (x - meta["input"]["mean"]) / meta["input"]["std"]


def _predict_one(
    model: EchoCareTaskModel, meta: dict, img: np.ndarray, stem: str, out: Path, min_score: float
) -> list[str]:
    """The CSV cells after `file` for one image `[T, C, H, W]`; writes its PNGs under `out`."""
    size, task, head = meta["input"]["size"], meta["task"], meta["head"]
    height, width = img.shape[-2:]
    x = _model_input(img, meta)
    with torch.no_grad():
        raw = model(x[None] if task == "regression" else x).float()
    gray = img[0].mean(0).astype(np.uint8)
    if task == "classification":
        probs = model.decode(raw)[0].tolist()
        label = (
            ";".join(c for c, p in zip(head["classes"], probs) if p >= 0.5)
            if model.multi_label
            else head["classes"][int(np.argmax(probs))]
        )
        return [label, *[f"{p:.6f}" for p in probs]]
    if task == "regression":
        return [f"{float(model.decode(raw)[0]):.4f}"]
    if task == "enhancement":
        enhanced = F.interpolate(model.decode(raw), size=(height, width), mode="bilinear", align_corners=False)[0]
        pixels = (enhanced.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()  # [H, W, C]
        pixels = pixels[..., 0] if pixels.shape[-1] == 1 else pixels
        Image.fromarray(pixels).save(out / f"{stem}_enhanced.png")
        before = img[0].transpose(1, 2, 0)
        pair = np.concatenate([before[..., 0] if before.shape[-1] == 1 else before, pixels], axis=1)
        Image.fromarray(pair).save(out / f"{stem}_side_by_side.png")
        return [f"{stem}_enhanced.png", f"{stem}_side_by_side.png"]
    if task == "segmentation":
        labels = F.interpolate(raw, size=(height, width), mode="bilinear", align_corners=False)[0].argmax(0)
        values = np.array(sorted(int(v) for v in head["labels"]), dtype=np.uint8)
        mask = values[labels.numpy()]  # class indices back to the dataset's declared mask values
        Image.fromarray(mask).save(out / f"{stem}_mask.png")
        _overlay(gray, mask).save(out / f"{stem}_overlay.png")
        return [f"{stem}_mask.png", f"{stem}_overlay.png", f"{float((mask > 0).mean()):.6f}"]
    if task == "landmarks":
        points = from_model_points(model.decode(raw), torch.tensor([[height, width]]), size)[0].tolist()
        _draw(gray, points=points).save(out / f"{stem}_overlay.png")
        return [*[f"{c:.2f}" for p in points for c in p], f"{stem}_overlay.png"]
    det = model.decode(raw)[0]
    keep = det.scores >= min_score
    scale = torch.tensor([width, height, width, height]) / size
    boxes = [
        [*[round(v, 1) for v in (b * scale).tolist()], head["classes"][int(c)], round(float(s), 4), int(c)]
        for b, s, c in zip(det.boxes[keep], det.scores[keep], det.classes[keep])
    ]
    _draw(gray, boxes=boxes).save(out / f"{stem}_overlay.png")
    return [json.dumps([b[:6] for b in boxes]), str(len(boxes)), f"{stem}_overlay.png"]


def _studies(files: list[Path], views: int) -> list[tuple[str, list[Path]]]:
    """(name, images) of each study: every image alone for a one-view model; the images of one folder for a
    two-view model (a folder of one image: it is repeated).

    Raises:
        ValueError: a folder with more images than the model reads per report.
    """
    if views == 1:
        return [(f.stem, [f]) for f in files]
    folders: dict[Path, list[Path]] = {}
    for file in files:
        folders.setdefault(file.parent, []).append(file)
    for folder, members in folders.items():
        if len(members) > views:
            raise ValueError(
                f"{folder} holds {len(members)} images: the model reads {views} per report, from one "
                f"study folder each (put each study's images in a folder of its own)"
            )
    return [(folder.name, sorted(members) * (views // len(members))) for folder, members in folders.items()]


def _classified(head: dict) -> list[str]:
    """The findings a report model's classifier scores from the images (none without one)."""
    report = from_dict(ReportHeadConfig, head["report"], "head.report")
    return list(report.findings) if report.classifies else []


def _reports(
    model: EchoCareTaskModel, meta: dict, files: list[Path], out: Path, beam: int | None
) -> tuple[list[list[str]], int]:
    """One CSV row per study (`_studies`) and the number of studies with an unreadable image; writes each report
    to a text file."""
    head = meta["head"]
    tok = ReportTokenizer(head["tokenizer"], head["report"]["max_tokens"])
    width = head.get("beam", 1) if beam is None else beam
    if width < 1:
        raise ValueError(f"beam={width}: must be >= 1 (1: greedy)")
    rows, unreadable = [], 0
    for i, (study, views) in enumerate(_studies(files, head["report"].get("views", 1))):
        names = ";".join(str(f) for f in views)
        try:
            x = torch.cat([_model_input(read_image(f, meta["input"]["channels"])[None], meta) for f in views])
        except ImageReadError:
            unreadable += 1
            rows.append([study, names, "unreadable", "", *[""] * len(_classified(head))])
            continue
        text = tok.decode(model.generate(x[None], tok.bos, tok.eos, width)[0])
        name = f"{i:05d}_{study}_report.txt"
        (out / name).write_text(text + "\n", encoding="utf-8")
        with torch.no_grad():  # [F]; F is 0 without a classifier
            probs = model.finding_probabilities(x[None])[0]
        rows.append([study, names, name, text, *[f"{float(p):.4f}" for p in probs]])
    return rows, unreadable


def predict_files(
    checkpoint: str | Path, files: list[Path], out: str | Path, min_score: float = 0.3, beam: int | None = None
) -> tuple[Path, int]:
    """Predict every file (report generation: every study); returns the CSV written and the number of files
    (studies) that could not be read.

    Args:
        min_score: detection: boxes below this score are left out of the CSV and overlays.
        beam: report generation: beam width (1 = greedy; default: the checkpoint's).

    Raises:
        ValueError: the checkpoint is not a fine-tuned task model.
    """
    model, meta = build_from_checkpoint(checkpoint)
    if meta.get("model_kind") != "task":
        raise ValueError(f"{checkpoint}: not a fine-tuned checkpoint (echocare-finetune writes OUTPUT/best)")
    model.eval()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    channels, header = meta["input"]["channels"], _header(meta)
    rows, unreadable = _reports(model, meta, files, out, beam) if meta["task"] == "report" else ([], 0)
    for i, file in enumerate(files if meta["task"] != "report" else []):
        try:
            img = (
                read_clip(file, channels, meta["input"].get("frames", 16))
                if meta["task"] == "regression"
                else read_image(file, channels)[None]
            )  # [T, C, H, W]
        except ImageReadError:
            unreadable += 1
            rows.append([str(file), "unreadable"] + [""] * (len(header) - 2))
            continue
        rows.append([str(file), *_predict_one(model, meta, img, f"{i:05d}_{file.stem}", out, min_score)])
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows([header, *rows])
    return write_atomic(out / "predictions.csv", text.getvalue()), unreadable
