"""The coordinator's round logic, without Flower: plan a round, receive and check each reply, close the round.

`Coordinator` holds the global model of a run (started from the job's initial model, or resumed from the newest
round checkpoint), asks a share of the connected sites each round (`plan`), decodes and checks each site's reply
(`receive`: names and shapes of the job's shared parameters, the transport's dtype, finite values, samples, the
task), and closes the round (`close`): outlier screening, the quorum, aggregation with the job's strategy, the
round checkpoint, the best model, the history. Every event goes to `progress.jsonl` (what `echocare-server`
shows) and the coordinator's audit log through `Progress`, whose events are listed in `EVENTS`. The Flower
ServerApp (`echocare_server.server_app`) only moves messages; tests drive the round logic with plain values.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from echocare_core.config import check_ranges
from echocare_core.engine.finetune import write_json_lines
from echocare_core.engine.run_report import privacy_spent, write_federation_report
from echocare_core.federation.audit import AuditLog, manifest
from echocare_core.federation.job import Job, job_hash, shared_names, task_jobs, task_of
from echocare_core.federation.rounds import (
    aggregate,
    choose_sites,
    initial_state,
    outlier_reasons,
    resume,
    save_best,
    save_round,
)
from echocare_core.federation.site import build_job_model
from echocare_core.federation.strategies import StrategyConfig
from echocare_core.federation.transport import decode
from echocare_core.tasks import get_task

__all__ = ["EVENTS", "Coordinator", "Progress", "QuorumError", "Round", "RoundSettings", "check_reply", "nbytes"]

EVENTS = {  # progress.jsonl and audit.jsonl: each event and what it carries besides its time
    "start": "rounds, resumed_after, job_hash, strategy",
    "round_start": "round, sites (asked), connected, asked (node ids)",
    "refused": "round, node, code, reason, bytes_sent (a site refused the job or failed; its reason is its own)",
    "rejected": "round, site, reason, bytes_sent, bytes_received (a reply that is not aggregated)",
    "reply": "round, site, its metrics, task, metric, seconds, bytes_sent, bytes_received",
    "round_end": "round, seconds, sites, bytes_to_sites, bytes_from_sites, checkpoint, best (a round's model)",
    "failed": "reason, round (too few sites connected or valid replies)",
    "done": "rounds, report",
}


@dataclass(frozen=True)
class RoundSettings:
    """`rounds:` of federation.yaml: how many rounds, who must answer, how long to wait."""

    rounds: int = 3
    min_sites: int = 2  # valid replies a round needs to count (quorum)
    expected_sites: int = 0  # sites to wait for before round 1 (0: min_sites); after wait_for_sites seconds the
    wait_for_sites: float = 600.0  # run starts with those connected, if they are at least min_sites
    deadline: float = 3600.0  # seconds a round waits for replies; late sites are left out of that round
    participation: float = 1.0  # share of the connected sites asked each round (drawn anew, at least min_sites)
    max_norm_ratio: float = 10.0  # leave out an update farther from the global model than this many times the
    # round's median (3 replies or more; 0: off); names, shapes and finite values are always checked
    keep_checkpoints: int = 2  # round checkpoints kept (the newest); checkpoints/best is kept besides

    def __post_init__(self) -> None:
        check_ranges(
            self,
            {
                "rounds": (self.rounds >= 1, ">= 1"),
                "min_sites": (self.min_sites >= 1, ">= 1"),
                "expected_sites": (self.expected_sites >= 0, ">= 0 (0: min_sites)"),
                "wait_for_sites": (self.wait_for_sites > 0, "> 0 seconds"),
                "deadline": (self.deadline > 0, "> 0 seconds"),
                "participation": (0 < self.participation <= 1, "in (0, 1]"),
                "max_norm_ratio": (self.max_norm_ratio >= 0, ">= 0 (0: off)"),
                "keep_checkpoints": (self.keep_checkpoints >= 2, ">= 2"),
            },
        )


class QuorumError(RuntimeError):
    """Too few sites connected or sent valid replies; the run ends as failed."""


class Progress:
    """Append one JSON line per event (`EVENTS`) to `progress.jsonl` (read by `echocare-server`) and, fsynced, to
    the coordinator's audit log `audit.jsonl` (which also gets the names, shapes and bytes each site sent)."""

    def __init__(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.path, self.audit = out / "progress.jsonl", AuditLog(out / "audit.jsonl")

    def __call__(self, event: str, sent: dict | None = None, **fields: Any) -> None:
        if event not in EVENTS:
            raise ValueError(f"unknown progress event {event!r}")
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"time": round(time.time(), 3), "event": event, **fields}) + "\n")
        self.audit(event, **fields, **({"sent": manifest(sent)} if sent is not None else {}))


def nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


@dataclass
class Round:
    """One round in progress: the sites asked, the bytes sent to each, the valid updates so far."""

    number: int
    nodes: list[int]
    started: float = field(default_factory=time.time)
    down: dict[int, int] = field(default_factory=dict)  # bytes sent to each node (messages asked again count)
    received: int = 0  # bytes of every reply, valid or not
    updates: list[tuple[dict[str, torch.Tensor], int]] = field(default_factory=list)
    sites: list[dict[str, Any]] = field(default_factory=list)

    def seconds(self) -> float:
        return round(time.time() - self.started, 2)


def check_reply(
    sent: dict[str, torch.Tensor],
    state: dict[str, torch.Tensor],
    expected: list[dict[str, torch.Size]],
    metrics: dict[str, float],
    transport: str,
) -> tuple[dict[str, torch.Tensor], str]:
    """A reply's trained shared parameters (fp32, from its deltas or weights) and why they cannot be aggregated
    ("" when they can): no task of a multi-task job, other parameters or shapes than `expected` of its task (one
    entry per task; a single-task job's one), another dtype than the transport's, non-finite values, no samples."""
    tasks = len(expected)
    if tasks > 1 and metrics.get("task_index") not in range(tasks):
        return {}, f"it names no task of the job (task_index must be 0-{tasks - 1})"
    if {n: t.shape for n, t in sent.items()} != expected[int(metrics["task_index"]) if tasks > 1 else 0]:
        return {}, "its parameters differ from the job's shared parameters (names or shapes)"
    try:
        shared = decode(sent, state, transport)
    except ValueError as exc:
        return {}, str(exc)
    if not all(bool(t.isfinite().all()) for t in shared.values()):
        return {}, "non-finite values"
    return shared, "" if metrics.get("num-examples", 0) >= 1 else "no training samples"


