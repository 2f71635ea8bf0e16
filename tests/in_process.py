"""A federation in one process for tests: the ServerApp's round loop and the real ClientApp `train`, with
Flower's network replaced by direct calls (the real runtime has its own test, test_deployment.py)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import uuid
from collections.abc import Callable
from pathlib import Path

import yaml
from conftest import TINY_ENCODER
from flwr.app import ArrayRecord, Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode

from echocare_client.client_app import train
from echocare_client.config import SiteConfig
from echocare_core.config import from_dict, load_config, to_dict
from echocare_core.engine.training import LocalTraining
from echocare_core.federation.job import Job
from echocare_core.federation.transport import decode, encode
from echocare_core.models.swin import EncoderConfig
from echocare_server.config import FederationConfig

TINY_JOB = Job(  # the federation tests' job: the tiny encoder with LoRA, one step per round
    task="segmentation",
    labels=(0, 1),
    encoder=EncoderConfig(**TINY_ENCODER),
    feature_size=8,
    local_steps=1,
    train=LocalTraining(mode="lora", lora_rank=2, batch_size=8),
)


def federation_config(out, job: dict | None = None, strategy: dict | None = None, **rounds) -> FederationConfig:
    """federation.yaml of an in-process test run of `TINY_JOB` (its keys replaced by `job`), 2 rounds by default."""
    return from_dict(
        FederationConfig,
        {
            "output": str(out),
            "server": {"insecure": True},
            "strategy": strategy or {},
            "rounds": {"rounds": 2, "min_sites": 2, "wait_for_sites": 2, "deadline": 600, **rounds},
            "job": {**to_dict(TINY_JOB), **(job or {})},
        },
        "federation",
    )


class InProcessGrid:
    """Flower's Grid for a test: each pulled message is answered at once by the ClientApp's `train`
    with that site's node config; `silent` sites never answer; `crash_in_round` raises in that round;
    `tamper[node](trained, global_state)` replaces the weights that site trained (before its transport); `restarting` sites answer their first
    message as Flower does for a SuperNode that missed its heartbeats (NODE_UNAVAILABLE), then come back."""

    def __init__(
        self,
        sites: dict[int, dict],
        silent: tuple[int, ...] = (),
        crash_in_round: int = 0,
        tamper: dict[int, Callable[[dict, dict], dict]] | None = None,
        restarting: tuple[int, ...] = (),
    ) -> None:
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
                    reply.content["arrays"] = ArrayRecord(
                        encode(self.tamper[node](sent, self.state), self.state, transport)
                    )
                replies.append(reply)
        self.replies += replies
        return replies


def node_config(name: str, folder, state, **settings) -> dict:
    """The node config `echocare-client` would write for a site, without a worker (the round runs in the
    ClientApp): the path of its site.yaml, state in `state/name`."""
    return site_node(
        SiteConfig(
            name=name,
            data=str(folder),
            insecure=True,
            device="cpu",
            num_workers=0,
            state_dir=str(Path(state) / name),
            **settings,
        )
    )


def site_node(site: SiteConfig) -> dict:
    """A node config naming `site`, written to a file of its own beside its dataset (its state folder may be a
    full disk)."""
    text = yaml.safe_dump(to_dict(site))
    path = Path(site.data).parent / f"site_{site.name}_{hashlib.sha256(text.encode()).hexdigest()[:12]}.yaml"
    path.write_text(text, encoding="utf-8")
    return {"site-config": str(path)}


def site_of(node: dict) -> SiteConfig:
    return load_config(SiteConfig, node["site-config"], [])


def with_site(node: dict, **changes) -> dict:
    """The node config of the same site with some settings changed (e.g. another state_dir)."""
    return site_node(dataclasses.replace(site_of(node), **changes))
