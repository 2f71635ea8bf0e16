"""The one training driver: how a site trains, evaluates and predicts with a task model, locally and in a federation.

`LocalTraining` is the recipe, the `train:` section of a local site.yaml (`echocare-finetune`) and of a
federation job alike: fine-tuning mode, AdamW with a linear warm-up and cosine schedule, gradient clipping,
precision, batch size and differential privacy. `Recipe` turns it into an optimiser and a schedule over
the whole of the site's training: a local run's epochs, or every round of a federated job (each round
continues where the previous one stopped, so both train the same way). `train_epoch`, `evaluate` and
`predict` are the loops both use.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss, SSIMLoss
from torch.utils.data import DataLoader

from echocare_core.config import check_ranges
from echocare_core.data.contract import DatasetSpec, load_spec, read_manifest, verify_dataset
from echocare_core.data.finetune import TaskDataset, collate_task, from_model_points
from echocare_core.data.text import ReportTokenizer
from echocare_core.engine.metrics import (
    LOWER_IS_BETTER,
    MAIN_METRIC,
    classification_metrics,
    detection_metrics,
    enhancement_metrics,
    landmark_metrics,
    multilabel_metrics,
    regression_metrics,
    segmentation_metrics,
)
from echocare_core.engine.optim import build_optimizer, warmup_cosine
from echocare_core.engine.pretrain import NonFiniteLossError
from echocare_core.engine.text_metrics import report_metrics, stated
from echocare_core.models.detection import detection_loss
from echocare_core.models.landmarks import heatmap_loss
from echocare_core.models.report import ReportHeadConfig
from echocare_core.models.task import EchoCareTaskModel
from echocare_core.privacy.settings import DPSettings

__all__ = [
    "DatasetInvalidError",
    "LocalTraining",
    "NonFiniteLossError",
    "Recipe",
    "check_dataset",
    "evaluate",
    "num_classes",
    "predict",
    "score",
    "target_stats",
    "task_loader",
    "task_loss",
    "task_metrics",
    "train_epoch",
]

MIN_LR_RATIO = 0.01  # the cosine ends at this share of the learning rate


class DatasetInvalidError(ValueError):
    """The dataset fails the verifier; the message lists the first problems."""


@dataclass(frozen=True)
class LocalTraining:
    """How a site trains: the same section (`train:`) in a local site.yaml and in a federation job."""

    mode: Literal["full", "frozen", "lora"] = "lora"  # full | frozen (head only) | lora (adapters + head)
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lr: float = 1e-3
    weight_decay: float = 0.05
    batch_size: int = 16
    warmup_epochs: float = 1.0  # linear warm-up over this many passes over the site's training split
    clip_grad: float = 1.0  # largest gradient norm (0: off); under DP, privacy.max_grad_norm clips each sample
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on a GPU; DP trains in fp32
    privacy: DPSettings = field(default_factory=DPSettings)  # DP-SGD; epsilon for the whole run or job

    def __post_init__(self) -> None:
        check_ranges(
            self,
            {
                "lora_rank": (self.lora_rank >= 1, ">= 1"),
                "lora_alpha": (self.lora_alpha > 0, "> 0"),
                "lr": (self.lr > 0, "> 0"),
                "weight_decay": (self.weight_decay >= 0, ">= 0"),
                "batch_size": (self.batch_size >= 1, ">= 1"),
                "warmup_epochs": (self.warmup_epochs >= 0, ">= 0"),
                "clip_grad": (self.clip_grad >= 0, ">= 0 (0: off)"),
            },
        )

    def bf16(self, device: torch.device) -> bool:
        """Autocast to bfloat16: `bf16`, or `auto` on a GPU; never under DP (per-sample gradients in fp32)."""
        if self.privacy.on:
            return False
        return self.precision == "bf16" or (self.precision == "auto" and device.type == "cuda")


@dataclass
class Recipe:
    """A `LocalTraining` applied to one model and one training split: the optimiser and a schedule over
    `total_steps`, of which `done_steps` ran before (earlier rounds of a federated job)."""

    train: LocalTraining
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR

    @classmethod
    def build(
        cls, model: torch.nn.Module, train: LocalTraining, train_samples: int, total_steps: int, done_steps: int = 0
    ) -> Recipe:
        optimizer = build_optimizer(model, train.lr, train.weight_decay, (0.9, 0.999))
        warmup = round(train.warmup_epochs * steps_per_epoch(train_samples, train.batch_size))
        return cls(
            train, optimizer, warmup_cosine(optimizer, min(warmup, total_steps), total_steps, MIN_LR_RATIO, done_steps)
        )


def steps_per_epoch(train_samples: int, batch_size: int) -> int:
    return math.ceil(train_samples / batch_size)


def check_dataset(folder: Path) -> DatasetSpec:
    """The dataset's spec once it passes the verifier (landmarks named `point1..K` when dataset.yaml names none).

    Raises:
        DatasetInvalidError: naming the first problem by file, row and column.
    """
    report = verify_dataset(folder)
    if not report.ok:
        raise DatasetInvalidError(
            f"{folder} fails the dataset check with {report.describe(1)}. See all with: echocare-data verify {folder}"
        )
    spec = load_spec(folder)
    if spec.task == "landmarks" and not spec.landmark_names:
        _, rows = read_manifest(folder)
        count = len(json.loads(rows[0]["landmarks"])) if rows else 0
        spec = replace(spec, landmark_names=tuple(f"point{i + 1}" for i in range(count)))
    return spec


def num_outputs(task: str, classes: int, labels: int, landmarks: int, tokenizer: ReportTokenizer | None = None) -> int:
    """A head's outputs: classes (classification, detection), declared mask values (segmentation), points
    (landmarks), the tokenizer's ids (report; byte-level unless given), 1 (regression, enhancement)."""
    if task == "report":
        return (tokenizer or ReportTokenizer()).vocab_size
    return {"classification": classes, "detection": classes, "segmentation": labels, "landmarks": landmarks}.get(
        task, 1
    )


