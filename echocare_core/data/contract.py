"""The dataset folder contract at a site and its verifier.

A dataset is a folder with `dataset.yaml` (name, task, classes or labels, channels) and
`manifest.csv` (one row per sample, paths relative to the folder). `verify_dataset` checks all of
it before anything trains and never writes to the folder.
"""

from __future__ import annotations

import csv
import json
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from echocare_core.config import did_you_mean
from echocare_core.data.io import ImageReadError, read_image
from echocare_core.data.ontology import load_ontology
from echocare_core.data.spec import DatasetSpec
from echocare_core.tasks import TASKS

__all__ = [
    "PRETRAIN",
    "DatasetSpec",
    "Problem",
    "VerifyReport",
    "load_spec",
    "read_manifest",
    "task_column",
    "patient_splits",
    "verify_dataset",
]

PRETRAIN = "pretrain"  # a pretraining folder: images, and optionally their `anatomy`


def task_column(task: str) -> str | None:
    """The manifest column a task's dataset needs besides `image` (None for a pretraining folder)."""
    return None if task == PRETRAIN else TASKS[task][0]


SPLITS = ("train", "val", "test")
LAST_FRAME = 1 - 1e-9  # read_image's frame_pick of a clip's last frame (with frame_step 1)
SPEC_KEYS = {
    "name",
    "task",
    "classes",
    "labels",
    "landmark_names",
    "channels",
    "multi_label",
    "ontology",
    "description",
    "device_profile",
    "synthetic",
    "findings",
    "target_name",
}


@dataclass(frozen=True)
class Problem:
    """One thing wrong, located as precisely as possible (row numbers count the header as row 1)."""

    file: str
    row: int | None
    column: str | None
    value: str
    allowed: str


@dataclass
class VerifyReport:
    folder: Path
    task: str | None = None
    rows: int = 0
    columns: dict[str, dict[str, Any]] = field(default_factory=dict)  # column -> required/present/missing/wrong
    problems: list[Problem] = field(default_factory=list)
    splits: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def describe(self, limit: int = 3) -> str:
        """The count and the first problems by file, row, column and what is allowed; values are left out (they
        can be patient ids or paths)."""
        first = "; ".join(
            f"{p.file}"
            + (f" row {p.row}" if p.row else "")
            + (f" column {p.column}" if p.column else "")
            + f": {p.allowed}"
            for p in self.problems[:limit]
        )
        return f"{len(self.problems)} problem(s), {'first' if len(self.problems) > limit else 'all'}: {first}"


def _spec_error(file: Path, key: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"{file}: key '{key}' = {value!r}: {allowed}")


