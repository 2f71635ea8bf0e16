"""DP-SGD with Opacus on the EchoCare models: per-sample gradients, clipping, noise, Poisson batches, accounting.

The encoder keeps the true batch dimension through window attention and adds the relative-position
bias to per-sample logits in a module of its own (`RelPosBias`), so Opacus' hooks see one sample per image;
this module gives that bias its per-sample gradient rule and makes Opacus' Conv2d rule safe for non-contiguous
input (its `unfold2d` assumes NCHW-contiguous memory and is silently wrong otherwise). Before every step,
`DPTraining.check` refuses a per-sample gradient whose first dimension is not the batch size.
"""

from __future__ import annotations

import secrets
import warnings
from collections.abc import Callable, Iterator
from functools import lru_cache
from typing import Any

import torch
from opacus import GradSampleModule
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.grad_sample import GradSampleModuleFastGradientClipping, register_grad_sampler, register_norm_sampler
from opacus.grad_sample.conv import compute_conv_grad_sample
from opacus.grad_sample.linear import compute_linear_grad_sample, compute_linear_norm_sample
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
from torch import nn

from echocare_core.models.swin import RelPosBias, WindowAttention
from echocare_core.privacy.settings import DPSettings

__all__ = ["DPTraining", "PrivacyError", "epsilon", "noise_multiplier", "poisson_batches", "secret_generator"]

History = list[tuple[float, float, int]]  # (noise multiplier, sample rate, steps)


# Opacus hooks every layer; torch warns at each backward that the first one's input (the image) needs no gradient
warnings.filterwarnings(
    "ignore",
    message="Full backward hook is firing when gradients are computed with respect to "
    "module outputs since no inputs require gradients",
)


class PrivacyError(RuntimeError):
    """DP training cannot keep its guarantee (e.g. a per-sample gradient that is not per sample)."""


