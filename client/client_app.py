"""The Flower ClientApp a site's SuperNode runs for each round: hand the round to the site, return the shared weights.

Flower starts a fresh process for every message, so this module imports only flwr and numpy: it writes the
received weights to the site's state folder, lets the site worker of `echocare-client` (which keeps torch and
the model code loaded) check the job and train, and sends back the file the worker wrote, which stays at the
site as its copy of everything that left it (`STATE/sent/round_N.safetensors`). Without a worker the round
runs in this process. A refusal is an error reply whose reason names job keys and declared labels, never
paths or sample data.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from safetensors.numpy import load_file, save_file

from echocare_client.config import SiteConfig
from echocare_client.worker import ask_worker, failure_reason, handle, not_approved
from echocare_core.config import load_config
from echocare_core.federation.audit import AuditLog
from echocare_core.federation.transport import FAILED, NEED_FROZEN, REFUSED, digest, text_hash
from echocare_core.files import write_atomic

app = ClientApp()
log = logging.getLogger(__name__)

DIGEST = re.compile(r"[0-9a-f]{64}")  # how the coordinator names the frozen part (SHA-256, hex)
KEEP_FROZEN = 3  # frozen parts kept at the site (other jobs or federations it takes part in)


def _error(msg: Message, site: str, code: int, reason: str) -> Message:
    what = "refused the job" if code == REFUSED else "failed"
    log.warning("site %s %s: %s", site, what, reason)
    return Message(Error(code=code, reason=f"site {site} {what}: {reason}"), reply_to=msg)


def _run(node: dict, site: SiteConfig, request: dict) -> dict:
    """The worker's answer, or the round run here when no worker listens."""
    if node.get("worker-socket"):
        try:
            return ask_worker(str(node["worker-socket"]), request)
        except FileNotFoundError:
            log.warning("no site worker at its socket; running the round in the ClientApp process")
        except OSError as exc:
            return {"failed": f"the site worker stopped ({type(exc).__name__})"}
    return handle(site, request)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """The round's reply: the shared weights and metrics, or an error whose reason is ours (Flower would send
    the text of any exception that escaped)."""
    node, name = dict(context.node_config), "?"
    try:
        site = load_config(SiteConfig, str(node["site-config"]), [])  # the resolved site.yaml echocare-client wrote
        name = site.name
        return _train(msg, node, site)
    except Exception as exc:  # noqa: BLE001 - details in the site's log only
        log.exception("site %s: the round failed in the ClientApp", name)
        return _error(msg, name, FAILED, failure_reason(exc))


def _train(msg: Message, node: dict, site: SiteConfig) -> Message:
    t0 = time.perf_counter()
    state_dir = Path(site.state_dir)
    config = msg.content["config"]
    rnd, job, frozen_digest = int(config["round"]), str(config["job"]), str(config.get("frozen", ""))
    request = {
        "round": rnd,
        "rounds": int(config.get("rounds", rnd)),
        "job": job,
        "toolkit": str(config.get("toolkit", "unknown")),
    }
    job_hash = text_hash(job)
    refusal = not_approved(site, request, job_hash)
    if refusal:  # before anything the coordinator sent is kept
        AuditLog(state_dir / "audit.jsonl")("refused", round=rnd, job_hash=job_hash, refused=refusal)
        return _error(msg, site.name, REFUSED, refusal)
    if not DIGEST.fullmatch(frozen_digest):
        return _error(msg, site.name, FAILED, "the frozen part of the model is not named by a digest")
    frozen = _frozen(msg, state_dir, frozen_digest) or _frozen_from_base(node, site, job, frozen_digest)
    if frozen is None:
        return _error(msg, site.name, NEED_FROZEN, "it does not hold the frozen part of the model")
    inbox = state_dir / "inbox" / f"round_{rnd:04d}_{msg.metadata.message_id[:16]}.safetensors"  # one per ask
    inbox.parent.mkdir(parents=True, exist_ok=True)
    try:
        arrays = {k: a.numpy() for k, a in msg.content["arrays"].items()}
        save_file(arrays, str(inbox))
        answer = _run(
            node,
            site,
            {**request, "arrays": str(inbox), "frozen": str(frozen), "global": f"{digest(arrays)}:{frozen_digest}"},
        )  # the whole global model
    finally:
        inbox.unlink(missing_ok=True)  # the global model, not the site's data: no reason to keep it
    if "failed" in answer and not frozen.is_file():  # evicted meanwhile by another job's round
        return _error(msg, site.name, NEED_FROZEN, "it does not hold the frozen part of the model")
    if "refused" in answer or "failed" in answer:
        return _error(
            msg, site.name, REFUSED if "refused" in answer else FAILED, answer.get("refused") or answer["failed"]
        )
    shared = ArrayRecord({k: Array(v) for k, v in load_file(answer["shared"]).items()})
    metrics = MetricRecord(
        {"num-examples": int(answer["samples"]), **answer["metrics"], "clientapp_s": time.perf_counter() - t0}
    )  # compute_s plus handing the weights over
    return Message(
        RecordDict({"arrays": shared, "metrics": metrics, "site": ConfigRecord({"name": site.name})}), reply_to=msg
    )


def _frozen(msg: Message, state_dir: Path, name: str) -> Path | None:
    """The site's copy of the model's frozen part named by its digest: saved from the message when it came
    along (the `KEEP_FROZEN` most recently used copies are kept), None when it did not and the site has none.

    Raises:
        ValueError: what came does not match its digest.
    """
    path = state_dir / "frozen" / f"{name}.safetensors"
    if "frozen" not in msg.content:
        if path.is_file():
            path.touch()  # recently used
            return path
        return None
    arrays = {k: a.numpy() for k, a in msg.content["frozen"].items()}
    if digest(arrays) != name:
        raise ValueError("the frozen part of the model does not match its digest")
    return _keep(state_dir, name, lambda tmp: save_file(arrays, str(tmp)))


def _frozen_from_base(node: dict, site: SiteConfig, job: str, name: str) -> Path | None:
    """The frozen part built by the site from its own copy of the job's base weights (`base_frozen`), or None."""
    if not site.base_weights or not json.loads(job).get("base"):
        return None
    answer = _run(node, site, {"base_frozen": name, "job": job})
    return (
        _keep(Path(site.state_dir), name, lambda tmp: os.replace(answer["frozen"], tmp)) if "frozen" in answer else None
    )


def _keep(state_dir: Path, name: str, fill: Callable[[Path], None]) -> Path:
    """Put a frozen part in place under its digest (`fill` writes it to a temporary file); keep the `KEEP_FROZEN`
    most recently used copies."""
    path = state_dir / "frozen" / f"{name}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, fill)  # its temporary file is one per ClientApp process
    copies = sorted(path.parent.glob("*.safetensors"), key=lambda f: f.stat().st_mtime, reverse=True)
    for old in copies[KEEP_FROZEN:]:
        old.unlink(missing_ok=True)
    return path
