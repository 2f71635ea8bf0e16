"""What a site accepts of a job: its limits. Nothing heavy is imported here: the ClientApp reads a site's config."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SiteLimits"]


@dataclass(frozen=True)
class SiteLimits:
    """What a site accepts: the largest batch (its GPU memory) and the most local epochs per round."""

    max_batch_size: int = 64
    max_local_epochs: int = 10

    def __post_init__(self) -> None:
        for key in ("max_batch_size", "max_local_epochs"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)}: must be >= 1")
