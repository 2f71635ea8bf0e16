"""What a site accepts of a job: its limits. Nothing heavy is imported here: the ClientApp reads a site's config."""

from __future__ import annotations

from dataclasses import dataclass

from echocare_core.config import check_ranges

__all__ = ["SiteLimits"]


@dataclass(frozen=True)
class SiteLimits:
    """What a site accepts: the most local epochs per round, and the largest batch its memory holds (a job's larger
    batches go through in pieces of that size, their gradients accumulated into one step)."""

    max_batch_size: int = 64
    max_local_epochs: int = 10

    def __post_init__(self) -> None:
        check_ranges(
            self,
            {
                "max_batch_size": (self.max_batch_size >= 1, ">= 1"),
                "max_local_epochs": (self.max_local_epochs >= 1, ">= 1"),
            },
        )
