"""The Flower ServerApp: our own round loop around `echocare_core.federation` (deadline, quorum, checkpoint, resume).

Flower's `Strategy.start` waits without a deadline for nodes and has no resume, so the loop is ours:
each round sends the job and the global values of the shared parameters to the chosen sites (the frozen
rest of the model only to sites that do not hold it yet, see `echocare_core.federation.transport`),
waits up to the deadline (polling every half second instead of Flower's fixed 3 s), decodes and checks
the replies (deltas in the job's transport, added to the global model in fp32), needs at least
`min_sites` valid ones, aggregates (sample-weighted), checkpoints and logs. Started again on the same
output folder it resumes after the last checkpointed round. Events go to `progress.jsonl`, which
`echocare-server` shows as a live table.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp

from echocare_core import __version__
from echocare_core.federation.audit import AuditLog, manifest
from echocare_core.federation.transport import NEED_FROZEN, decode, digest

app = ServerApp()

POLL_S = 0.5


class Progress:
    """Append one JSON line per event to `progress.jsonl` (read by `echocare-server`) and, fsynced, to the
    coordinator's audit log `audit.jsonl` (which also gets the names, shapes and bytes each site sent)."""

    def __init__(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.path, self.audit = out / "progress.jsonl", AuditLog(out / "audit.jsonl")

    def __call__(self, event: str, sent: dict | None = None, **fields: Any) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"time": round(time.time(), 3), "event": event, **fields}) + "\n")
        self.audit(event, **fields, **({"sent": manifest(sent)} if sent is not None else {}))


def send_and_receive(
    grid: Grid, nodes: list[int], message: Callable[[int], Message], lacking: set[int], timeout: float
) -> Iterator[tuple[int, Message]]:
    """Send `message(node)` to each node and yield (node, reply) as each reply arrives, until all came back or
    `timeout` seconds passed.

    Flower answers NODE_UNAVAILABLE for a node that missed its heartbeats, e.g. a SuperNode that restarted
    (or one the SuperLink still counted as online from before its own restart). Such a node is asked again
    as soon as it is back online; the error is yielded only if it is still offline at the timeout. A site
    that answers NEED_FROZEN is added to `lacking` (which `message` reads) and asked again at once.
    """
    end = time.monotonic() + timeout
    pending: dict[str, int] = {}
    offline: dict[int, Message] = {}  # node -> its last NODE_UNAVAILABLE answer
    todo = list(nodes)
    while (todo or pending or offline) and time.monotonic() < end:
        if todo:
            pending.update(
                (mid, node) for mid, node in zip(grid.push_messages([message(n) for n in todo]), todo) if mid
            )
            todo = []
        for reply in grid.pull_messages(list(pending)):
            node = pending.pop(reply.metadata.reply_to_message_id)
            code = reply.error.code if reply.has_error() else None
            if code == ErrorCode.NODE_UNAVAILABLE:
                offline[node] = reply
            elif code == NEED_FROZEN and node not in lacking:
                lacking.add(node)
                todo.append(node)
            else:
                yield node, reply
        if offline:
            back = [n for n in grid.get_node_ids() if n in offline]
            for node in back:
                del offline[node]
            todo += back
        if todo or pending or offline:
            time.sleep(POLL_S if not todo else 0)
    yield from offline.items()


def wait_for_sites(grid: Grid, needed: int, timeout: float) -> list[int]:
    end = time.monotonic() + timeout
    while len(nodes := list(grid.get_node_ids())) < needed and time.monotonic() < end:
        time.sleep(POLL_S)
    return nodes


def _nbytes(state: dict) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def _received(
    sent: dict, state: dict, expected: dict, metrics: dict[str, float], transport: str, tasks: int
) -> tuple[dict, str]:
    """A reply's trained shared parameters (fp32, from its deltas or weights) and why they cannot be aggregated
    ("" when they can): other parameters or shapes, another dtype than the transport's, non-finite values, no
    samples, no task of the job's `tasks` (multi-task; 0: single-task)."""
    if {n: t.shape for n, t in sent.items()} != expected:
        return {}, "its parameters differ from the job's shared parameters (names or shapes)"
    if tasks and metrics.get("task_index") not in range(tasks):
        return {}, f"it names no task of the job (task_index must be 0-{tasks - 1})"
    try:
        shared = decode(sent, state, transport)
    except ValueError as exc:
        return {}, str(exc)
    if not all(bool(t.isfinite().all()) for t in shared.values()):
        return {}, "non-finite values"
    return shared, "" if metrics.get("num-examples", 0) >= 1 else "no training samples"


