"""A fine-tuning model: the EchoCare encoder plus the head of one task (`Task.head`), and `TaskMeta`, the metadata of
a fine-tuned checkpoint that rebuilds it.

Heads: classification (pooled feature), segmentation, landmarks, detection and enhancement (one dense decoder with
skips from every stage), regression over clips (frame features pooled over time), report generation (a transformer
decoder on the last stage's tokens of one or two images). The fine-tuning modes are in `models.lora`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from echocare_core.config import from_dict, to_dict
from echocare_core.models.lora import apply_finetune_mode
from echocare_core.models.report import ReportHeadConfig
from echocare_core.models.swin import EncoderConfig, SwinEncoder
from echocare_core.tasks import get_task
from echocare_core.tasks.base import InputSpec, TaskHead

__all__ = ["EchoCareTaskModel", "FinetuneMode", "TaskMeta"]


class EchoCareTaskModel(nn.Module):
    """Encoder + head; `forward` gives the head's raw output, `decode` turns it into predictions (both as the task
    says: `Task.forward`, `Task.decode`).

    Args:
        cfg: encoder config.
        task: the task's name (`echocare_core.tasks.TASKS`).
        num_classes: the head's outputs (`Task.outputs`).
        feature_size: width of the dense decoder.
        multi_label: classification with an independent sigmoid per class.
        target_stats: regression: (mean, std) of the training targets; the head predicts standardised values,
            `decode` gives them in the target's units.
        report: the report decoder's size.
        decoder: the dense decoder (`models.heads.DECODERS`: `unetr`, or `light` with few parameters for DP).

    Raises:
        ValueError: an unknown task (with the closest name).
    """

    def __init__(
        self,
        cfg: EncoderConfig,
        task: str,
        num_classes: int,
        feature_size: int = 16,
        multi_label: bool = False,
        target_stats: tuple[float, float] = (0.0, 1.0),
        report: ReportHeadConfig | None = None,
        decoder: str = "unetr",
    ) -> None:
        super().__init__()
        self.kind = get_task(task)
        self.task, self.multi_label, self.target_stats = task, multi_label, tuple(target_stats)
        self.encoder = SwinEncoder(cfg)
        self.head = self.kind.head(cfg, num_classes, feature_size, report, decoder)

    def forward(self, images: torch.Tensor, ids: torch.Tensor | None = None) -> Any:
        """`images` `[B, C, H, W]`; clips `[B, T, C, H, W]` for regression; the views of each report
        `[B, V, C, H, W]` with its token ids `[B, L]` for report (teacher forcing)."""
        return self.kind.forward(self, images, ids)

    def decode(self, out: Any) -> Any:
        """Predictions from `forward`'s output (`Task.decode`)."""
        return self.kind.decode(self, out)


@dataclass(frozen=True)
class FinetuneMode:
    """What trains (`models.lora.apply_finetune_mode`)."""

    mode: str = "full"
    lora_rank: int = 8
    lora_alpha: float = 16.0


@dataclass(frozen=True)
class TaskMeta:
    """The metadata of a fine-tuned checkpoint (`model_kind: task`): what rebuilds its model and reads its inputs
    and outputs. `echocare-finetune` fills the dataset and its config; a federation's rounds the job."""

    task: str
    encoder: EncoderConfig
    head: TaskHead
    finetune: FinetuneMode
    input: InputSpec
    epoch: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    dataset: str = ""  # a local run: the dataset's name
    config: dict[str, Any] = field(default_factory=dict)  # a local run: its resolved fine-tuning config
    round: int = 0  # a federated run: the round, its job and the job's hash
    job: dict[str, Any] = field(default_factory=dict)
    job_hash: str = ""
    site_model_of: dict[str, Any] = field(default_factory=dict)  # a site's own model: the global checkpoint's

    KIND = "task"

    @classmethod
    def parse(cls, meta: dict[str, Any], where: str) -> TaskMeta:
        """The typed metadata from `checkpoint.read_meta` (its other keys, such as the format, are left out).

        Raises:
            ConfigError: a key is missing or of the wrong type (naming `where` and the key).
        """
        names = {f.name for f in dataclasses.fields(cls)}
        return from_dict(cls, {k: v for k, v in meta.items() if k in names}, where)

    def to_meta(self) -> dict[str, Any]:
        """The JSON metadata to save (`checkpoint.save_checkpoint`)."""
        return {"model_kind": self.KIND, **to_dict(self)}

    def build(self) -> EchoCareTaskModel:
        """The model this metadata describes, with its fine-tuning mode (weights not loaded)."""
        model = EchoCareTaskModel(
            self.encoder,
            self.task,
            self.head.num_classes,
            self.head.feature_size,
            self.head.multi_label,
            self.head.target_stats,
            self.head.report,
            self.head.decoder,
        )
        apply_finetune_mode(model, self.finetune.mode, self.finetune.lora_rank, self.finetune.lora_alpha)
        return model