def num_classes(spec: DatasetSpec, tokenizer: ReportTokenizer | None = None) -> int:
    """The head's outputs for a dataset (`num_outputs`)."""
    return num_outputs(spec.task, len(spec.classes), len(spec.labels), len(spec.landmark_names), tokenizer)


def target_stats(spec: DatasetSpec, rows: list[dict[str, str]]) -> tuple[float, float]:
    """Regression: mean and standard deviation of the training targets (the head predicts standardised values)."""
    if spec.task != "regression":
        return 0.0, 1.0
    values = np.array([float(r["target"]) for r in rows])
    std = float(values.std())
    return float(values.mean()), std if std > 1e-6 else 1.0


def report_loss(
    tokenizer: ReportTokenizer, head: ReportHeadConfig | None = None
) -> Callable[[tuple[torch.Tensor, torch.Tensor], torch.Tensor], torch.Tensor]:
    """Per report, the next-token cross-entropy (mean over its tokens, padding left out) plus, where the head
    classifies findings, `findings_weight` times the findings' binary cross-entropy, labelled by whether the
    report's text (as far as its ids reach) states each; then the mean over reports."""
    findings, weight = (head.findings, head.findings_weight) if head and head.classifies else ((), 0.0)

    def loss(out: tuple[torch.Tensor, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:  # [B, L - 1, vocab], [B, F]
        logits, finding_logits = out
        target = ids[:, 1:]
        keep = (target != tokenizer.pad).float()
        ce = F.cross_entropy(logits.transpose(1, 2), target, reduction="none")  # [B, L - 1]
        per_report = (ce * keep).sum(1) / keep.sum(1).clamp(min=1)
        if findings:
            labels = stated([tokenizer.decode(r) for r in ids], findings)
            bce = F.binary_cross_entropy_with_logits(
                finding_logits, torch.as_tensor(labels, dtype=finding_logits.dtype, device=ids.device), reduction="none"
            )
            per_report = per_report + weight * bce.mean(1)
        return per_report.mean()

    return loss


def task_loss(
    spec: DatasetSpec,
    stats: tuple[float, float],
    tokenizer: ReportTokenizer | None = None,
    head: ReportHeadConfig | None = None,
) -> Callable[[Any, Any], torch.Tensor]:
    """The task's training loss, computed per sample and averaged (so DP can clip per sample); report generation
    needs its tokenizer and head config."""
    if spec.task == "classification":
        return F.binary_cross_entropy_with_logits if spec.multi_label else F.cross_entropy
    if spec.task == "segmentation":
        dice_ce = DiceCELoss(to_onehot_y=True, softmax=True, batch=False)
        return lambda logits, target: dice_ce(logits, target[:, None])
    if spec.task == "landmarks":
        return heatmap_loss
    if spec.task == "detection":
        return detection_loss
    if spec.task == "report":
        if tokenizer is None:
            raise ValueError("report generation's loss needs the tokenizer")
        return report_loss(tokenizer, head)
    if spec.task == "enhancement":  # L1 + (1 - SSIM) on the enhanced image in [0, 1]
        ssim = SSIMLoss(spatial_dims=2, data_range=1.0)
        return lambda logits, target: F.l1_loss(logits.sigmoid(), target) + ssim(logits.sigmoid(), target)
    mean, std = stats
    return lambda pred, target: F.smooth_l1_loss(pred, (target - mean) / std)


def task_loader(ds: TaskDataset, keys: list[tuple[int, int]], batch: int, workers: int) -> DataLoader:
    """Batches of `ds` in the order of its (epoch, index) `keys`."""
    return DataLoader(ds, batch_size=batch, sampler=keys, num_workers=workers, collate_fn=collate_task)


def shuffled_keys(n: int, seed: list[int], epoch: int) -> list[tuple[int, int]]:
    """One shuffled pass over `n` samples, keyed by `epoch` (which seeds each sample's augmentation)."""
    return [(epoch, int(i)) for i in np.random.default_rng(seed).permutation(n)]


def _to(target: torch.Tensor | list[torch.Tensor], device: torch.device) -> torch.Tensor | list[torch.Tensor]:
    return [t.to(device) for t in target] if isinstance(target, list) else target.to(device)


def train_epoch(
    model: EchoCareTaskModel,
    loader: DataLoader,
    recipe: Recipe,
    loss_fn: Callable,
    device: torch.device,
    dp: Any = None,
) -> tuple[list[float], int]:
    """One pass of `loader`'s batches; returns the batch losses and the number of unreadable samples.

    Precision and clipping follow `recipe.train`. Report generation's model reads the target too (teacher
    forcing).

    Args:
        dp: a `DPTraining` whose module, optimizer and Poisson loader these are: per-sample clipping and noise
            replace `clip_grad`, every batch is checked to be per sample, and an empty batch is still a (noise) step.

    Raises:
        NonFiniteLossError: the loss became NaN or infinite.
        PrivacyError: under DP, a per-sample gradient that is not per sample.
    """
    optimizer = dp.optimizer if dp is not None else recipe.optimizer
    bf16, clip, teacher = recipe.train.bf16(device), recipe.train.clip_grad, model_task(model) == "report"
    losses, skipped = [], 0
    for batch in loader:
        skipped += batch["skipped"]
        if "image" not in batch:
            if dp is not None:
                dp.empty_batch()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                recipe.scheduler.step()
            continue
        target = _to(batch["target"], device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(batch["image"].to(device), *([target] if teacher else []))
        out = tuple(o.float() for o in out) if isinstance(out, tuple) else out.float()  # report: tokens, findings
        loss = loss_fn(out, target) if dp is None else dp.loss(loss_fn, out, target)
        value = loss.item()
        if not math.isfinite(value):
            raise NonFiniteLossError(
                f"non-finite loss after {len(losses)} batches of this epoch; lower train.lr "
                f"or use train.precision: fp32"
            )
        loss.backward()
        if dp is None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip or float("inf"))
        else:
            dp.check(len(batch["image"]))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        recipe.scheduler.step()
        losses.append(value)
    return losses, skipped


def model_task(model: torch.nn.Module) -> str | None:
    """The task of a task model, also under Opacus' wrapper."""
    return getattr(getattr(model, "_module", model), "task", None)


@torch.no_grad()
def predict(
    model: EchoCareTaskModel, loader: DataLoader, device: torch.device, beam: int = 1
) -> tuple[Any, Any, torch.Tensor] | None:
    """Predictions (`EchoCareTaskModel.decode`), targets and the dataset rows they belong to; None when
    nothing was readable. Landmarks come back in the images' own pixels, boxes in the model's grid
    (IoU does not change with scale); reports as texts written with beam search of width `beam`, next to
    the manifest's reports."""
    model.eval()
    preds, targets, rows = [], [], []
    for batch in loader:
        if "image" not in batch:
            continue
        if model.task == "report":
            tok, ds = loader.dataset.tokenizer, loader.dataset
            preds += [tok.decode(ids) for ids in model.generate(batch["image"].to(device), tok.bos, tok.eos, beam)]
            targets += [ds.rows[int(i)]["report"] for i in batch["row"]]
            rows.append(batch["row"])
            continue
        pred, true = model.decode(model(batch["image"].to(device)).float()), batch["target"]
        if model.task == "landmarks":
            size = batch["image"].shape[-1]
            pred, true = (
                from_model_points(pred.cpu(), batch["size"], size),
                from_model_points(true, batch["size"], size),
            )
        if model.task == "detection":
            preds += [d.cpu() for d in pred]
            targets += list(true)
        else:
            preds.append(pred.cpu())
            targets.append(true)
        rows.append(batch["row"])
    model.train()
    if not rows:
        return None
    return (
        (preds, targets, torch.cat(rows))
        if model.task in ("detection", "report")
        else (torch.cat(preds), torch.cat(targets), torch.cat(rows))
    )


def task_metrics(
    task: str, pred: Any, true: Any, k: int, threshold: float | None = None, findings: tuple[str, ...] = ()
) -> dict[str, float]:
    """The task's metrics; `threshold` fixes the binary operating point (else the Youden one of this data);
    `findings` are the report dataset's declared findings."""
    if task == "report":
        return report_metrics(pred, true, findings)
    if task == "segmentation":
        return segmentation_metrics(pred, true, k)
    if task == "landmarks":
        return landmark_metrics(pred, true)
    if task == "detection":
        return detection_metrics(pred, true, k)
    if task == "regression":
        return regression_metrics(pred, true)
    if task == "enhancement":
        return enhancement_metrics(pred, true)
    return multilabel_metrics(pred, true) if true.ndim == 2 else classification_metrics(pred, true, threshold)


def evaluate(
    model: EchoCareTaskModel,
    ds: TaskDataset,
    device: torch.device,
    k: int,
    batch_size: int,
    workers: int = 0,
    threshold: float | None = None,
    beam: int = 1,
) -> dict[str, float]:
    """Main and secondary metrics of `model` over all of `ds` (empty when nothing in it was readable)."""
    loader = task_loader(ds, [(0, i) for i in range(len(ds))], batch_size, workers)
    out = predict(model, loader, device, beam)
    findings = ds.spec.findings if model.task == "report" else ()
    return task_metrics(model.task, out[0], out[1], k, threshold, findings) if out is not None else {}


def score(metrics: dict[str, float], task: str) -> float:
    """The main metric as "higher is better"; -inf when it is undefined."""
    value = metrics.get(MAIN_METRIC[task], float("nan"))
    if not math.isfinite(value):
        return float("-inf")
    return -value if MAIN_METRIC[task] in LOWER_IS_BETTER else value
