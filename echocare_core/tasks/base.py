"""What every task is: `Task`, the protocol of one fine-tuning task (its head, target, loss, decoding, metrics, main
metric and direction, bootstrap, predictions, what a model and a dataset must agree on, what differential privacy
can do with it), and `TaskHead`, what a task model's head predicts in its dataset's words."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from echocare_core.data.io import ImageReadError, read_image
from echocare_core.data.spec import DatasetSpec
from echocare_core.data.text import ReportTokenizer
from echocare_core.models.heads import DECODERS, Decoder
from echocare_core.models.report import ReportHeadConfig
from echocare_core.models.swin import EncoderConfig

__all__ = ["Declared", "InputSpec", "Loss", "Task", "TaskHead"]

Loss = Callable[[Any, Any], torch.Tensor]


@dataclass(frozen=True)
class Declared:
    """What a model was made for (a federation job, a checkpoint's head), to hold against a dataset's declarations."""

    classes: tuple[str, ...] = ()  # classification, detection
    labels: tuple[int, ...] = ()  # segmentation: the mask values
    landmarks: int = 0  # landmarks: points per image
    multi_label: bool = False


@dataclass(frozen=True)
class TaskHead:
    """What a task model's head predicts, in its dataset's words (a fine-tuned checkpoint's `head`).

    A federated model's head knows the job's declarations only (mask values without names, a count of points);
    a site's own model (`echocare-client model`) takes the names from the site's dataset.
    """

    num_classes: int  # the head's outputs (classes, mask values, points, the tokenizer's ids; 1 for regression)
    feature_size: int = 16
    decoder: Decoder = "unetr"  # the dense decoder (models.heads.DECODERS)
    multi_label: bool = False
    classes: tuple[str, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)  # mask value -> name ("" where unknown)
    landmark_names: tuple[str, ...] = ()  # empty: point1, point2, ...
    target_name: str = "target"
    target_stats: tuple[float, float] = (0.0, 1.0)  # regression: the training targets' mean and std
    report: ReportHeadConfig | None = None
    tokenizer: str = ""  # report generation: the tokenizer's JSON
    findings: tuple[str, ...] = ()
    beam: int = 1

    @property
    def points(self) -> tuple[str, ...]:
        """The landmarks' names (point1, point2, ... where the dataset named none)."""
        return self.landmark_names or tuple(f"point{i + 1}" for i in range(self.num_classes))

    @property
    def mask_values(self) -> list[int]:
        """Segmentation: the mask values of the head's classes, in class order."""
        return sorted(int(v) for v in self.labels)

    @property
    def declared(self) -> Declared:
        return Declared(self.classes, tuple(self.mask_values), len(self.points), self.multi_label)

    def report_tokenizer(self) -> ReportTokenizer:
        if self.report is None:
            raise ValueError("not a report generation head")
        return ReportTokenizer(self.tokenizer, self.report.max_tokens)


@dataclass(frozen=True)
class InputSpec:
    """What an input image becomes before the encoder reads it (a checkpoint's `input`)."""

    channels: int
    size: int
    mean: float
    std: float
    frames: int = 16  # regression: frames read per clip

    def tensor(self, img: np.ndarray) -> torch.Tensor:
        """`[T, C, H, W]` uint8 -> the model's normalised input `[T, C, S, S]`."""
        x = F.interpolate(
            torch.from_numpy(img).float() / 255.0,
            size=(self.size, self.size),
            mode="bilinear",
            antialias=True,
            align_corners=False,
        )
        return (x - self.mean) / self.std


class Task(ABC):
    """One fine-tuning task. A subclass sets the class attributes, implements `target`, `loss` and `metrics`, and
    overrides what differs from the defaults (a dense-decoder head, a flip that leaves the target alone,
    predictions batched into one tensor).

    Attributes:
        name: the task's name in dataset.yaml, configs and checkpoints.
        main_metric: what "best" means (best checkpoint, best federated round, the tables); `lower_is_better`
            says its direction.
        teacher_forcing: the model reads the target while training (report generation).
        sample_parts: what DP must clip as one sample when a sample has several images ("" for one image per
            sample); ghost clipping keeps per-image norms, so such tasks train under DP in hooks mode only.
        stacked: predictions and targets of a batch stack into tensors (else they stay lists: boxes, texts).
    """

    name: ClassVar[str]
    main_metric: ClassVar[str]
    lower_is_better: ClassVar[bool] = False
    teacher_forcing: ClassVar[bool] = False
    sample_parts: ClassVar[str] = ""
    stacked: ClassVar[bool] = True

    # --- the model -------------------------------------------------------------------------------------------

    def outputs(self, classes: int, labels: int, landmarks: int, tokenizer: ReportTokenizer | None = None) -> int:
        """The head's outputs, from the counts of declared classes, mask values and landmarks."""
        return 1

    def head(
        self,
        cfg: EncoderConfig,
        outputs: int,
        feature_size: int,
        report: ReportHeadConfig | None,
        decoder: str = "unetr",
    ) -> nn.Module:
        """The head on the encoder (default: the dense decoder `decoder` of width `feature_size`)."""
        return DECODERS[decoder](cfg, outputs, feature_size)

    def forward(self, model: Any, images: torch.Tensor, ids: torch.Tensor | None = None) -> Any:
        """The head's raw output for `images` (`EchoCareTaskModel.forward`)."""
        return model.head(images, model.encoder.forward_intermediates(images, intermediates_only=True))

    def decode(self, model: Any, out: Any) -> Any:
        """Predictions from `forward`'s output."""
        return out

    # --- the data --------------------------------------------------------------------------------------------

    def read(self, path: Path, channels: int, frames: int) -> np.ndarray:
        """A sample's pixels `[T, C, H, W]` (one frame but for clips)."""
        return read_image(path, channels)[None]

    def images_per_sample(self, frames: int, views: int) -> int:
        """Images the encoder reads per sample."""
        return 1

    @abstractmethod
    def target(self, ds: Any, value: str, height: int, width: int) -> Any:
        """The target of a sample from its manifest cell (the task's column), in the model's grid; `ds` is the
        `TaskDataset` (folder, spec, img_size, channels, tokenizer)."""

    def flip(self, target: Any, size: int) -> Any:
        """The target of the horizontally flipped image (None: the task is not flipped; default: unchanged)."""
        return target

    # --- training and scores --------------------------------------------------------------------------------

    @abstractmethod
    def loss(
        self,
        spec: DatasetSpec,
        stats: tuple[float, float] = (0.0, 1.0),
        tokenizer: ReportTokenizer | None = None,
        head: ReportHeadConfig | None = None,
    ) -> Loss:
        """The training loss, computed per sample and averaged (so DP can clip per sample)."""

    def predict_batch(self, model: Any, batch: dict[str, Any], ds: Any, beam: int) -> tuple[list, list]:
        """Predictions and targets of one batch, on the CPU: one tensor each in a list when `stacked`, else one
        item per sample."""
        return [self.decode(model, model(batch["image"]).float()).cpu()], [batch["target"]]

    def join(self, parts: list) -> Any:
        """The batches' predictions (or targets) as one (`predict_batch`'s lists, concatenated)."""
        return torch.cat(parts) if self.stacked else parts

    @abstractmethod
    def metrics(
        self, pred: Any, true: Any, k: int, threshold: float | None = None, findings: tuple[str, ...] = ()
    ) -> dict[str, float]:
        """The task's metrics of predictions (`decode`) against targets; `k` is the head's outputs, `threshold`
        a binary operating point, `findings` a report dataset's declared findings."""

    def score(self, metrics: dict[str, float]) -> float:
        """The main metric as "higher is better"; -inf when it is undefined."""
        value = metrics.get(self.main_metric, float("nan"))
        if not math.isfinite(value):
            return float("-inf")
        return -value if self.lower_is_better else value

    def resampled(self, pred: Any, true: Any, k: int) -> Callable[[np.ndarray], float]:
        """The main metric of a resample (sample indices, repeats allowed) for the bootstrap; a task with a
        costly per-sample part computes it once here."""
        main = self.main_metric
        if not self.stacked:
            return lambda idx: self.metrics([pred[i] for i in idx], [true[i] for i in idx], k)[main]
        return lambda idx: self.metrics(pred[torch.from_numpy(idx)], true[torch.from_numpy(idx)], k)[main]

    def mismatch(self, declared: Declared, spec: DatasetSpec, who: str = "job") -> str:
        """Why a dataset cannot run what `who` (a job, a checkpoint) was made for ("" when it can)."""
        return ""

    def describe(self, declared: Declared) -> str:
        """What a job declares for this task, in a few words (its classes, mask values, points)."""
        return ""

    # --- predictions on files -------------------------------------------------------------------------------

    def columns(self, head: TaskHead) -> list[str]:
        """The CSV columns of `echocare-predict`: the input's, then the prediction's."""
        return ["file", head.target_name]

    def predict_image(
        self, model: Any, head: TaskHead, inputs: InputSpec, img: np.ndarray, stem: str, out: Path, min_score: float
    ) -> list[str]:
        """The CSV cells of one image `[T, C, H, W]`; writes its PNGs under `out` named from `stem`."""
        raise NotImplementedError(f"{self.name} predicts per image: override predict_image")

    def predict_files(
        self,
        model: Any,
        head: TaskHead,
        inputs: InputSpec,
        files: list[Path],
        out: Path,
        min_score: float,
        beam: int,
    ) -> tuple[list[list[str]], int]:
        """One CSV row per input (`columns`) and the number of inputs that could not be read."""
        rows, unreadable, width = [], 0, len(self.columns(head)) - 1
        for i, file in enumerate(files):
            try:
                img = self.read(file, inputs.channels, inputs.frames)
            except ImageReadError:
                unreadable += 1
                rows.append([str(file), "unreadable", *[""] * (width - 1)])
            else:
                with torch.no_grad():
                    cells = self.predict_image(model, head, inputs, img, f"{i:05d}_{file.stem}", out, min_score)
                rows.append([str(file), *cells])
        return rows, unreadable
