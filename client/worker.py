"""The site worker: a long-lived thread of `echocare-client` that keeps torch, MONAI and the toolkit loaded and
runs each round the ClientApp hands it.

Flower starts a fresh ClientApp process for every message, and importing the training stack costs about
8 s and 1 GB each time. So the ClientApp stays light (flwr and numpy): it writes the received weights to
the site's state folder and asks the worker over a Unix socket in a private folder (mode 0700) whose path
the node config carries; the worker trains and writes what may leave the site, which the ClientApp sends.
Without a worker (a SuperNode started by hand) the ClientApp runs the same `run_request` itself. Both read
the site's settings as one `SiteConfig` (the resolved site.yaml that the node config names).
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from echocare_client.config import SiteConfig

__all__ = ["SiteWorker", "ask_worker", "base_frozen", "failure_reason", "handle", "not_approved", "run_request"]

log = logging.getLogger(__name__)


def failure_reason(exc: BaseException) -> str:
    """What the coordinator learns about a round that failed at the site: the kind of failure, never the
    exception's message (it can name files or carry values); the site's log has the details."""
    if (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or os.strerror(errno.ENOSPC) in str(exc):
        return "the site's disk is full"  # the second test: safetensors' own error type
    if type(exc).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError, without importing torch here
        return "the site's GPU ran out of memory (a smaller job batch_size or site max_batch_size helps)"
    if isinstance(exc, MemoryError) or "can't allocate memory" in str(exc):  # the second: torch's CPU allocator
        return "the site ran out of memory"
    return f"the round failed at the site ({type(exc).__name__}; see the site's log)"


def handle(site: SiteConfig, request: dict[str, Any]) -> dict[str, Any]:
    """A ClientApp request: a round (`run_request`), or the frozen part of a model from base weights."""
    return base_frozen(site, request) if "base_frozen" in request else run_request(site, request)


def base_frozen(site: SiteConfig, request: dict[str, Any]) -> dict[str, Any]:
    """The frozen part of the job's model built from the site's own copy of the weights it starts from (site.yaml
    `base_weights`): {"frozen": a file in the state folder's inbox} when the job names that file's SHA-256 as its
    base and what comes out has the digest the coordinator named (`request["base_frozen"]`), else {} (the
    coordinator then sends the frozen part)."""
    from safetensors.numpy import save_file

    from echocare_core.federation.job import Job
    from echocare_core.federation.site import frozen_part
    from echocare_core.federation.transport import digest
    from echocare_core.weights import weights_digest

    file, name = site.base_weights, str(request["base_frozen"])
    try:
        job = Job.from_json(str(request["job"]))
        if not file or not job.base or weights_digest(file) != job.base:
            return {}
        arrays = {k: v.numpy() for k, v in frozen_part(job, file).items()}
    except (ValueError, OSError) as exc:  # names files: the site's log only
        log.warning("the frozen part could not be built from base_weights %s: %s", file, exc)
        return {}
    if digest(arrays) != name:
        log.info("base_weights %s are the job's base, but the frozen part differs: the coordinator sends it", file)
        return {}
    log.info("the frozen part of the model comes from base_weights %s, not over the network", file)
    out = Path(site.state_dir) / "inbox" / f"base_{name[:16]}.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(arrays, str(out))
    return {"frozen": str(out)}


def run_request(site: SiteConfig, request: dict[str, Any]) -> dict[str, Any]:
    """One round at this site (`_round`), recorded in the site's audit log (`state_dir/audit.jsonl`): the job
    hash, and what was sent (names, shapes, bytes, epsilon) or why nothing was. A round that raises is
    answered {"failed": `failure_reason`}, the details logged at the site. Asked again for a round it
    answered, with the same job and global model (`request["global"]`, a digest), the site sends the same
    answer again instead of training (and spending privacy budget) twice.

    Raises:
        OSError: the audit log cannot be written (e.g. the disk is full).
    """
    from echocare_core.engine.finetune import write_json
    from echocare_core.federation.audit import AuditLog
    from echocare_core.federation.transport import text_hash

    job = text_hash(str(request["job"]))  # = job_hash of the job the server sent
    state_dir, rnd = Path(site.state_dir), int(request["round"])
    done = state_dir / "sent" / f"round_{rnd:04d}.json"  # this round's answer, for a server that asks again
    key = {"job": job, "global": request.get("global", "")}
    event = "trained"
    try:
        refusal = not_approved(site, request, job)
        earlier = json.loads(done.read_text(encoding="utf-8")) if done.is_file() and not refusal else {}
        if earlier.get("key") == key and Path(earlier["answer"]["shared"]).is_file():
            answer, event = earlier["answer"], "resent"  # same job, round and global model: trained already
        else:
            answer = {"refused": refusal} if refusal else _round(site, request)
            if "shared" in answer:
                write_json(done, {"key": key, "answer": answer})
    except Exception as exc:  # noqa: BLE001 - the site's log gets the details, the server the kind
        log.exception("site %s: the round failed", site.name)
        answer = {"failed": failure_reason(exc)}
    record = {"round": rnd, "job_hash": job}
    if "shared" in answer:
        metrics = answer["metrics"]
        record.update(
            samples=answer["samples"],
            sent=answer["sent"],
            **{k: metrics[k] for k in ("epsilon", "delta") if k in metrics},
        )
    AuditLog(state_dir / "audit.jsonl")(
        event if "shared" in answer else "refused" if "refused" in answer else "failed",
        **record,
        **{k: answer[k] for k in ("refused", "failed") if k in answer},
    )
    return answer


def not_approved(site: SiteConfig, request: dict[str, Any], job: str) -> str:
    """Why the site's own approvals refuse this request ("" when they do not): the coordinator's toolkit version
    and, when the site pinned them, the job's hash."""
    from echocare_core import __version__

    versions = list(site.server_versions) or [__version__]
    if request.get("toolkit") not in versions:
        return f"the coordinator runs echocare {request.get('toolkit')}; this site accepts {', '.join(versions)}"
    if site.approved_jobs and job not in site.approved_jobs:
        return f"job {job[:12]} is not among the site's approved_jobs"
    return ""


def _round(site: SiteConfig, request: dict[str, Any]) -> dict[str, Any]:
    """One round at this site.

    Args:
        request: {"round": N, "rounds": the rounds the job plans, "job": job JSON, "arrays": safetensors file
            of the global shared parameters, "frozen": safetensors file of the rest of the global model}.

    Returns:
        {"shared": file of what leaves the site (in the job's transport), "sent": its names, shapes and bytes,
        "samples": N,
        "metrics": {...}} or {"refused": reason}
        (a worker answers {"failed": reason} when the round raised); reasons name job keys and declared
        labels, never paths or sample data.
    """
    import torch
    from safetensors.torch import load_file, save_file

    from echocare_core.engine.training import DatasetInvalidError
    from echocare_core.federation.audit import manifest
    from echocare_core.federation.job import Job, job_hash
    from echocare_core.federation.site import JobRefused, local_layers_file, site_round
    from echocare_core.federation.transport import encode
    from echocare_core.files import write_atomic

    state_dir, rnd = Path(site.state_dir), int(request["round"])
    device = site.device if site.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    try:
        job = Job.from_json(str(request["job"]))
        global_state = {
            **(load_file(request["frozen"]) if request.get("frozen") else {}),
            **load_file(request["arrays"]),
        }
        result = site_round(
            job,
            global_state,
            Path(site.data),
            rnd,
            site.limits,
            device,
            local_layers_file(state_dir, job_hash(job)),
            num_workers=site.num_workers,
            privacy=site.privacy,
            ledger_dir=state_dir / "privacy",
            rounds=int(request.get("rounds", rnd)),
            split_seed=site.split_seed,
        )
    except JobRefused as exc:
        return {"refused": str(exc)}
    except DatasetInvalidError:
        return {"refused": "the site's dataset fails its check (see echocare-data verify at the site)"}
    except ValueError as exc:  # a job this toolkit version cannot read or build; details stay in the site's log
        log.warning("site %s cannot run the job: %s", site.name, exc)
        return {"refused": f"unreadable job ({type(exc).__name__})"}
    encoded = encode(result.shared, global_state, job.transport)  # deltas in 16 bits, or fp32 weights
    sent = state_dir / "sent" / f"round_{rnd:04d}.safetensors"  # the site's copy of everything that left it
    sent.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(
        sent,
        lambda tmp: save_file(
            encoded, str(tmp), metadata={"num-examples": str(result.samples), "transport": job.transport}
        ),
    )
    metrics = {"compute_s": time.perf_counter() - t0, **{k: v for k, v in result.metrics.items() if math.isfinite(v)}}
    return {"shared": str(sent), "sent": manifest(encoded), "samples": result.samples, "metrics": metrics}


def ask_worker(path: str, request: dict[str, Any]) -> dict[str, Any]:
    """Send `request` to the worker listening on `path` and wait for its answer (as long as the round takes).

    Raises:
        OSError: no worker listens there, or it stopped before answering.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(path)
        conn.sendall(json.dumps(request).encode() + b"\n")
        line = conn.makefile("rb").readline()
    if not line:
        raise ConnectionError("the site worker stopped before answering")
    return json.loads(line)


class SiteWorker(threading.Thread):
    """Answers the ClientApp's requests one at a time with `run_request`, on a socket only this user can reach."""

    def __init__(self, site: SiteConfig) -> None:
        super().__init__(daemon=True, name="echocare-site-worker")
        self.site = site
        self.folder = Path(tempfile.mkdtemp(prefix="echocare-site-"))  # mode 0700; short enough for AF_UNIX
        self.socket_path = str(self.folder / "worker.sock")
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(self.socket_path)
        self.server.listen()

    def run(self) -> None:
        import echocare_core.federation.site  # noqa: F401 - pay the imports once, before the first round

        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:  # closed
                return
            with conn:
                try:
                    request = json.loads(conn.makefile("rb").readline())
                    answer = handle(self.site, request)
                except Exception as exc:  # noqa: BLE001 - a broken request or the audit log not writable
                    log.exception("site %s: the round failed", self.site.name)
                    answer = {"failed": failure_reason(exc)}
                try:
                    conn.sendall(json.dumps(answer).encode() + b"\n")
                except OSError:
                    log.warning("the ClientApp left before the answer")

    def close(self) -> None:
        self.server.close()
        shutil.rmtree(self.folder, ignore_errors=True)