def run_rounds(grid: Grid, cfg: Any) -> None:
    """The federated run of `cfg` (a FederationConfig).

    Raises:
        RuntimeError: too few sites connected or replied; the run ends as failed.
    """
    from echocare_core.engine.finetune import write_json_lines
    from echocare_core.engine.metrics import MAIN_METRIC
    from echocare_core.engine.run_report import privacy_spent, write_federation_report
    from echocare_core.federation.job import job_hash, shared_names, task_jobs
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

    out, job, settings = Path(cfg.output), cfg.job, cfg.rounds
    progress = Progress(out)
    resumed = resume(out, job)
    state, done, history, server_state = resumed or (initial_state(job, cfg.init, cfg.init_partial), 0, [], {})
    tasks = [j.task for j in task_jobs(job)]
    for site in (s for r in history for s in r["sites"]):  # rounds of an earlier version name no task
        site.setdefault("task", tasks[0])
        site.setdefault("metric", MAIN_METRIC[tasks[0]])
    progress("start", rounds=settings.rounds, resumed_after=done, job_hash=job_hash(job), strategy=cfg.strategy.name)
    nodes = wait_for_sites(grid, max(settings.expected_sites, settings.min_sites), settings.wait_for_sites)
    if len(nodes) < settings.min_sites:
        progress("failed", reason=f"{len(nodes)} site(s) connected, min_sites is {settings.min_sites}")
        raise RuntimeError(
            f"{len(nodes)} site(s) connected in {settings.wait_for_sites:.0f} s; min_sites is {settings.min_sites}"
        )
    job_json = job.to_json()
    shared_keys = shared_names(build_job_model(job), job)
    expected = {n: state[n].shape for n in shared_keys}
    frozen = {k: v for k, v in state.items() if k not in expected}  # never changes during the run
    frozen_record, frozen_digest = ArrayRecord(frozen), digest({k: v.numpy() for k, v in frozen.items()})
    frozen_bytes, shared_bytes = _nbytes(frozen), _nbytes({k: state[k] for k in shared_keys})  # tensor bytes
    holding: set[int] = set()  # sites that have the frozen part (they replied to a round of this run)
    for rnd in range(done + 1, settings.rounds + 1):
        t0 = time.time()
        connected = wait_for_sites(grid, settings.min_sites, settings.wait_for_sites)
        nodes = choose_sites(connected, settings.participation, settings.min_sites, job.seed, rnd)
        arrays = ArrayRecord({k: state[k] for k in shared_keys})
        config = ConfigRecord(
            {"round": rnd, "rounds": settings.rounds, "job": job_json, "toolkit": __version__, "frozen": frozen_digest}
        )
        lacking, down = set(nodes) - holding, dict.fromkeys(nodes, 0)

        def message(node: int) -> Message:  # also a message asked again: it expires with the round
            # called only within this round (send_and_receive below), so it reads this round's values
            frozen = {"frozen": frozen_record} if node in lacking else {}  # noqa: B023
            down[node] += shared_bytes + (frozen_bytes if frozen else 0)  # noqa: B023
            return Message(
                RecordDict({"arrays": arrays, "config": config, **frozen}),  # noqa: B023
                dst_node_id=node,
                message_type=MessageType.TRAIN,
                group_id=str(rnd),  # noqa: B023
                ttl=max(1.0, settings.deadline - (time.time() - t0)),  # noqa: B023
            )

        progress("round_start", round=rnd, sites=len(nodes), connected=len(connected), asked=[str(n) for n in nodes])
        updates, sites, received = [], [], 0
        for node, reply in send_and_receive(grid, nodes, message, lacking, settings.deadline):
            if not reply.has_error() or reply.error.code != ErrorCode.NODE_UNAVAILABLE:
                holding.add(node)  # it answered with the frozen part in hand (or will say NEED_FROZEN)
            if reply.has_error():
                progress(
                    "refused",
                    round=rnd,
                    node=str(node),
                    code=reply.error.code,
                    reason=reply.error.reason,
                    bytes_sent=down[node],
                )
                continue
            sent = reply.content["arrays"].to_torch_state_dict()
            received += _nbytes(sent)
            metrics = {k: float(v) for k, v in reply.content["metrics"].items()}
            site = {
                "site": str(reply.content["site"]["name"]),
                **metrics,
                "seconds": round(time.time() - t0, 2),
                "bytes_sent": down[node],
                "bytes_received": _nbytes(sent),
            }
            shared, problem = _received(sent, state, expected, metrics, job.transport, len(job.tasks))
            if problem:
                progress(
                    "rejected",
                    sent=sent,
                    round=rnd,
                    site=site["site"],
                    reason=problem,
                    bytes_sent=site["bytes_sent"],
                    bytes_received=site["bytes_received"],
                )
                continue
            task = tasks[int(metrics["task_index"]) if job.tasks else 0]  # what the site ran, for the tables
            site.update(task=task, metric=MAIN_METRIC[task])
            updates.append((shared, int(metrics["num-examples"])))
            sites.append(site)
            progress("reply", sent=sent, round=rnd, **site)
        far = outlier_reasons(state, updates, settings.max_norm_ratio)
        for site, reason in zip(sites, far):
            if reason:
                progress(
                    "rejected",
                    round=rnd,
                    site=site["site"],
                    reason=reason,
                    bytes_sent=site["bytes_sent"],
                    bytes_received=site["bytes_received"],
                )
        updates, sites = [u for u, r in zip(updates, far) if not r], [s for s, r in zip(sites, far) if not r]
        if len(updates) < settings.min_sites:
            progress("failed", round=rnd, reason=f"{len(updates)} valid replies, min_sites is {settings.min_sites}")
            raise RuntimeError(f"round {rnd}: {len(updates)} valid replies; min_sites is {settings.min_sites}")
        state, server_state = aggregate(state, updates, cfg.strategy, server_state)
        history.append(
            {
                "round": rnd,
                "seconds": round(time.time() - t0, 2),
                "sites": sorted(sites, key=lambda s: s["site"]),
                "bytes_to_sites": sum(down.values()),
                "bytes_from_sites": received,
            }
        )  # all asked
        path = save_round(
            out,
            job,
            state,
            rnd,
            {"sites": len(sites), "privacy": privacy_spent(history)},
            history,
            server_state,
            settings.keep_checkpoints,
        )
        best = save_best(out, job, history)
        write_json_lines(out / "metrics.jsonl", history)
        progress("round_end", **history[-1], checkpoint=str(path), **({"best": rnd - 1} if best else {}))
    report = write_federation_report(out, shared_encoder=bool(job.tasks))
    progress("done", rounds=settings.rounds, report=str(report))


@app.main()
def main(grid: Grid, context: Context) -> None:
    from echocare_core.config import from_dict
    from echocare_server.config import FederationConfig

    run_rounds(grid, from_dict(FederationConfig, json.loads(str(context.run_config["federation"])), "federation"))
