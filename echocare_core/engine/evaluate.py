"""Evaluation of a fine-tuned checkpoint on a dataset split, with bootstrap confidence intervals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.metrics import compute_dice

from echocare_core.checkpoint import build_from_checkpoint
from echocare_core.data.contract import DatasetSpec
from echocare_core.data.finetune import TaskDataset, collate_task, split_rows
from echocare_core.data.text import ReportTokenizer
from echocare_core.engine.quality import QualityWeights, quality_metrics
from echocare_core.engine.training import check_dataset, num_classes, predict
from echocare_core.tasks import get_task
from echocare_core.tasks.detection import detection_ap, match_detections
from echocare_core.tasks.enhancement import enhancement_metrics
from echocare_core.tasks.text_metrics import bleu

__all__ = ["evaluate_checkpoint", "bootstrap_ci", "check_fits"]


def check_fits(meta: dict, spec: DatasetSpec, checkpoint: str | Path) -> None:
    """Refuse a checkpoint made for another task or other classes than the dataset's.

    Raises:
        ValueError: naming both sides.
    """
    if meta.get("model_kind") != "task":
        raise ValueError(
            f"{checkpoint} is a {meta.get('model_kind')!r} checkpoint; evaluate needs a fine-tuned "
            f"one (echocare-finetune writes them to OUTPUT/best)"
        )
    if meta["task"] != spec.task:
        raise ValueError(f"{checkpoint} was trained for {meta['task']}, the dataset is {spec.task}")
    head = meta["head"]
    if spec.task in ("classification", "detection") and (list(spec.classes), spec.multi_label) != (
        head["classes"],
        head["multi_label"],
    ):
        raise ValueError(
            f"{checkpoint} predicts classes {head['classes']} (multi-label: {head['multi_label']}), "
            f"the dataset declares {list(spec.classes)} (multi-label: {spec.multi_label})"
        )
    if spec.task in ("segmentation", "landmarks") and num_classes(spec) != head["num_classes"]:
        what = "mask labels" if spec.task == "segmentation" else "landmarks"
        raise ValueError(f"{checkpoint} predicts {head['num_classes']} {what}, the dataset has {num_classes(spec)}")


def bootstrap_ci(
    task: str, pred: Any, true: Any, k: int, groups: list[str], rounds: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """95% percentile bootstrap interval of the task's main metric, resampling patients (`groups`),
    since images of one patient are not independent."""
    rng = np.random.default_rng(seed)
    names = sorted(set(groups))
    members = {g: np.flatnonzero(np.asarray(groups) == g) for g in names}
    if task == "segmentation":  # per-class Dice over the resampled images, then the mean over classes
        p = F.one_hot(pred.long(), k).permute(0, 3, 1, 2).float()
        t = F.one_hot(true.long(), k).permute(0, 3, 1, 2).float()
        dice = compute_dice(p, t, include_background=False).numpy()
    if task == "detection":  # match once, resample the per-image matches
        matched = match_detections(pred, true)
    if task == "enhancement":  # SSIM per image once, then means of the resampled images
        ssim = np.asarray([enhancement_metrics(pred[i : i + 1], true[i : i + 1])["ssim"] for i in range(len(pred))])
    values = []
    for _ in range(rounds):
        idx = np.concatenate([members[names[j]] for j in rng.integers(0, len(names), len(names))])
        if task == "segmentation":
            values.append(np.nanmean(np.nanmean(dice[idx], axis=0)))
        elif task == "detection":
            values.append(detection_ap([matched[i] for i in idx], k)["map50"])
        elif task == "enhancement":
            values.append(float(ssim[idx].mean()))
        elif task == "report":  # corpus BLEU-4 of the resampled reports
            values.append(bleu([pred[i] for i in idx], [true[i] for i in idx]))
        else:
            rows = torch.from_numpy(idx)
            values.append(get_task(task).metrics(pred[rows], true[rows], k)[get_task(task).main_metric])
    values = np.asarray(values, dtype=float)
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
    model, meta = build_from_checkpoint(checkpoint)
    check_fits(meta, spec, checkpoint)
    if split_seed is None:
        split_seed = meta.get("config", {}).get("data", {}).get("split_seed", 0)
    rows = split_rows(folder, split, split_seed)
    if not rows:
        raise ValueError(f"{folder}: the '{split}' split is empty (splits: train, val, test)")
    head = meta["head"]
    tokenizer = ReportTokenizer(head["tokenizer"], head["report"]["max_tokens"]) if spec.task == "report" else None
    ds = TaskDataset(
        folder,
        spec,
        rows,
        meta["input"]["size"],
        meta["input"]["channels"],
        False,
        (meta["input"]["mean"], meta["input"]["std"]),
        frames=meta["input"].get("frames", 16),
        tokenizer=tokenizer,
        views=head.get("report", {}).get("views", 1),
    )
    loader = torch.utils.data.DataLoader(
        ds, batch_size=batch_size, sampler=[(0, i) for i in range(len(ds))], collate_fn=collate_task
    )
    out = predict(model, loader, torch.device("cpu"), head.get("beam", 1) if beam is None else beam)
    if out is None:
        raise ValueError(f"{folder}: no readable sample in the '{split}' split")
    pred, true, used = out
    k = meta["head"]["num_classes"]
    metrics = get_task(spec.task).metrics(pred, true, k, meta.get("metrics", {}).get("youden_threshold"), spec.findings)
    if spec.task == "enhancement":
        metrics |= quality_metrics(pred, true, quality)
    main = get_task(spec.task).main_metric
    patients = [rows[i].get("patient") or f"row{i}" for i in used.tolist()]
    lo, hi = bootstrap_ci(spec.task, pred, true, k, patients, rounds)
    return {
        "checkpoint": str(checkpoint),
        "dataset": spec.name,
        "split": split,
        "samples": len(true),
        "main_metric": main,
        f"{main}_ci95": [lo, hi],
        "metrics": metrics,
    }
