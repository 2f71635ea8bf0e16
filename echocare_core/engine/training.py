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
from torch.utils.data import DataLoader

from echocare_core.config import check_ranges
from echocare_core.data.contract import DatasetSpec, load_spec, read_manifest, verify_dataset
from echocare_core.data.text import ReportTokenizer
from echocare_core.engine.optim import build_optimizer, warmup_cosine
from echocare_core.engine.pretrain import NonFiniteLossError
from echocare_core.privacy.settings import DPSettings
from echocare_core.tasks import get_task
from echocare_core.tasks.dataset import TaskDataset, collate_task
from echocare_core.tasks.model import EchoCareTaskModel

__all__ = [
    "MIN_LR_RATIO",
    "DatasetInvalidError",
    "LocalTraining",
    "NonFiniteLossError",
    "Recipe",
    "check_dataset",
    "device_batch",
    "evaluate",
    "num_classes",
    "predict",
    "shuffled_keys",
    "split_datasets",
    "steps_per_epoch",
    "target_stats",
    "task_loader",
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


def split_datasets(
    folder: Path,
    spec: DatasetSpec,
    rows: dict[str, list[dict[str, str]]],
    encoder: Any,
    seed: int,
    frames: int,
    tokenizer: ReportTokenizer | None,
    views: int,
) -> dict[str, TaskDataset]:
    """A site's splits as task datasets, read with the encoder's input contract (size, channels, intensity scale);
    the training split is augmented."""
    return {
        split: TaskDataset(
            folder,
            spec,
            r,
            encoder.img_size,
            encoder.in_chans,
            split == "train",
            encoder.scale,
            seed=seed,
            frames=frames,
            tokenizer=tokenizer,
            views=views,
        )
        for split, r in rows.items()
    }


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


def num_classes(spec: DatasetSpec, tokenizer: ReportTokenizer | None = None) -> int:
    """The head's outputs for a dataset (`Task.outputs`)."""
    return get_task(spec.task).outputs(len(spec.classes), len(spec.labels), len(spec.landmark_names), tokenizer)


def target_stats(spec: DatasetSpec, rows: list[dict[str, str]]) -> tuple[float, float]:
    """Regression: mean and standard deviation of the training targets (the head predicts standardised values)."""
    if spec.task != "regression":
        return 0.0, 1.0
    values = np.array([float(r["target"]) for r in rows])
    std = float(values.std())
    return float(values.mean()), std if std > 1e-6 else 1.0


def task_loader(ds: TaskDataset, keys: list[tuple[int, int]], batch: int, workers: int) -> DataLoader:
    """Batches of `ds` in the order of its (epoch, index) `keys`."""
    return DataLoader(ds, batch_size=batch, sampler=keys, num_workers=workers, collate_fn=collate_task)


def shuffled_keys(n: int, seed: list[int], epoch: int) -> list[tuple[int, int]]:
    """One shuffled pass over `n` samples, keyed by `epoch` (which seeds each sample's augmentation)."""
    return [(epoch, int(i)) for i in np.random.default_rng(seed).permutation(n)]


def _to(target: torch.Tensor | list[torch.Tensor], device: torch.device) -> torch.Tensor | list[torch.Tensor]:
    return [t.to(device) for t in target] if isinstance(target, list) else target.to(device)


def device_batch(batch_size: int, max_batch: int) -> int:
    """How many samples go through the model at once: the batch, or the device's `max_batch` (0: no limit)."""
    return min(batch_size, max_batch or batch_size)


def train_epoch(
    model: EchoCareTaskModel,
    loader: DataLoader,
    recipe: Recipe,
    loss_fn: Callable,
    device: torch.device,
    dp: Any = None,
    max_batch: int = 0,
) -> tuple[list[float], int]:
    """One pass of `loader`'s batches; returns the batch losses and the number of unreadable samples.

    Precision and clipping follow `recipe.train`. A task with teacher forcing (report generation) gives the model
    the target too. A batch larger than `max_batch` (a site's memory) goes through the model in pieces of at most
    that many samples whose gradients add up to the whole batch's: one optimiser step per batch, as if it had
    been one piece (under DP: every piece's per-sample gradients clipped, then one draw of noise).

    Args:
        dp: a `DPTraining` whose module, optimizer and Poisson loader these are: per-sample clipping and noise
            replace `clip_grad`, every batch is checked to be per sample, and an empty batch is still a (noise) step.
        max_batch: the most samples the model sees at once (0: a batch at once).

    Raises:
        NonFiniteLossError: the loss became NaN or infinite.
        PrivacyError: under DP, a per-sample gradient that is not per sample.
    """
    optimizer = dp.optimizer if dp is not None else recipe.optimizer
    task = model_task(model)
    bf16, clip = recipe.train.bf16(device), recipe.train.clip_grad
    teacher = task is not None and get_task(task).teacher_forcing
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
        n = len(batch["image"])
        piece = device_batch(n, max_batch)
        value = 0.0
        for start in range(0, n, piece):
            image, target = batch["image"][start : start + piece], _to(batch["target"][start : start + piece], device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                out = model(image.to(device), *([target] if teacher else []))
            out = tuple(o.float() for o in out) if isinstance(out, tuple) else out.float()  # report: tokens, findings
            loss = loss_fn(out, target) if dp is None else dp.loss(loss_fn, out, target)
            share = len(image) / n  # the piece's part of the batch mean (DP scales per sample by itself)
            value += loss.item() * share
            (loss if dp is not None else loss * share).backward()
            if dp is not None:
                dp.check(len(image))
                if start + piece < n:  # clip this piece's per-sample gradients into the sum; no step, no noise
                    optimizer.signal_skip_step(do_skip=True)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
        if not math.isfinite(value):
            raise NonFiniteLossError(
                f"non-finite loss after {len(losses)} batches of this epoch; lower train.lr "
                f"or use train.precision: fp32"
            )
        if dp is None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip or float("inf"))
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
    """Predictions, targets and the dataset rows they belong to (`Task.predict_batch`, joined by `Task.join`);
    None when nothing was readable. Reports are written with beam search of width `beam`."""
    model.eval()
    preds, targets, rows = [], [], []
    for batch in loader:
        if "image" not in batch:
            continue
        pred, true = model.kind.predict_batch(
            model, {**batch, "image": batch["image"].to(device)}, loader.dataset, beam
        )
        preds += pred
        targets += true
        rows.append(batch["row"])
    model.train()
    if not rows:
        return None
    return model.kind.join(preds), model.kind.join(targets), torch.cat(rows)


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
    return model.kind.metrics(out[0], out[1], k, threshold, ds.spec.findings) if out is not None else {}
