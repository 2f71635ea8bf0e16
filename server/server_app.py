"""The Flower ServerApp: message plumbing around `echocare_core.federation.coordinator.Coordinator`.

Flower's `Strategy.start` waits without a deadline for nodes and has no resume, so the loop is ours: the
coordinator plans each round; this module sends the job and the global values of the shared parameters to the
chosen sites (the frozen rest of the model only to sites that do not hold it yet, see
`echocare_core.federation.transport`), waits up to the deadline (polling every half second instead of Flower's
fixed 3 s, asking again a site that came back online or lacks the frozen part) and hands each reply to the
coordinator, which checks, aggregates, checkpoints and logs. Started again on the same output folder it
resumes after the last checkpointed round.
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
from echocare_core.federation.transport import NEED_FROZEN, digest

app = ServerApp()

POLL_S = 0.5


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


def run_rounds(grid: Grid, cfg: Any) -> None:
    """The federated run of `cfg` (a FederationConfig): the `Coordinator`'s rounds over Flower's messages.

    Raises:
        QuorumError: too few sites connected or replied; the run ends as failed.
    """
    from echocare_core.federation.coordinator import Coordinator, nbytes

    settings = cfg.rounds
    coordinator = Coordinator(Path(cfg.output), cfg.job, settings, cfg.strategy, cfg.init, cfg.init_partial)
    nodes = wait_for_sites(grid, max(settings.expected_sites, settings.min_sites), settings.wait_for_sites)
    coordinator.check_connected(len(nodes))
    job_json, frozen = cfg.job.to_json(), coordinator.frozen
    frozen_record, frozen_digest = ArrayRecord(frozen), digest({k: v.numpy() for k, v in frozen.items()})
    frozen_bytes, shared_bytes = nbytes(frozen), nbytes(coordinator.shared())  # tensor bytes
    holding: set[int] = set()  # sites that have the frozen part (they replied to a round of this run)
    for rnd in coordinator.rounds_left():
        current = coordinator.plan(rnd, wait_for_sites(grid, settings.min_sites, settings.wait_for_sites))
        arrays = ArrayRecord(coordinator.shared())
        config = ConfigRecord(
            {"round": rnd, "rounds": settings.rounds, "job": job_json, "toolkit": __version__, "frozen": frozen_digest}
        )
        lacking = set(current.nodes) - holding

        def message(node: int) -> Message:  # also a message asked again: it expires with the round
            # called only within this round (send_and_receive below), so it reads this round's values
            frozen = {"frozen": frozen_record} if node in lacking else {}  # noqa: B023
            current.down[node] += shared_bytes + (frozen_bytes if frozen else 0)  # noqa: B023
            return Message(
                RecordDict({"arrays": arrays, "config": config, **frozen}),  # noqa: B023
                dst_node_id=node,
                message_type=MessageType.TRAIN,
                group_id=str(rnd),  # noqa: B023
                ttl=max(1.0, settings.deadline - (time.time() - current.started)),  # noqa: B023
            )

        for node, reply in send_and_receive(grid, current.nodes, message, lacking, settings.deadline):
            if not reply.has_error() or reply.error.code != ErrorCode.NODE_UNAVAILABLE:
                holding.add(node)  # it answered with the frozen part in hand (or will say NEED_FROZEN)
            if reply.has_error():
                coordinator.refused(current, node, reply.error.code, reply.error.reason)
                continue
            metrics = {k: float(v) for k, v in reply.content["metrics"].items()}
            coordinator.receive(
                current,
                node,
                str(reply.content["site"]["name"]),
                reply.content["arrays"].to_torch_state_dict(),
                metrics,
            )
        coordinator.close(current)
    coordinator.finish()


@app.main()
def main(grid: Grid, context: Context) -> None:
    from echocare_core.config import from_dict
    from echocare_server.config import FederationConfig

    run_rounds(grid, from_dict(FederationConfig, json.loads(str(context.run_config["federation"])), "federation"))
