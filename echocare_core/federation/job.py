"""The federated job as both sides see it: what the server sends, what a site checks, what is shared.

A `Job` travels with every round as JSON. It names the task and its labels, the model, the fine-tuning
mode, what is shared and the local training settings; `job_hash` identifies it. A site refuses a job
whose task or labels do not match its dataset or that asks for more than the site allows
(`check_job`). Only parameters that train and are not named site-local are shared (`shared_names`);
the server aggregates them with sample weights (`weighted_mean`).

A multi-task job (`task: multitask`, two or more `tasks`) lets sites with different label types train one
encoder: each site runs the task its dataset declares (`task_for`). The server holds the encoder with its
adapters and one head per task (`heads.<index>.*`, `heads: shared`): the encoder part is aggregated over all
sites, each task's head over the sites of that task; a site sees its task's head as its own `head.*`
(`task_view`, `server_names`). With `heads: local` every site keeps its head (`MULTITASK_LOCAL`).
"""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch import nn

from echocare_core.config import check_ranges, from_dict, to_dict
from echocare_core.data.contract import DatasetSpec
from echocare_core.data.text import ReportTokenizer
from echocare_core.engine.training import LocalTraining
from echocare_core.federation.site_terms import SiteLimits
from echocare_core.federation.transport import text_hash
from echocare_core.models.heads import Decoder
from echocare_core.models.report import ReportHeadConfig
from echocare_core.models.swin import EncoderConfig, trainable_state_names
from echocare_core.privacy.settings import SitePrivacy
from echocare_core.tasks import get_task

__all__ = [
    "JOB_SCHEMA",
    "MULTITASK_LOCAL",
    "Job",
    "TaskSpec",
    "check_job",
    "job_hash",
    "local_patterns",
    "server_names",
    "shared_names",
    "task_for",
    "task_of",
    "task_view",
    "task_jobs",
    "weighted_mean",
]

JOB_SCHEMA = 3  # raise it when a default changes what a job means (its hash names only non-default values)
MULTITASK_LOCAL = ("head.*",)  # what each site of a multi-task job with heads: local keeps: its task's own layers


@dataclass(frozen=True)
class TaskSpec:
    """One task of a multi-task job: what a site's dataset must declare to run it."""

    task: str  # one of echocare_core.tasks.TASKS
    classes: tuple[str, ...] = ()  # classification, detection
    labels: tuple[int, ...] = ()  # segmentation: the declared mask values
    landmarks: int = 0  # landmarks: points per image
    multi_label: bool = False

    def __post_init__(self) -> None:
        get_task(self.task)  # an unknown task is refused with the closest name

    def describe(self) -> str:
        detail = get_task(self.task).describe(self)
        return " ".join([self.task, *([detail] if detail else []), *(["multi-label"] if self.multi_label else [])])


