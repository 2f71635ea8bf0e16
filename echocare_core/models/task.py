"""A fine-tuning model: the EchoCare encoder plus one task head, and the fine-tuning modes.

Heads: classification (pooled feature), segmentation, landmarks, detection and enhancement (one dense
decoder with skips from every stage), regression over clips (frame features pooled over time), report
generation (a transformer decoder on the last stage's tokens of one or two images).

Modes: `full` (everything trains), `frozen` (the encoder is fixed, the head trains) and `lora`
(low-rank adapters on the attention projections `qkv` and `proj` train with the head; the encoder's
own weights stay fixed). LoRA keeps the base weights' names (`...attn.qkv.weight`), so a pretrained
checkpoint loads the same way with or without adapters.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from echocare_core.models.detection import HEAT_PRIOR, decode_detections
from echocare_core.models.heads import ClassificationHead, ClipRegressionHead, DenseHead
from echocare_core.models.landmarks import decode_heatmaps
from echocare_core.models.report import ReportHead, ReportHeadConfig
from echocare_core.models.swin import EncoderConfig, SwinEncoder, WindowAttention

__all__ = ["TASKS", "MODES", "LoRALinear", "EchoCareTaskModel", "apply_finetune_mode", "count_trainable"]

TASKS = ("classification", "segmentation", "landmarks", "detection", "regression", "enhancement", "report")
MODES = ("full", "frozen", "lora")


class LoRALinear(nn.Linear):
    """`y = W x + b + (alpha / r) * B(A(x))`, with A, B plain `nn.Linear` layers and B starting at zero."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__(
            base.in_features,
            base.out_features,
            bias=base.bias is not None,
            device=base.weight.device,
            dtype=base.weight.dtype,
        )
        self.load_state_dict(base.state_dict())
        self.lora_A = nn.Linear(base.in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.lora_B(self.lora_A(x)) * self.scale


class EchoCareTaskModel(nn.Module):
    """Encoder + head; `forward` gives the head's raw output, `decode` turns it into predictions.

    Args:
        cfg: encoder config.
        task: one of TASKS.
        num_classes: classes (classification, detection), mask labels (segmentation), points (landmarks) or
            the tokenizer's ids (report); unused for regression and enhancement (whose output has the input's
            channels).
        feature_size: width of the dense decoder.
        multi_label: classification with an independent sigmoid per class.
        target_stats: regression: (mean, std) of the training targets; the head predicts
            standardised values, `decode` gives them in the target's units.
        report: the report decoder's size.
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
    ) -> None:
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"task '{task}' has no head; available: {', '.join(TASKS)}")
        self.task, self.multi_label, self.target_stats = task, multi_label, tuple(target_stats)
        self.encoder = SwinEncoder(cfg)
        self.head: nn.Module
        if task == "classification":
            self.head = ClassificationHead(self.encoder.num_features, num_classes)
        elif task == "regression":
            self.head = ClipRegressionHead(self.encoder.num_features)
        elif task == "report":
            self.head = ReportHead(
                self.encoder.num_features, cfg.stage_resolutions[-1] ** 2, num_classes, report or ReportHeadConfig()
            )
        else:
            out = {"detection": num_classes + 2, "enhancement": cfg.in_chans}.get(task, num_classes)
            self.head = DenseHead(cfg, out, feature_size)
        if task == "detection":  # centre heatmaps start at a low prior, as in CenterNet and RetinaNet
            with torch.no_grad():
                self.head.out.conv.conv.bias[:num_classes] = math.log(HEAT_PRIOR / (1 - HEAT_PRIOR))

    def forward(self, images: torch.Tensor, ids: torch.Tensor | None = None) -> Any:
        """`images` `[B, C, H, W]`; clips `[B, T, C, H, W]` for regression; the views of each report
        `[B, V, C, H, W]` with its token ids `[B, L]` for report (teacher forcing).

        Returns:
            classification `[B, K]` logits; segmentation `[B, K, H, W]` logits; landmarks `[B, K, H, W]`
            heatmap logits; detection `[B, K + 2, H, W]` centre logits and log box sizes; regression `[B]`;
            enhancement `[B, C, H, W]` logits of the enhanced image's intensities in [0, 1]; report `[B, L - 1, vocab]`
            logits of ids[:, 1:] and `[B, F]` logits of the head's findings (F may be 0).
        """
        if self.task == "classification":
            return self.head(self.encoder(images))
        if self.task == "regression":
            b, t = images.shape[:2]
            # the B*T frames go through the encoder as one batch: per-sample gradients (DP) must sum a clip's frames
            return self.head(self.encoder(images.flatten(0, 1)).view(b, t, -1))
        if self.task == "report":
            if ids is None:
                raise ValueError("a report model reads the report's ids in training; to write one use generate()")
            return self.head(self._views(images), ids[:, :-1])
        return self.head(images, self.encoder.forward_intermediates(images, intermediates_only=True))

    def _views(self, images: torch.Tensor) -> torch.Tensor:
        """Last-stage tokens of every view: `[B, V, C, H, W] -> [B, V, h * w, C_enc]`."""
        b, v = images.shape[:2]
        return self.encoder.forward_features(images.flatten(0, 1)).reshape(b, v, -1, self.encoder.num_features)

    def generate(self, images: torch.Tensor, bos: int, eos: int, beam: int = 1) -> list[list[int]]:
        """Report ids of each sample's views `[B, V, C, H, W]` (greedy for `beam` 1, else beam search)."""
        return self.head.generate(self._views(images), bos, eos, beam)

    def finding_probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """`[B, F]` probabilities of the report head's findings in each sample's views `[B, V, C, H, W]`."""
        return self.head.finding_logits(self._views(images)).sigmoid()

    def decode(self, out: torch.Tensor) -> Any:
        """Predictions from `forward`'s output: class probabilities `[B, K]`, label maps `[B, H, W]`,
        landmark (x, y) `[B, K, 2]` in input pixels, a list of `Detections`, values `[B]`, or enhanced
        images `[B, C, H, W]` in [0, 1]."""
        if self.task == "classification":
            return out.sigmoid() if self.multi_label else out.softmax(-1)
        if self.task == "segmentation":
            return out.argmax(1)
        if self.task == "landmarks":
            return decode_heatmaps(out)
        if self.task == "detection":
            return decode_detections(out)
        if self.task == "enhancement":
            return out.sigmoid()
        return out * self.target_stats[1] + self.target_stats[0]


def apply_finetune_mode(model: EchoCareTaskModel, mode: str, lora_rank: int = 8, lora_alpha: float = 16.0) -> None:
    """Set what trains. For `lora`, adapters are added to every attention `qkv` and `proj`.

    Raises:
        ValueError: an unknown mode or a rank below 1.
    """
    if mode not in MODES:
        raise ValueError(f"fine-tuning mode '{mode}': choose one of {', '.join(MODES)}")
    if mode == "lora":
        if lora_rank < 1:
            raise ValueError(f"lora_rank={lora_rank}: must be >= 1")
        for attn in [m for m in model.encoder.modules() if isinstance(m, WindowAttention)]:
            attn.qkv = LoRALinear(attn.qkv, lora_rank, lora_alpha)
            attn.proj = LoRALinear(attn.proj, lora_rank, lora_alpha)
    for name, p in model.encoder.named_parameters():
        p.requires_grad = mode == "full" or ".lora_" in name


def count_trainable(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
