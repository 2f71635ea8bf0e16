"""What every task is: `Task`, the protocol of one fine-tuning task (its head's outputs, loss, metrics, main metric
and direction, what a job and a dataset must agree on, what differential privacy can do with it)."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from echocare_core.data.contract import DatasetSpec
from echocare_core.data.text import ReportTokenizer
from echocare_core.models.report import ReportHeadConfig

__all__ = ["Loss", "Task"]

Loss = Callable[[Any, Any], torch.Tensor]


class Task(ABC):
    """One fine-tuning task. A subclass sets the class attributes, implements `loss` and `metrics`, and overrides
    what differs from the defaults.

    Attributes:
        name: the task's name in dataset.yaml, configs and checkpoints.
        main_metric: what "best" means (best checkpoint, best federated round, the tables); `lower_is_better`
            says its direction.
        teacher_forcing: the model reads the target while training (report generation).
        sample_parts: what DP must clip as one sample when a sample has several images ("" for one image per
            sample); ghost clipping keeps per-image norms, so such tasks train under DP in hooks mode only.
    """

    name: ClassVar[str]
    main_metric: ClassVar[str]
    lower_is_better: ClassVar[bool] = False
    teacher_forcing: ClassVar[bool] = False
    sample_parts: ClassVar[str] = ""

    def outputs(self, classes: int, labels: int, landmarks: int, tokenizer: ReportTokenizer | None = None) -> int:
        """The head's outputs, from the counts of declared classes, mask values and landmarks."""
        return 1

    @abstractmethod
    def loss(
        self,
        spec: DatasetSpec,
        stats: tuple[float, float] = (0.0, 1.0),
        tokenizer: ReportTokenizer | None = None,
        head: ReportHeadConfig | None = None,
    ) -> Loss:
        """The training loss, computed per sample and averaged (so DP can clip per sample)."""

    @abstractmethod
    def metrics(
        self, pred: Any, true: Any, k: int, threshold: float | None = None, findings: tuple[str, ...] = ()
    ) -> dict[str, float]:
        """The task's metrics of predictions (`EchoCareTaskModel.decode`) against targets; `k` is the head's
        outputs, `threshold` a binary operating point, `findings` a report dataset's declared findings."""

    def score(self, metrics: dict[str, float]) -> float:
        """The main metric as "higher is better"; -inf when it is undefined."""
        value = metrics.get(self.main_metric, float("nan"))
        if not math.isfinite(value):
            return float("-inf")
        return -value if self.lower_is_better else value

    def mismatch(self, wanted: Any, spec: DatasetSpec) -> str:
        """Why a dataset cannot run what a job asks of this task ("" when it can). `wanted` has the job's
        `classes`, `labels` (mask values), `landmarks` (a count) and `multi_label`."""
        return ""
