"""`DatasetSpec`: a dataset's `dataset.yaml`, as `data.contract.load_spec` reads and checks it."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["DatasetSpec"]


@dataclass(frozen=True)
class DatasetSpec:
    """`dataset.yaml`, checked."""

    name: str
    task: str
    channels: int = 1
    classes: tuple[str, ...] = ()
    labels: dict[int, str] = field(default_factory=dict)
    multi_label: bool = False
    ontology: str = "default"
    landmark_names: tuple[str, ...] = ()  # landmarks: the points' names in manifest order (optional)
    target_name: str = "target"  # regression: what the number is, e.g. "ejection_fraction"
    findings: tuple[str, ...] = ()  # report: phrases a report states only when the finding is present