@dataclass(frozen=True)
class Job:
    task: str = "segmentation"  # one of echocare_core.tasks.TASKS, or "multitask" (with `tasks`)
    classes: tuple[str, ...] = ()  # classification, detection
    labels: tuple[int, ...] = ()  # segmentation: the declared mask values
    landmarks: int = 0  # landmarks: points per image
    multi_label: bool = False
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    feature_size: int = 16
    decoder: Decoder = "unetr"  # the dense decoder: unetr, or light (few parameters, for DP)
    frames: int = 16
    train: LocalTraining = field(default_factory=LocalTraining)  # how every site trains (as echocare-finetune's
    # `train`); the schedule and DP's epsilon cover the whole job, every round continuing where the last stopped
    local: tuple[str, ...] = ()  # parameter-name patterns that stay at each site (e.g. "*norm*", as FedBN)
    local_epochs: int = 1
    local_steps: int = 0  # > 0: exactly this many optimiser steps per round instead of local_epochs passes
    proximal_mu: float = 0.0  # FedProx: the site adds mu/2 * |w - w_global|^2 to its loss
    transport: Literal["bf16", "fp16", "fp32"] = "bf16"  # what sites send: deltas in 16 bits, or fp32 weights
    seed: int = 0
    tasks: tuple[TaskSpec, ...] = ()  # task "multitask": each site runs the one its dataset declares
    heads: Literal["shared", "local"] = "shared"  # multi-task: shared among the sites of a task, or kept at each site
    report: ReportHeadConfig = field(default_factory=ReportHeadConfig)  # report generation (byte-level tokens)
    base: str = ""  # SHA-256 of the weights the encoder starts from (echocare-server sets it from `init`); a site
    # holding a file with that digest (site.yaml base_weights) builds the frozen part from it, never downloads it

    def __post_init__(self) -> None:
        if self.base and not re.fullmatch(r"[0-9a-f]{64}", self.base):
            raise ValueError(
                f"base={self.base!r}: the SHA-256 of the base weights, 64 hex digits (echocare-server "
                f"sets it from init; leave it empty)"
            )
        if self.task != "multitask":
            get_task(self.task)  # an unknown task is refused with the closest name
        kinds = {replace(t, labels=tuple(sorted(t.labels))) for t in self.tasks}  # a task listed twice never runs
        if (self.task == "multitask") != bool(self.tasks) or len(self.tasks) == 1 or len(kinds) < len(self.tasks):
            raise ValueError(
                f"task '{self.task}' with {len(self.tasks)} tasks: a multi-task job needs task: "
                f"multitask and two or more different tasks; a single-task job lists none"
            )
        if self.heads not in ("shared", "local") or (self.heads == "local" and not self.tasks):
            raise ValueError(
                f"heads '{self.heads}': a multi-task job's heads are shared (among the sites of each task) or "
                f"local (each site's own); a single-task job keeps its head at the sites with local: ['head.*']"
            )
        if self.tasks and self.train.mode == "frozen":
            raise ValueError(
                "a multi-task job shares the encoder (mode full) or its adapters (mode lora); with "
                "mode frozen every site's trained part is its own head and nothing would be shared"
            )
        check_ranges(
            self,
            {
                "local_epochs": (self.local_epochs >= 1, ">= 1"),
                "local_steps": (self.local_steps >= 0, ">= 0 (0: local_epochs)"),
                "proximal_mu": (self.proximal_mu >= 0, ">= 0 (0: off)"),
            },
        )

    @property
    def num_outputs(self) -> int:
        """Head outputs: classes, mask labels, points or the byte-level tokenizer's ids (1 for regression)."""
        return get_task(self.task).outputs(len(self.classes), len(self.labels), self.landmarks)

    @property
    def tokenizer(self) -> ReportTokenizer | None:
        """Report generation: the byte-level tokenizer (learned from no site's text), else None."""
        return ReportTokenizer(max_tokens=self.report.max_tokens) if self.task == "report" else None

    def to_json(self) -> str:
        """The job's canonical JSON: the schema version and the values that differ from this schema's defaults
        (so a job keeps its hash while new settings are added at their defaults)."""
        return json.dumps({"schema": JOB_SCHEMA, **_changed(to_dict(self), to_dict(Job()))}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Job:
        """Raises: ValueError (via ConfigError) for another schema, an unknown key or a value not allowed."""
        data = json.loads(text)
        schema = data.pop("schema", None)
        if schema != JOB_SCHEMA:
            raise ValueError(
                f"job schema {schema}: this toolkit reads schema {JOB_SCHEMA} (coordinator and site "
                f"need toolkit versions with the same job schema)"
            )
        return from_dict(cls, data, "job")


def _changed(values: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """The entries of `values` that differ from `defaults`, recursing into sections."""
    out = {}
    for key, value in values.items():
        default = defaults.get(key)
        if isinstance(value, dict) and isinstance(default, dict):
            if inner := _changed(value, default):
                out[key] = inner
        elif value != default:
            out[key] = value
    return out


def job_hash(job: Job) -> str:
    """SHA-256 of the job's canonical JSON: what a site can pin and what both sides log."""
    return text_hash(job.to_json())


def task_jobs(job: Job) -> list[Job]:
    """The single-task jobs the sites run: `job` itself, or one per task of a multi-task job (its head
    site-local when the job's heads are local)."""
    if not job.tasks:
        return [job]
    return [
        replace(
            job,
            task=t.task,
            classes=t.classes,
            labels=t.labels,
            landmarks=t.landmarks,
            multi_label=t.multi_label,
            tasks=(),
            heads="shared",  # a single-task job says what stays at the site in `local`
            local=local_patterns(job),
        )
        for t in job.tasks
    ]


def task_for(job: Job, spec: DatasetSpec) -> tuple[int, Job] | None:
    """The index and single-task job of the first of the job's tasks that the site's dataset matches (None:
    none does)."""
    return next(((i, j) for i, j in enumerate(task_jobs(job)) if not _task_reasons(j, spec)), None)


def local_patterns(job: Job) -> tuple[str, ...]:
    """Parameter-name patterns that never leave a site: the job's `local`, and the heads of a multi-task job
    whose heads are local."""
    return (*job.local, *MULTITASK_LOCAL) if job.tasks and job.heads == "local" else job.local


def task_of(name: str) -> int | None:
    """The task index of a multi-task server's head parameter (`heads.<index>.*`); None for the encoder's."""
    match = re.match(r"heads\.(\d+)\.", name)
    return int(match[1]) if match else None


def task_view(state: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    """A multi-task site's view of the server's state: task `index`'s head as `head.*`, no other task's head."""
    return {
        (f"head.{k.removeprefix(f'heads.{index}.')}" if task_of(k) == index else k): v
        for k, v in state.items()
        if task_of(k) in (None, index)
    }


def server_names(shared: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    """A multi-task site's shared parameters under the server's names (its `head.*` as `heads.<index>.*`)."""
    return {(f"heads.{index}.{k.removeprefix('head.')}" if k.startswith("head.") else k): v for k, v in shared.items()}


def _task_reasons(job: Job, spec: DatasetSpec) -> list[str]:
    if job.task != spec.task:
        return [f"job task '{job.task}' but the site's dataset is '{spec.task}'"]
    mismatch = get_task(job.task).mismatch(job, spec)
    return [mismatch] if mismatch else []


def _passes(job: Job, train_samples: int) -> float:
    """Passes over the site's training split one round asks for (`local_steps` batches or `local_epochs`)."""
    return (
        job.local_steps * job.train.batch_size / max(train_samples, 1) if job.local_steps else float(job.local_epochs)
    )


def check_job(
    job: Job,
    spec: DatasetSpec,
    limits: SiteLimits,
    train_samples: int | None = None,
    privacy: SitePrivacy = SitePrivacy(),
) -> list[str]:
    """Reasons to refuse the job at this site (empty: accept). Reasons name keys, not data. A multi-task job is
    checked as the task the site's dataset matches (`task_for`).

    Args:
        train_samples: the site's training samples; with it, `local_steps` counts against `max_local_epochs`.
        privacy: the site's privacy terms (DP required, delta).
    """
    if job.tasks:
        match = task_for(job, spec)
        if match is None:
            own = TaskSpec(
                spec.task,
                tuple(spec.classes),
                tuple(spec.labels),
                len(spec.landmark_names),  # type: ignore[arg-type]
                spec.multi_label,
            )
            return [
                f"none of the job's tasks ({'; '.join(t.describe() for t in job.tasks)}) matches the site's "
                f"dataset ({own.describe()})"
            ]
        job = match[1]
    reasons = _task_reasons(job, spec)
    if not job.local_steps and job.local_epochs > limits.max_local_epochs:
        reasons.append(
            f"job local_epochs {job.local_epochs} exceeds the site's max_local_epochs {limits.max_local_epochs}"
        )
    elif job.local_steps and train_samples and _passes(job, train_samples) > limits.max_local_epochs:
        reasons.append(
            f"job local_steps {job.local_steps} x train.batch_size {job.train.batch_size} is "
            f"{_passes(job, train_samples):.1f} passes over the site's training split, more than "
            f"its max_local_epochs {limits.max_local_epochs}"
        )
    return reasons + _privacy_reasons(job, privacy)


def _privacy_reasons(job: Job, site: SitePrivacy) -> list[str]:
    dp = job.train.privacy
    if not dp.on:
        return (
            ["the site trains only with differential privacy and the job's train.privacy.epsilon is 0"]
            if site.required
            else []
        )
    reasons = []
    if dp.delta > site.delta:
        reasons.append(f"job train.privacy.delta {dp.delta:g} is above the site's delta {site.delta:g}")
    parts = get_task(job.task).sample_parts
    if parts and dp.mode == "ghost":
        reasons.append(f"job train.privacy.mode ghost cannot clip {parts} as one sample (use mode hooks)")
    if job.proximal_mu > 0:
        reasons.append("differential privacy with FedProx (proximal_mu > 0) is not supported yet")
    return reasons


def shared_names(model: nn.Module, job: Job) -> list[str]:
    """State-dict names of the parameters that leave the site: those that train, minus the job's site-local
    patterns."""
    return [
        n for n in trainable_state_names(model) if not any(fnmatch.fnmatchcase(n, pat) for pat in local_patterns(job))
    ]


def weighted_mean(updates: list[tuple[dict[str, torch.Tensor], int]]) -> dict[str, torch.Tensor]:
    """Sample-weighted mean of the sites' shared parameters (FedAvg), computed in float64.

    Raises:
        ValueError: no update, a non-positive sample count, or updates with different parameter names.
    """
    if not updates:
        raise ValueError("no update to aggregate")
    names = set(updates[0][0])
    if any(set(u) != names for u, _ in updates) or any(n <= 0 for _, n in updates):
        raise ValueError("updates must share the same parameter names and have positive sample counts")
    total = sum(n for _, n in updates)
    out: dict[str, Any] = {}
    for name in updates[0][0]:
        acc = sum(u[name].double() * (n / total) for u, n in updates)
        out[name] = acc.to(updates[0][0][name].dtype)
    return out
