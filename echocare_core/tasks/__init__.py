"""EchoCare's fine-tuning tasks as objects: one module per task behind one protocol (`Task`, in `base`), looked up by
name in `TASKS`. Each module holds what is particular to its task: the head's outputs, the loss, the metrics with
the main one and its direction, what a job and a dataset must agree on, and what differential privacy clips as one
sample. docs/architecture.md shows how to add one."""

from __future__ import annotations

from echocare_core.config import did_you_mean
from echocare_core.tasks.base import Loss, Task
from echocare_core.tasks.classification import Classification
from echocare_core.tasks.detection import Detection
from echocare_core.tasks.enhancement import Enhancement
from echocare_core.tasks.landmarks import Landmarks
from echocare_core.tasks.regression import Regression
from echocare_core.tasks.report import Report
from echocare_core.tasks.segmentation import Segmentation

__all__ = ["TASKS", "Loss", "Task", "get_task"]

TASKS: dict[str, Task] = {
    t.name: t
    for t in (Classification(), Segmentation(), Landmarks(), Detection(), Regression(), Enhancement(), Report())
}


def get_task(name: str) -> Task:
    """The task called `name`.

    Raises:
        ValueError: no such task (with the closest name).
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; the tasks are {', '.join(TASKS)}.{did_you_mean(name, list(TASKS))}")
    return TASKS[name]
