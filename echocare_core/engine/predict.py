"""Predictions of a fine-tuned checkpoint on image files: a CSV, and the PNGs a clinician can open.

Each task writes its own columns and pictures (`Task.columns`, `Task.predict_image`): classification the class and
one probability per class; segmentation the mask and overlay PNG names and the foreground fraction; landmarks
`<name>_x, <name>_y` per point; detection the boxes as JSON `[[x1, y1, x2, y2, class, score], ...]`; regression the
value; enhancement the enhanced image and a side-by-side PNG (input | enhanced); report generation one row per study
(an image; for a two-view model the one or two images of a folder) with the report, also written to
`<study>_report.txt`, and the probability of each finding its classifier scores (`p_<finding>`). All coordinates are
pixels of the input image.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from echocare_core.checkpoint import load_task_model
from echocare_core.data.io import is_image_file
from echocare_core.files import write_atomic
from echocare_core.tasks import get_task

__all__ = ["list_inputs", "predict_files"]


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
    model, meta = load_task_model(checkpoint)
    model.eval()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    task = get_task(meta.task)
    rows, unreadable = task.predict_files(
        model, meta.head, meta.input, files, out, min_score, meta.head.beam if beam is None else beam
    )
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows([task.columns(meta.head), *rows])
    return write_atomic(out / "predictions.csv", text.getvalue()), unreadable
