"""AdamW with the usual no-decay groups, and a linear-warm-up cosine schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["build_optimizer", "warmup_cosine"]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float]) -> torch.optim.AdamW:
    """AdamW; biases, norms, position tables and the mask token get no weight decay."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or name.endswith(("relative_position_bias_table", "mask_token"))
        (no_decay if skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_ratio: float, start: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from ~0 to the base LR, then cosine decay to `min_ratio` of it; the schedule begins at step
    `start` (the steps that ran before, e.g. in earlier rounds of a federated job)."""

    def factor(local_step: int) -> float:
        step = start + local_step
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
