"""Evaluation of a fine-tuned checkpoint on a dataset split, with bootstrap confidence intervals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from echocare_core.checkpoint import load_task_model
from echocare_core.data.contract import DatasetSpec
from echocare_core.engine.quality import QualityWeights, quality_metrics
from echocare_core.engine.training import check_dataset, predict
from echocare_core.tasks import get_task
from echocare_core.tasks.base import Task
from echocare_core.tasks.dataset import TaskDataset, collate_task, split_rows
from echocare_core.tasks.model import TaskMeta

__all__ = ["evaluate_checkpoint", "bootstrap_ci", "check_fits"]


def check_fits(meta: TaskMeta, spec: DatasetSpec, checkpoint: str | Path) -> None:
    """Refuse a checkpoint made for another task or other classes, mask values or points than the dataset's.

    Raises:
        ValueError: naming both sides.
    """
    if meta.task != spec.task:
        raise ValueError(f"{checkpoint} was trained for {meta.task}, the dataset is {spec.task}")
    mismatch = get_task(meta.task).mismatch(meta.head.declared, spec, "the checkpoint's")
    if mismatch:
        raise ValueError(f"{checkpoint} does not fit the dataset: {mismatch}")


def bootstrap_ci(
    task: Task, pred: Any, true: Any, k: int, groups: list[str], rounds: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """95% percentile bootstrap interval of the task's main metric, resampling patients (`groups`),
    since images of one patient are not independent (`Task.resampled`)."""
    rng = np.random.default_rng(seed)
    names = sorted(set(groups))
    members = {g: np.flatnonzero(np.asarray(groups) == g) for g in names}
    metric = task.resampled(pred, true, k)
    values = np.asarray(
        [
            metric(np.concatenate([members[names[j]] for j in rng.integers(0, len(names), len(names))]))
            for _ in range(rounds)
        ],
        dtype=float,
    )
    values = values[np.isfinite(values)]
    return (float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))) if len(values) else (np.nan, np.nan)


def evaluate_checkpoint(
    checkpoint: str | Path,
    folder: str | Path,
    split: str = "test",
    split_seed: int | None = None,
    batch_size: int = 16,
    rounds: int = 1000,
    quality: QualityWeights = QualityWeights(),
    beam: int | None = None,
) -> dict:
    """Metrics of a fine-tuned checkpoint on one split of a dataset folder, with a 95% CI for the main metric;
    for enhancement also PIQE, and FID, BRISQUE and NIQE when `quality` names their files; reports are written with
    beam search of width `beam` (default: the one the checkpoint was trained with).

    The split seed defaults to the one the checkpoint was trained with, so "test" holds no training
    patient; binary tasks use the Youden threshold chosen on validation during training.

    Raises:
        DatasetInvalidError: the dataset fails the verifier.
        ValueError: the checkpoint does not fit the dataset, or the split is empty.
        FileNotFoundError: a weights file in `quality` is absent.
    """
    quality.check()
    spec = check_dataset(Path(folder))
    if quality.configured() and spec.task != "enhancement":
        raise ValueError(
            f"quality weights {', '.join(quality.configured())}: FID, BRISQUE and NIQE apply to "
            f"enhancement; the dataset's task is {spec.task}"
        )
    model, meta = load_task_model(checkpoint)
    check_fits(meta, spec, checkpoint)
    if split_seed is None:
        split_seed = meta.config.get("data", {}).get("split_seed", 0)
    rows = split_rows(folder, split, split_seed)
    if not rows:
        raise ValueError(f"{folder}: the '{split}' split is empty (splits: train, val, test)")
    head, inputs, task = meta.head, meta.input, get_task(meta.task)
    ds = TaskDataset(
        folder,
        spec,
        rows,
        inputs.size,
        inputs.channels,
        False,
        (inputs.mean, inputs.std),
        frames=inputs.frames,
        tokenizer=head.report_tokenizer() if head.report is not None else None,
        views=head.report.views if head.report is not None else 1,
    )
    loader = torch.utils.data.DataLoader(
        ds, batch_size=batch_size, sampler=[(0, i) for i in range(len(ds))], collate_fn=collate_task
    )
    out = predict(model, loader, torch.device("cpu"), head.beam if beam is None else beam)
    if out is None:
        raise ValueError(f"{folder}: no readable sample in the '{split}' split")
    pred, true, used = out
    metrics = task.metrics(pred, true, head.num_classes, meta.metrics.get("youden_threshold"), spec.findings)
    if spec.task == "enhancement":
        metrics |= quality_metrics(pred, true, quality)
    main = task.main_metric
    patients = [rows[i].get("patient") or f"row{i}" for i in used.tolist()]
    lo, hi = bootstrap_ci(task, pred, true, head.num_classes, patients, rounds)
    return {
        "checkpoint": str(checkpoint),
        "dataset": spec.name,
        "split": split,
        "samples": len(true),
        "main_metric": main,
        f"{main}_ci95": [lo, hi],
        "metrics": metrics,
    }
