"""Aggregation strategies over the sites' shared parameters, in float64, with the server state they keep.

- `fedavg` / `fedprox`: sample-weighted mean (FedProx differs at the sites: `Job.proximal_mu`).
- `fedadam` / `fedyogi` (Reddi et al. 2021): the weighted mean minus the global model is a pseudo-
  gradient for a server-side Adam / Yogi step; its moments are server state, checkpointed each round.
- `fedmedian`: coordinate-wise median; `fedtrimmedavg`: coordinate-wise mean after dropping the
  `trim` fraction of the highest and of the lowest values; `krum` (Blanchard et al. 2017): the one
  update closest to its n - f - 2 nearest others, for up to `krum_f` faulty or hostile sites. These
  three ignore sample counts, so that a site cannot buy influence by claiming many samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from echocare_core.federation.job import weighted_mean

__all__ = ["STRATEGIES", "StrategyConfig", "aggregate_updates"]

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedmedian", "fedtrimmedavg", "krum")
Updates = list[tuple[dict[str, torch.Tensor], int]]


@dataclass(frozen=True)
class StrategyConfig:
    name: Literal["fedavg", "fedprox", "fedadam", "fedyogi", "fedmedian", "fedtrimmedavg", "krum"] = "fedavg"
    server_lr: float = 0.1  # fedadam / fedyogi step size
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3  # fedadam / fedyogi: adaptivity (added to the root of the second moment)
    trim: float = 0.2  # fedtrimmedavg: fraction cut at each end
    krum_f: int = 0  # krum: sites that may be faulty

    def __post_init__(self) -> None:
        if self.server_lr <= 0 or not 0 <= self.beta1 < 1 or not 0 <= self.beta2 < 1 or self.tau <= 0:
            raise ValueError("need server_lr > 0, 0 <= beta1, beta2 < 1 and tau > 0")
        if not 0 <= self.trim < 0.5 or self.krum_f < 0:
            raise ValueError(f"trim={self.trim} must be in [0, 0.5) and krum_f={self.krum_f} >= 0")


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


def aggregate_updates(
    cfg: StrategyConfig, current: dict[str, torch.Tensor], updates: Updates, server_state: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The new values of the shared parameters and the new server state.

    Args:
        current: the global model's current values of (at least) the shared parameters.
        updates: each site's shared parameters and sample count.
        server_state: what the strategy kept from earlier rounds (`m.NAME`, `v.NAME` for fedadam/fedyogi).

    Raises:
        ValueError: no update, mismatched names, or too few replies for krum.
    """
    mean = weighted_mean(updates)  # also checks the updates agree
    if cfg.name in ("fedavg", "fedprox"):
        return mean, server_state
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
        new[n] = (w + cfg.server_lr * m / (v.sqrt() + cfg.tau)).to(mean[n].dtype)
    return new, state
