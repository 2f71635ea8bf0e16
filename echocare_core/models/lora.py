"""The fine-tuning modes of a task model (`echocare_core.tasks.model`).

Modes: `full` (everything trains), `frozen` (the encoder is fixed, the head trains) and `lora`
(low-rank adapters on the attention projections `qkv` and `proj` train with the head; the encoder's
own weights stay fixed). LoRA keeps the base weights' names (`...attn.qkv.weight`), so a pretrained
checkpoint loads the same way with or without adapters.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from echocare_core.models.swin import WindowAttention

__all__ = ["MODES", "LoRALinear", "apply_finetune_mode", "count_trainable"]

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


def apply_finetune_mode(model: nn.Module, mode: str, lora_rank: int = 8, lora_alpha: float = 16.0) -> None:
    """Set what trains in `model.encoder`. For `lora`, adapters are added to every attention `qkv` and `proj`.

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
