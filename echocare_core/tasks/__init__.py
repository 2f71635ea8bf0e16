"""EchoCare's fine-tuning tasks as objects: one module per task behind one protocol (`Task`, in `base`), registered
by name in `TASKS` with the manifest column its targets are in.

Each module holds what is particular to its task: the head, how a target is read and flipped, the loss, decoding,
the metrics with the main one and its direction, the bootstrap, the predictions written for a clinician, what a
model and a dataset must agree on, and what differential privacy clips as one sample. The registry itself is light
(a task's module is imported when `get_task` first asks for it), so the data contract can read the columns without
loading torch. docs/architecture.md shows how to add a task.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

from echocare_core.config import did_you_mean

if TYPE_CHECKING:
    from echocare_core.tasks.base import Task

__all__ = ["TASKS", "get_task"]

# name -> (the manifest column a sample's target is in, "module:Class" of the task)
TASKS: dict[str, tuple[str, str]] = {
    "classification": ("label", "echocare_core.tasks.classification:Classification"),
    "segmentation": ("mask", "echocare_core.tasks.segmentation:Segmentation"),
    "landmarks": ("landmarks", "echocare_core.tasks.landmarks:Landmarks"),
    "detection": ("boxes", "echocare_core.tasks.detection:Detection"),
    "regression": ("target", "echocare_core.tasks.regression:Regression"),
    "enhancement": ("target_image", "echocare_core.tasks.enhancement:Enhancement"),
    "report": ("report", "echocare_core.tasks.report:Report"),
}
_made: dict[str, Task] = {}


def get_task(name: str) -> Task:
    """The task called `name`.

    Raises:
        ValueError: no such task (with the closest name).
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; the tasks are {', '.join(TASKS)}.{did_you_mean(name, list(TASKS))}")
    if name not in _made:
        module, cls = TASKS[name][1].split(":")
        _made[name] = getattr(import_module(module), cls)()
    return _made[name]
