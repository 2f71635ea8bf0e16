"""A federation in one process for tests: the ServerApp's round loop and the real ClientApp `train`, with
Flower's network replaced by direct calls (the real runtime has its own test, test_deployment.py)."""

from __future__ import annotations

import json
import uuid
from typing import Callable

from flwr.app import ArrayRecord, Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode

from echocare_client.client_app import train
from echocare_core.federation.transport import decode, encode


class InProcessGrid:
    """Flower's Grid for a test: each pulled message is answered at once by the ClientApp's `train`
    with that site's node config; `silent` sites never answer; `crash_in_round` raises in that round;
    `tamper[node](trained, global_state)` replaces the weights that site trained (before its transport); `restarting` sites answer their first
    message as Flower does for a SuperNode that missed its heartbeats (NODE_UNAVAILABLE), then come back."""

    def __init__(self, sites: dict[int, dict], silent: tuple[int, ...] = (), crash_in_round: int = 0,
                 tamper: dict[int, Callable[[dict, dict], dict]] | None = None,
                 restarting: tuple[int, ...] = ()) -> None:
        self.sites, self.silent, self.crash_in_round, self.tamper = sites, silent, crash_in_round, tamper or {}
        self.restarting = set(restarting)
        self.state: dict = {}  # the global model of the round being asked
        self.replies: list = []  # everything the sites sent, as it crossed their boundary
        self.pending: dict[str, object] = {}
        self.asked: list[tuple[int, int]] = []  # (round, node)

    def get_node_ids(self) -> list[int]:
        return list(self.sites)

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())  # as Flower's in-memory grid does
            self.pending[msg.metadata.message_id] = msg
            self.asked.append((int(msg.content["config"]["round"]), msg.metadata.dst_node_id))
            self.state = msg.content["arrays"].to_torch_state_dict()
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        replies = []
        for mid in message_ids:
            msg = self.pending[mid]
            node = msg.metadata.dst_node_id
            if int(msg.content["config"]["round"]) == self.crash_in_round:
                raise RuntimeError("the server was killed")
            if node in self.restarting:
                self.restarting.discard(node)
                replies.append(Message(Error(ErrorCode.NODE_UNAVAILABLE, "missed its heartbeats"), reply_to=msg))
            elif node not in self.silent:
                reply = train(msg, Context(1, node, self.sites[node], RecordDict(), {}))
                if node in self.tamper and not reply.has_error():  # a hostile or broken site changes its weights
                    transport = json.loads(str(msg.content["config"]["job"])).get("transport", "bf16")
                    sent = decode(reply.content["arrays"].to_torch_state_dict(), self.state, transport)
                    reply.content["arrays"] = ArrayRecord(encode(self.tamper[node](sent, self.state), self.state,
                                                                 transport))
                replies.append(reply)
        self.replies += replies
        return replies


def node_config(name: str, folder, state) -> dict:
    """The node config `echocare-client` would write for a site (no worker: the round runs in the ClientApp)."""
    return {"site-name": name, "data-folder": str(folder), "state-dir": str(state / name), "device": "cpu",
            "max-batch-size": 64, "max-local-epochs": 10, "privacy-required": False, "privacy-budget": 0.0,
            "privacy-delta": 1e-5}
