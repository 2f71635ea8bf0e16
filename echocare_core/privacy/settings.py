"""What a job asks of the sites' privacy, what a site allows, and the ledger's errors: no Opacus import here."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from echocare_core.config import check_ranges

__all__ = ["BudgetExceeded", "DPSettings", "LedgerError", "SitePrivacy", "steps_per_round"]


class LedgerError(RuntimeError):
    """The site's privacy ledger cannot be trusted (edited, or deleted while its key remains)."""


class BudgetExceeded(LedgerError):
    """One more round would take a dataset past the site's budget (the message names no file)."""


@dataclass(frozen=True)
class DPSettings:
    """What the job asks of every site: (epsilon, delta) for the whole planned job, per-sample clipping norm."""

    epsilon: float = 0.0  # 0: no differential privacy
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    mode: Literal["hooks", "ghost"] = "hooks"  # ghost: per-sample norms only, two backward passes, less memory

    def __post_init__(self) -> None:
        check_ranges(
            self,
            {
                "epsilon": (self.epsilon >= 0, ">= 0 (0: no differential privacy)"),
                "delta": (0 < self.delta < 1, "in (0, 1)"),
                "max_grad_norm": (self.max_grad_norm > 0, "> 0"),
            },
        )
        if self.mode not in ("hooks", "ghost"):
            raise ValueError(f"privacy.mode '{self.mode}': choose hooks or ghost")

    @property
    def on(self) -> bool:
        return self.epsilon > 0


@dataclass(frozen=True)
class SitePrivacy:
    """The site's privacy terms; its ledger (`state_dir/privacy/`) records every DP round per dataset."""

    required: bool = False  # refuse jobs without differential privacy
    epsilon_budget: float = 0.0  # the most epsilon a dataset may spend over its lifetime (0: no cap)
    delta: float = 1e-5  # epsilon is accounted at this delta; jobs asking for a larger delta are refused

    def __post_init__(self) -> None:
        check_ranges(
            self,
            {
                "epsilon_budget": (self.epsilon_budget >= 0, ">= 0 (0: no cap)"),
                "delta": (0 < self.delta < 1, "in (0, 1)"),
            },
        )
        if self.required and not self.epsilon_budget:
            raise ValueError(
                "privacy.required is true but privacy.epsilon_budget is 0: set the budget the site's "
                "datasets may spend, e.g. 8"
            )


def steps_per_round(local_epochs: int, local_steps: int, batch_size: int, train_samples: int) -> int:
    """Optimiser steps of one round: `local_steps`, or `local_epochs` passes of Poisson batches."""
    return local_steps or local_epochs * math.ceil(train_samples / batch_size)
