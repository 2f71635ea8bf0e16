"""Aggregation strategies over the sites' shared parameters, in float64, with the server state they keep.

- `fedavg` / `fedprox`: sample-weighted mean (FedProx differs at the sites: `Job.proximal_mu`).
- `fednova` (Wang et al. 2020): each site's update divided by its local optimiser steps before the weighted mean,
  times the sites' mean step count. A site's update grows with the steps it took, so FedAvg weights a large site
  by its samples twice; FedNova weights every site's images as pooling them would.
- For these three, `server_lr` scales the step from the global model to the aggregate (FedAvg with a server
  learning rate; 1 is the plain mean).
- `fedadam` / `fedyogi` (Reddi et al. 2021): the weighted mean minus the global model is a pseudo-
  gradient for a server-side Adam / Yogi step; its moments are server state, checkpointed each round.
- `fedmedian`: coordinate-wise median; `fedtrimmedavg`: coordinate-wise mean after dropping the
  `trim` fraction of the highest and of the lowest values; `krum` (Blanchard et al. 2017): the one
  update closest to its n - f - 2 nearest others, for up to `krum_f` faulty or hostile sites. These
  three ignore sample counts, so that a site cannot buy influence by claiming many samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import torch

from echocare_core.federation.job import weighted_mean

__all__ = ["STRATEGIES", "StrategyConfig", "aggregate_updates"]

STRATEGIES = ("fedavg", "fedprox", "fednova", "fedadam", "fedyogi", "fedmedian", "fedtrimmedavg", "krum")
MEANS = ("fedavg", "fedprox", "fednova")  # a weighted mean, then a step of `server_lr` towards it
# fednova's 2 was tuned on bench/federated_quality.py (docs/benchmarks.md, "What to expect from a federation"); under
# DP its usual step is 1 (`StrategyConfig.private`): 2 doubles the noise in every update with the signal (bench/dp_cost.py)
USUAL_STEP = {"fedavg": 1.0, "fedprox": 1.0, "fednova": 2.0, "fedadam": 0.1, "fedyogi": 0.1}
Updates = list[tuple[dict[str, torch.Tensor], int]]


@dataclass(frozen=True)
class StrategyConfig:
    name: Literal["fedavg", "fedprox", "fednova", "fedadam", "fedyogi", "fedmedian", "fedtrimmedavg", "krum"] = (
        "fednova"
    )
    server_lr: float | None = None  # fedavg / fedprox / fednova: the step to the aggregate (1: the plain mean);
    # fedadam / fedyogi: the Adam step size; None: the strategy's usual value (USUAL_STEP)
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3  # fedadam / fedyogi: adaptivity (added to the root of the second moment)
    trim: float = 0.2  # fedtrimmedavg: fraction cut at each end
    krum_f: int = 0  # krum: sites that may be faulty

    def __post_init__(self) -> None:
        if self.server_lr is not None and self.server_lr <= 0:
            raise ValueError(f"server_lr={self.server_lr}: must be > 0 (or null: the strategy's usual value)")
        if not 0 <= self.beta1 < 1 or not 0 <= self.beta2 < 1 or self.tau <= 0:
            raise ValueError(
                f"beta1={self.beta1}, beta2={self.beta2}, tau={self.tau}: need 0 <= beta1, beta2 < 1 and tau > 0"
            )
        if not 0 <= self.trim < 0.5 or self.krum_f < 0:
            raise ValueError(f"trim={self.trim} must be in [0, 0.5) and krum_f={self.krum_f} >= 0")

    @property
    def step(self) -> float:
        """The server's step size: `server_lr`, or the strategy's usual value."""
        return USUAL_STEP.get(self.name, 1.0) if self.server_lr is None else self.server_lr

    def private(self, dp: bool) -> StrategyConfig:
        """The config for a job with (`dp`) or without differential privacy: under DP, fednova's usual step is 1."""
        return replace(self, server_lr=1.0) if dp and self.name == "fednova" and self.server_lr is None else self


def _stack(updates: Updates, name: str) -> torch.Tensor:
    return torch.stack([u[name].double() for u, _ in updates])  # [S, ...]


