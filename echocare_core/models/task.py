"""A fine-tuning model: the EchoCare encoder plus one task head, and the fine-tuning modes.

Modes: `full` (everything trains), `frozen` (the encoder is fixed, the head trains) and `lora`
(low-rank adapters on the attention projections `qkv` and `proj` train with the head; the encoder's
own weights stay fixed). LoRA keeps the base weights' names (`...attn.qkv.weight`), so a pretrained
checkpoint loads the same way with or without adapters.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from echocare_core.models.heads import ClassificationHead, SegmentationHead
from echocare_core.models.swin import EncoderConfig, SwinEncoder, WindowAttention

__all__ = ["TASKS", "MODES", "LoRALinear", "EchoCareTaskModel", "apply_finetune_mode", "count_trainable"]

TASKS = ("classification", "segmentation")
MODES = ("full", "frozen", "lora")


class LoRALinear(nn.Linear):
    """`y = W x + b + (alpha / r) * B(A(x))`, with A, B plain `nn.Linear` layers and B starting at zero."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None,
                         device=base.weight.device, dtype=base.weight.dtype)
        self.load_state_dict(base.state_dict())
        self.lora_A = nn.Linear(base.in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.lora_B(self.lora_A(x)) * self.scale


class EchoCareTaskModel(nn.Module):
    """Encoder + head. `forward(images)` gives class logits `[B, K]` or mask logits `[B, K, H, W]`."""

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Class probabilities of classification logits: sigmoid when multi-label, else softmax."""
        return logits.sigmoid() if self.multi_label else logits.softmax(-1)

    def __init__(self, cfg: EncoderConfig, task: Literal["classification", "segmentation"], num_classes: int,
                 feature_size: int = 16, multi_label: bool = False) -> None:
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"task '{task}' has no head yet; available: {', '.join(TASKS)}")
        self.task, self.multi_label = task, multi_label  # multi-label: independent sigmoid per class
        self.encoder = SwinEncoder(cfg)
        self.head = (ClassificationHead(self.encoder.num_features, num_classes) if task == "classification"
                     else SegmentationHead(cfg, num_classes, feature_size))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.task == "classification":
            return self.head(self.encoder(images))
        return self.head(images, self.encoder.forward_intermediates(images, intermediates_only=True))


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