def load_spec(folder: str | Path) -> DatasetSpec:
    """Read and check `dataset.yaml`.

    Raises:
        FileNotFoundError: no dataset.yaml in the folder.
        ValueError: a key is unknown, missing or has a value that is not allowed.
    """
    file = Path(folder) / "dataset.yaml"
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: a dataset folder needs dataset.yaml and manifest.csv")
    try:
        data = yaml.safe_load(file.read_text("utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{file}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a mapping of keys")
    for key in data:
        if key not in SPEC_KEYS:
            allowed = sorted(SPEC_KEYS)
            raise _spec_error(
                file, key, data[key], f"unknown key; allowed: {', '.join(allowed)}.{did_you_mean(str(key), allowed)}"
            )
    task = data.get("task")
    if task not in TASKS and task != PRETRAIN:
        raise _spec_error(file, "task", task, f"choose one of {', '.join([*TASKS, PRETRAIN])}")
    channels = data.get("channels", 1)
    if channels not in (1, 3):
        raise _spec_error(file, "channels", channels, "1 (grayscale) or 3")
    classes = data.get("classes") or []
    least = {"classification": 2, "detection": 1}.get(task, 0)
    if not isinstance(classes, list) or len(classes) < least or len(set(map(str, classes))) != len(classes):
        raise _spec_error(file, "classes", classes, f"a list of at least {max(least, 1)} distinct class names")
    names = data.get("landmark_names") or []
    if not isinstance(names, list) or len(set(map(str, names))) != len(names):
        raise _spec_error(file, "landmark_names", names, "a list of distinct point names, in manifest order")
    findings = data.get("findings") or []
    if (
        not isinstance(findings, list)
        or not all(isinstance(f, str) and f.strip() for f in findings)
        or len({f.lower() for f in findings}) != len(findings)
    ):
        raise _spec_error(
            file,
            "findings",
            findings,
            "a list of distinct phrases a report states only when the "
            "finding is present, e.g. [posterior shadowing, calcification]",
        )
    labels = data.get("labels") or {}
    if task == "segmentation" and (
        not isinstance(labels, dict) or not labels or not all(isinstance(k, int) and 0 <= k < 256 for k in labels)
    ):
        raise _spec_error(
            file, "labels", labels, "a mapping of mask values 0-255 to names, e.g. {0: background, 1: nodule}"
        )
    return DatasetSpec(
        name=str(data.get("name") or Path(folder).name),
        task=task,
        channels=channels,
        classes=tuple(map(str, classes)),
        labels={int(k): str(v) for k, v in labels.items()},
        multi_label=bool(data.get("multi_label", False)),
        ontology=str(data.get("ontology", "default")),
        landmark_names=tuple(map(str, names)),
        target_name=str(data.get("target_name") or "target"),
        findings=tuple(findings),
    )


def read_manifest(folder: str | Path) -> tuple[list[str], list[dict[str, str]]]:
    """Columns and rows of `manifest.csv` (all values as text).

    Raises:
        FileNotFoundError: no manifest.csv.
        ValueError: the file is not CSV with a header row.
    """
    file = Path(folder) / "manifest.csv"
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: one row per sample, columns image[, split, patient, ...]")
    with file.open(newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheet exports start with a BOM
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            raise ValueError(f"{file}: empty, expected a header row such as 'image,label'")
        rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    return [c.strip() for c in reader.fieldnames], rows


def patient_splits(
    rows: list[dict[str, str]], seed: int = 0, fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
) -> list[str]:
    """The split of every row: its `split` cell, else its patient's, else one drawn per patient with a fixed seed.

    Rows without a patient are their own patient. A row with an empty `split` joins the split its
    patient already has in another row, so a patient never ends up on both sides.
    """
    keys = [r.get("patient") or f"\0row{i}" for i, r in enumerate(rows)]
    given = {k: r["split"] for k, r in zip(keys, rows) if r.get("split")}
    free = sorted(set(keys) - set(given))
    order = np.random.default_rng(seed).permutation(len(free))
    n_train, n_val = round(fractions[0] * len(free)), round(fractions[1] * len(free))
    drawn = {
        free[p]: "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
        for rank, p in enumerate(order)
    }
    return [r.get("split") or given.get(k) or drawn[k] for k, r in zip(keys, rows)]


class _Checker:
    """Row-by-row checks; every finding becomes a `Problem` and counts against its column."""

    def __init__(self, folder: Path, spec: DatasetSpec, report: VerifyReport) -> None:
        self.folder, self.spec, self.report = folder, spec, report
        self.landmark_count: tuple[int, str] | None = None  # (count, where it was set)
        if spec.landmark_names:
            self.landmark_count = (len(spec.landmark_names), "dataset.yaml landmark_names")
        self._ontology = None

    def wrong(self, row: int | None, column: str, value: str, allowed: str, file: str = "manifest.csv") -> None:
        self.report.problems.append(Problem(file, row, column, value, allowed))
        self.report.columns.setdefault(column, {"required": False, "present": True, "missing": 0, "wrong": 0})
        self.report.columns[column]["wrong"] += 1

    def image_size(self, row: int, column: str, value: str) -> tuple[int, int] | None:
        path = self.folder / value
        if not path.is_file():
            self.wrong(row, column, value, "an existing file, relative to the dataset folder")
            return None
        try:
            if self.spec.task == "regression":  # clips: a truncated file loses its last frames first
                read_image(path, self.spec.channels, frame_step=1, frame_pick=LAST_FRAME)
            return read_image(path, self.spec.channels).shape[1:]
        except ImageReadError as exc:
            self.wrong(row, column, value, f"a PNG/JPG/BMP/TIFF/DICOM image that decodes ({str(exc).split(': ')[-1]})")
            return None

    def label(self, row: int, value: str, _: tuple[int, int] | None) -> None:
        names = value.split(";") if self.spec.multi_label else [value]
        for name in names:
            if name.strip() not in self.spec.classes:
                classes = list(self.spec.classes)
                self.wrong(
                    row,
                    "label",
                    value,
                    f"one of the classes in dataset.yaml: {', '.join(classes)}.{did_you_mean(name.strip(), classes)}",
                )

    def mask(self, row: int, value: str, size: tuple[int, int] | None) -> None:
        from PIL import Image

        path = self.folder / value
        if not path.is_file():
            return self.wrong(row, "mask", value, "an existing PNG of integer label values")
        try:
            with Image.open(path) as im:
                arr = np.asarray(im)
        except OSError as exc:
            return self.wrong(row, "mask", value, f"a PNG that decodes ({type(exc).__name__})")
        if arr.ndim != 2:
            return self.wrong(row, "mask", value, "a single-channel PNG (one label value per pixel)")
        if size is not None and arr.shape != tuple(size):
            self.wrong(
                row, "mask", value, f"the image's size {size[1]}x{size[0]} (mask is {arr.shape[1]}x{arr.shape[0]})"
            )
        undeclared = sorted(set(np.unique(arr).tolist()) - set(self.spec.labels))
        if undeclared:
            self.wrong(
                row,
                "mask",
                value,
                f"values declared in dataset.yaml labels {sorted(self.spec.labels)} (found {undeclared[:5]})",
            )

    def _json_list(self, row: int, column: str, value: str, width: int) -> list | None:
        try:
            items = json.loads(value)
        except json.JSONDecodeError:
            items = None
        if not isinstance(items, list) or any(not isinstance(it, list) or len(it) != width for it in items):
            shape = "[[x, y], ...]" if width == 2 else "[[x1, y1, x2, y2, class], ...]"
            self.wrong(row, column, value, f"a JSON list {shape}")
            return None
        return items

    def landmarks(self, row: int, value: str, size: tuple[int, int] | None) -> None:
        points = self._json_list(row, "landmarks", value, 2)
        if points is None:
            return
        if not all(isinstance(c, (int, float)) and math.isfinite(c) for p in points for c in p):
            return self.wrong(row, "landmarks", value, "finite numbers (pixel coordinates)")
        if self.landmark_count is None:
            self.landmark_count = (len(points), f"row {row}")
        elif len(points) != self.landmark_count[0]:
            self.wrong(
                row,
                "landmarks",
                value,
                f"{self.landmark_count[0]} points, as in {self.landmark_count[1]} "
                f"(landmarks keep a fixed order and count)",
            )
        if size is not None and any(not (0 <= x < size[1] and 0 <= y < size[0]) for x, y in points):
            self.wrong(row, "landmarks", value, f"points inside the {size[1]}x{size[0]} image")

    def boxes(self, row: int, value: str, size: tuple[int, int] | None) -> None:
        boxes = self._json_list(row, "boxes", value, 5)
        for x1, y1, x2, y2, name in boxes or []:
            if not all(isinstance(c, (int, float)) for c in (x1, y1, x2, y2)) or not (x1 < x2 and y1 < y2):
                self.wrong(row, "boxes", value, "x1 < x2 and y1 < y2, in pixels")
            elif size is not None and not (0 <= x1 and 0 <= y1 and x2 <= size[1] and y2 <= size[0]):
                self.wrong(row, "boxes", value, f"boxes inside the {size[1]}x{size[0]} image")
            if str(name) not in self.spec.classes:
                self.wrong(
                    row, "boxes", value, f"box classes from dataset.yaml classes: {', '.join(self.spec.classes)}"
                )

    def target(self, row: int, value: str, _: tuple[int, int] | None) -> None:
        try:
            ok = math.isfinite(float(value))
        except ValueError:
            ok = False
        if not ok:
            self.wrong(row, "target", value, "a finite number, e.g. 55.2")

    def target_image(self, row: int, value: str, size: tuple[int, int] | None) -> None:
        other = self.image_size(row, "target_image", value)
        if other is not None and size is not None and tuple(other) != tuple(size):
            self.wrong(row, "target_image", value, f"the image's size {size[1]}x{size[0]}")

    def anatomy(self, row: int, value: str) -> None:
        if self._ontology is None:
            self._ontology = load_ontology(self.spec.ontology)
        try:
            self._ontology.lookup(value)
        except ValueError as exc:
            self.wrong(row, "anatomy", value, str(exc).split(". ", 1)[-1])


def verify_dataset(folder: str | Path) -> VerifyReport:
    """Check a dataset folder against the contract; reads everything, writes nothing."""
    folder = Path(folder)
    report = VerifyReport(folder)
    try:
        spec = load_spec(folder)
        columns, rows = read_manifest(folder)
    except (FileNotFoundError, ValueError) as exc:
        report.problems.append(Problem(str(exc).split(":")[0].rsplit("/", 1)[-1], None, None, "", str(exc)))
        return report
    report.task, report.rows = spec.task, len(rows)
    column = task_column(spec.task)
    required = ["image"] + ([column] if column else [])
    for col in dict.fromkeys(required + [c for c in columns]):
        report.columns[col] = {
            "required": col in required,
            "present": col in columns,
            "missing": sum(not r.get(col) for r in rows) if col in columns else len(rows),
            "wrong": 0,
        }
    absent = [c for c in required if c not in columns]
    for col in absent:
        report.problems.append(
            Problem(
                "manifest.csv",
                1,
                col,
                "(no such column)",
                f"required for task '{spec.task}'; columns found: {', '.join(columns)}",
            )
        )
    if absent:
        return report
    _check_rows(_Checker(folder, spec, report), rows, column)
    _check_splits(report, rows)
    return report


def _check_rows(check: _Checker, rows: list[dict[str, str]], column: str | None) -> None:
    cell = {
        "label": check.label,
        "mask": check.mask,
        "landmarks": check.landmarks,
        "boxes": check.boxes,
        "target": check.target,
        "target_image": check.target_image,
    }  # any non-empty report text is fine
    for row, values in enumerate(rows, start=2):
        size = None
        if not values.get("image"):
            check.report.problems.append(Problem("manifest.csv", row, "image", "", "a path to the sample's image"))
        else:
            size = check.image_size(row, "image", values["image"])
        if values.get("image2"):  # report: the study's second image
            check.image_size(row, "image2", values["image2"])
        if column and not values.get(column):
            check.report.problems.append(
                Problem(
                    "manifest.csv",
                    row,
                    column,
                    "",
                    f"a value: every sample of a '{check.spec.task}' dataset needs one",
                )
            )
        elif column in cell:
            cell[column](row, values[column], size)
        if values.get("split") and values["split"] not in SPLITS:
            check.wrong(row, "split", values["split"], f"one of {', '.join(SPLITS)}, or empty for an automatic split")
        if values.get("anatomy"):
            check.anatomy(row, values["anatomy"])


def _check_splits(report: VerifyReport, rows: list[dict[str, str]]) -> None:
    where: dict[str, set[str]] = defaultdict(set)
    first_row: dict[str, int] = {}
    splits = patient_splits(rows)
    for row, (values, split) in enumerate(zip(rows, splits), start=2):
        if values.get("patient") and split in SPLITS:
            where[values["patient"]].add(split)
            first_row.setdefault(values["patient"], row)
    for patient, found in sorted(where.items()):
        if len(found) > 1:
            report.problems.append(
                Problem(
                    "manifest.csv",
                    first_row[patient],
                    "patient",
                    patient,
                    f"one split per patient (found in {', '.join(sorted(found))})",
                )
            )
            report.columns["patient"]["wrong"] += 1
    report.splits = dict(Counter(splits))