class Coordinator:
    """The round logic of a federated run writing to `out` (see the module's docstring)."""

    def __init__(
        self,
        out: Path,
        job: Job,
        settings: RoundSettings,
        strategy: StrategyConfig = StrategyConfig(),
        init: str | None = None,
        init_partial: bool = False,
    ) -> None:
        self.out, self.job, self.settings, self.strategy = out, job, settings, strategy
        self.progress = Progress(out)
        resumed = resume(out, job)
        self.state, self.done, self.history, self.server_state = resumed or (
            initial_state(job, init, init_partial),
            0,
            [],
            {},
        )
        self.tasks = [j.task for j in task_jobs(job)]
        self.shared_keys = shared_names(build_job_model(job), job)
        self.expected = [  # what a site of each task sends: the encoder's shared part and its task's head if shared
            {n: self.state[n].shape for n in self.shared_keys if task_of(n) in (None, i)}
            for i in range(len(self.tasks))
        ]
        self.frozen = {k: v for k, v in self.state.items() if k not in self.shared_keys}  # never changes in a run
        self.progress(
            "start", rounds=settings.rounds, resumed_after=self.done, job_hash=job_hash(job), strategy=strategy.name
        )

    def rounds_left(self) -> range:
        return range(self.done + 1, self.settings.rounds + 1)

    def shared(self) -> dict[str, torch.Tensor]:
        """The global values of the shared parameters: what every asked site receives."""
        return {k: self.state[k] for k in self.shared_keys}

    def check_connected(self, connected: int) -> None:
        """Raises: QuorumError: fewer than `min_sites` sites connected."""
        if connected < self.settings.min_sites:
            reason = f"{connected} site(s) connected, min_sites is {self.settings.min_sites}"
            self.progress("failed", reason=reason)
            raise QuorumError(f"{reason} (waited {self.settings.wait_for_sites:.0f} s)")

    def plan(self, number: int, connected: list[int]) -> Round:
        """Round `number`: a `participation` share of the `connected` sites, drawn from (seed, round) so that a
        resumed run asks the same sites."""
        s = self.settings
        nodes = choose_sites(connected, s.participation, s.min_sites, self.job.seed, number)
        self.progress(
            "round_start", round=number, sites=len(nodes), connected=len(connected), asked=[str(n) for n in nodes]
        )
        return Round(number, nodes, down=dict.fromkeys(nodes, 0))

    def refused(self, current: Round, node: int, code: int, reason: str) -> None:
        """A site answered with an error (it refused the job or failed)."""
        self.progress(
            "refused",
            round=current.number,
            node=str(node),
            code=code,
            reason=reason,
            bytes_sent=current.down.get(node, 0),
        )

    def receive(
        self, current: Round, node: int, site: str, sent: dict[str, torch.Tensor], metrics: dict[str, float]
    ) -> str:
        """Check a site's reply and keep it for the round's aggregate; returns why it is rejected ("" when kept)."""
        current.received += nbytes(sent)
        row = {
            "site": site,
            **metrics,
            "seconds": current.seconds(),
            "bytes_sent": current.down.get(node, 0),
            "bytes_received": nbytes(sent),
        }
        shared, problem = check_reply(sent, self.state, self.expected, metrics, self.job.transport)
        if problem:
            self.progress(
                "rejected",
                sent=sent,
                round=current.number,
                site=site,
                reason=problem,
                bytes_sent=row["bytes_sent"],
                bytes_received=row["bytes_received"],
            )
            return problem
        task = self.tasks[int(metrics["task_index"]) if self.job.tasks else 0]  # what the site ran, for the tables
        row.update(task=task, metric=get_task(task).main_metric)
        current.updates.append((shared, int(metrics["num-examples"])))
        current.sites.append(row)
        self.progress("reply", sent=sent, round=current.number, **row)
        return ""

    def close(self, current: Round) -> Path:
        """Screen, check the quorum, aggregate, checkpoint; returns the round's checkpoint.

        Raises:
            QuorumError: fewer than `min_sites` valid replies.
        """
        s, number = self.settings, current.number
        far = outlier_reasons(self.state, current.updates, s.max_norm_ratio)
        for row, reason in zip(current.sites, far):
            if reason:
                self.progress(
                    "rejected",
                    round=number,
                    site=row["site"],
                    reason=reason,
                    bytes_sent=row["bytes_sent"],
                    bytes_received=row["bytes_received"],
                )
        updates = [u for u, r in zip(current.updates, far) if not r]
        sites = [row for row, r in zip(current.sites, far) if not r]
        if len(updates) < s.min_sites:
            self.progress("failed", round=number, reason=f"{len(updates)} valid replies, min_sites is {s.min_sites}")
            raise QuorumError(f"round {number}: {len(updates)} valid replies; min_sites is {s.min_sites}")
        self.state, self.server_state = aggregate(self.state, updates, self.job, self.strategy, self.server_state)
        self.history.append(
            {
                "round": number,
                "seconds": current.seconds(),
                "sites": sorted(sites, key=lambda r: r["site"]),
                "bytes_to_sites": sum(current.down.values()),
                "bytes_from_sites": current.received,
            }
        )
        metrics = {"sites": len(sites), "privacy": privacy_spent(self.history)}
        path = save_round(
            self.out, self.job, self.state, number, metrics, self.history, self.server_state, s.keep_checkpoints
        )
        best = save_best(self.out, self.job, self.history)
        write_json_lines(self.out / "metrics.jsonl", self.history)
        self.done = number
        self.progress("round_end", **self.history[-1], checkpoint=str(path), **({"best": number - 1} if best else {}))
        return path

    def finish(self) -> Path:
        """The run report (`report.md`, curves); the run is done."""
        report = write_federation_report(self.out, shared_encoder=bool(self.job.tasks))
        self.progress("done", rounds=self.settings.rounds, report=str(report))
        return report