@register_grad_sampler(RelPosBias)
def _rel_pos_grad_sample(
    layer: RelPosBias, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradient of the bias table: each sample's logit gradients `[B, nW, heads, N, N]`, summed over
    its windows, scattered into the rows its relative positions index."""
    table = layer.relative_position_bias_table  # [T, heads]
    index = layer.index.reshape(-1)  # [N*N]
    g = backprops.sum(1)  # [B, heads, N, N]
    g = g.permute(0, 2, 3, 1).reshape(g.shape[0], -1, g.shape[1]).to(table.dtype)  # [B, N*N, heads]
    out = torch.zeros(g.shape[0], *table.shape, dtype=table.dtype, device=table.device)
    return {table: out.index_add_(1, index, g)}


@register_grad_sampler([nn.Conv1d, nn.Conv2d, nn.Conv3d])
def _conv_grad_sample(
    layer: nn.Module, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Opacus' conv rule on contiguous activations (permuted or channels-last input gives wrong results)."""
    return compute_conv_grad_sample(layer, [a.contiguous() for a in activations], backprops)


@register_norm_sampler(nn.Linear)
def _linear_norm_sample(
    layer: nn.Linear, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradient norms of a Linear layer: from the explicit per-sample gradient when the input has
    more tokens T than sqrt(d_in * d_out) (T x T Gram matrices would cost more), else Opacus' ghost norm."""
    if backprops.dim() == 3 and backprops.shape[1] ** 2 > layer.in_features * layer.out_features:
        grads = compute_linear_grad_sample(layer, activations, backprops)
        return {p: g.flatten(1).norm(2, dim=1) for p, g in grads.items()}
    return compute_linear_norm_sample(layer, activations, backprops)


@lru_cache(maxsize=64)
def noise_multiplier(settings: DPSettings, sample_rate: float, steps: int) -> float:
    """Noise for the whole planned job (`steps` over all rounds), calibrated with RDP (conservative: the PRV
    epsilon the ledger reports comes out at or below the target)."""
    with warnings.catch_warnings():  # "optimal order is the largest alpha": a looser bound, so more noise, not less
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return get_noise_multiplier(
            target_epsilon=settings.epsilon,
            target_delta=settings.delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant="rdp",
        )


def epsilon(history: History, delta: float, accountant: str = "prv") -> float:
    """Epsilon after `history` (rounds of (noise multiplier, sample rate, steps)), PRV by default."""
    if not history:
        return 0.0
    acc = PRVAccountant() if accountant == "prv" else RDPAccountant()
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return float(acc.get_epsilon(delta))


def secret_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A generator no one else can predict: the server knows the job's seed, so noise and sampling must not
    derive from it."""
    return torch.Generator(device=device).manual_seed(secrets.randbits(63))


def poisson_batches(n: int, sample_rate: float, steps: int, generator: torch.Generator) -> Iterator[list[int]]:
    """`steps` batches, each sample in each independently with probability `sample_rate` (may be empty)."""
    for _ in range(steps):
        yield torch.nonzero(torch.rand(n, generator=generator) < sample_rate).flatten().tolist()


class DPTraining:
    """A model and optimizer made private for one round: per-sample gradients, clipping to `max_grad_norm`,
    Gaussian noise, averaging by the expected batch size.

    `settings.mode`: `hooks` keeps every per-sample gradient (Opacus' default); `ghost` keeps only their norms,
    clips by reweighting the per-sample losses and backpropagates twice (less memory for full fine-tuning),
    with a Linear norm rule that takes the explicit per-sample gradient where tokens^2 > d_in * d_out
    (early Swin stages), where Opacus' Gram-matrix rule would be several times slower.

    A sample of several images (a clip's frames, a report's views) goes through the encoder as that many rows of
    one batch: with `images_per_sample` > 1, the encoder's per-image gradients are folded into one per sample
    before the check (Opacus scaled each by the number of rows, not of samples, hence their mean).

    Args:
        model: trains in place; explicit (non-fused) attention is switched on for it.
        optimizer: the round's optimizer over the model's trainable parameters.
        images_per_sample: rows of the encoder's batch per sample (frames of a clip, views of a report).

    Raises:
        ValueError: ghost clipping with several images per sample (norms of images do not add up to a sample's).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        settings: DPSettings,
        sigma: float,
        expected_batch_size: int,
        images_per_sample: int = 1,
    ) -> None:
        if settings.mode == "ghost" and images_per_sample > 1:
            raise ValueError(
                f"privacy.mode ghost keeps per-image gradient norms, which do not add up to the norm of "
                f"a sample of {images_per_sample} images (a clip or a report's views): use mode hooks"
            )
        self.images_per_sample = images_per_sample
        for m in model.modules():
            if isinstance(m, WindowAttention):
                m.fused_attn = False  # fused kernels fold windows into the batch and bypass RelPosBias
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.ghost = settings.mode == "ghost"
        kwargs = dict(
            noise_multiplier=sigma,
            max_grad_norm=settings.max_grad_norm,
            expected_batch_size=expected_batch_size,
            loss_reduction="mean",
            generator=secret_generator(self.params[0].device),
        )
        if self.ghost:
            self.module = GradSampleModuleFastGradientClipping(
                model, batch_first=True, loss_reduction="mean", max_grad_norm=settings.max_grad_norm
            )
            self.optimizer = DPOptimizerFastGradientClipping(optimizer, **kwargs)
        else:
            self.module = GradSampleModule(model, batch_first=True, loss_reduction="mean")
            self.optimizer = DPOptimizer(optimizer, **kwargs)

    def loss(self, loss_fn: Callable, out: torch.Tensor, target: Any) -> Any:
        """The batch loss; for ghost clipping, one that backpropagates twice (norms, then clipped gradients)."""
        if not self.ghost:
            return loss_fn(out, target)
        per_sample = torch.stack([loss_fn(out[i : i + 1], target[i : i + 1]) for i in range(len(out))])  # [B]
        return DPTensorFastGradientClipping(self.module, self.optimizer, per_sample, "mean")

    def check(self, batch_size: int) -> None:
        """Refuse to step unless every trainable parameter has one per-sample gradient (ghost: norm) per sample.

        Raises:
            PrivacyError: a missing per-sample gradient, or one whose first dimension is not the batch size.
        """
        for p in self.params:
            g = getattr(p, "_norm_sample" if self.ghost else "grad_sample", None)
            if self.images_per_sample > 1 and g is not None and g.shape[0] == batch_size * self.images_per_sample:
                g = p.grad_sample = g.reshape(batch_size, self.images_per_sample, *g.shape[1:]).mean(1)
            if g is None or g.shape[0] != batch_size:
                got = "none" if g is None else f"first dimension {g.shape[0]}"
                raise PrivacyError(
                    f"a per-sample gradient of shape {tuple(p.shape)} has {got}, not the batch size "
                    f"{batch_size}: the DP guarantee would not hold, so training stops"
                )
        for p in self.params if self.ghost else []:
            p._norm_sample = None  # Opacus keeps them: the next step must bring its own

    def empty_batch(self) -> None:
        """An empty Poisson batch is still a step: zero per-sample gradients, so the update is noise only."""
        for p in self.params:
            if self.ghost:
                p.grad = torch.zeros_like(p)
            else:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