def _median(x: torch.Tensor) -> torch.Tensor:
    s = x.sort(0).values
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def _trimmed(x: torch.Tensor, trim: float) -> torch.Tensor:
    cut = math.floor(trim * len(x))
    return x.sort(0).values[cut : len(x) - cut].mean(0)


def _krum(updates: Updates, f: int) -> dict[str, torch.Tensor]:
    n = len(updates)
    if n < 2 * f + 3:
        raise ValueError(f"krum with krum_f={f} needs at least {2 * f + 3} replies, got {n}")
    flat = torch.stack([torch.cat([t.double().flatten() for t in u.values()]) for u, _ in updates])  # [S, P]
    d2 = torch.cdist(flat, flat).pow(2)  # [S, S]
    scores = d2.sort(1).values[:, 1 : n - f - 1].sum(1)  # the n - f - 2 nearest others, self excluded
    return dict(updates[int(scores.argmin())][0])


def _normalised(current: dict[str, torch.Tensor], updates: Updates, steps: list[int]) -> Updates:
    """FedNova: each update's change divided by its steps, times the sample-weighted mean of the steps."""
    if len(steps) != len(updates) or any(t <= 0 for t in steps):
        raise ValueError(f"fednova needs each update's local steps (> 0), got {steps} for {len(updates)} updates")
    total = sum(n for _, n in updates)
    mean_steps = sum(n * t for (_, n), t in zip(updates, steps)) / total
    return [
        ({k: current[k].double() + (v.double() - current[k].double()) * (mean_steps / t) for k, v in u.items()}, n)
        for (u, n), t in zip(updates, steps)
    ]


def aggregate_updates(
    cfg: StrategyConfig,
    current: dict[str, torch.Tensor],
    updates: Updates,
    server_state: dict[str, torch.Tensor],
    steps: list[int] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The new values of the shared parameters and the new server state.

    Args:
        current: the global model's current values of (at least) the shared parameters.
        updates: each site's shared parameters and sample count.
        server_state: what the strategy kept from earlier rounds (`m.NAME`, `v.NAME` for fedadam/fedyogi).
        steps: each update's local optimiser steps (fednova needs them).

    Raises:
        ValueError: no update, mismatched names, too few replies for krum, or fednova without steps.
    """
    mean = weighted_mean(updates)  # also checks the updates agree
    if cfg.name == "fednova":
        mean = weighted_mean(_normalised(current, updates, steps or []))
    if cfg.name in MEANS:
        if cfg.step == 1:
            return {n: v.to(current[n].dtype) for n, v in mean.items()}, server_state
        return {
            n: (current[n].double() + cfg.step * (v.double() - current[n].double())).to(current[n].dtype)
            for n, v in mean.items()
        }, server_state
    names = list(mean)
    if cfg.name == "fedmedian":
        return {n: _median(_stack(updates, n)).to(mean[n].dtype) for n in names}, server_state
    if cfg.name == "fedtrimmedavg":
        return {n: _trimmed(_stack(updates, n), cfg.trim).to(mean[n].dtype) for n in names}, server_state
    if cfg.name == "krum":
        return _krum(updates, cfg.krum_f), server_state
    new, state = {}, dict(server_state)
    for n in names:
        w = current[n].double()
        delta = mean[n].double() - w  # pseudo-gradient (a step towards the sites)
        m = cfg.beta1 * state.get(f"m.{n}", torch.zeros_like(w)) + (1 - cfg.beta1) * delta
        v = state.get(f"v.{n}", torch.full_like(w, cfg.tau**2))
        if cfg.name == "fedadam":
            v = cfg.beta2 * v + (1 - cfg.beta2) * delta**2
        else:  # fedyogi: v moves towards delta^2 by a bounded step
            v = v - (1 - cfg.beta2) * delta**2 * torch.sign(v - delta**2)
        state[f"m.{n}"], state[f"v.{n}"] = m, v
        new[n] = (w + cfg.step * m / (v.sqrt() + cfg.tau)).to(mean[n].dtype)
    return new, state
