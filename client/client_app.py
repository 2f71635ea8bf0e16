"""The Flower ClientApp a site's SuperNode runs for each round: check the job, train, return the shared weights.

Flower starts a fresh process for every message, so this module imports nothing heavy at the top
(a refusal costs a fraction of a second) and keeps what must last on the site's disk: site-local
layers and a copy of everything that left the site (`STATE/sent/round_N.safetensors`). A refusal is
an error reply whose reason names job keys and declared labels, never paths or sample data.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()
log = logging.getLogger(__name__)

REFUSED = 1001  # error code of a refused job (Flower's own codes are 0-8)


def _refuse(msg: Message, site: str, reason: str) -> Message:
    log.warning("site %s refused the job: %s", site, reason)
    return Message(Error(code=REFUSED, reason=f"site {site} refused the job: {reason}"), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    from safetensors.torch import save_file

    from echocare_core.engine.finetune import DatasetInvalidError
    from echocare_core.federation.job import Job, SiteLimits
    from echocare_core.federation.site import JobRefused, site_round

    node = context.node_config
    site, state_dir = str(node["site-name"]), Path(str(node["state-dir"]))
    limits = SiteLimits(int(node["max-batch-size"]), int(node["max-local-epochs"]))
    rnd = int(msg.content["config"]["round"])
    t0 = time.perf_counter()
    try:
        job = Job.from_json(str(msg.content["config"]["job"]))
        result = site_round(job, msg.content["arrays"].to_torch_state_dict(), Path(str(node["data-folder"])), rnd,
                            limits, str(node["device"]), state_dir / "local_layers.safetensors")
    except JobRefused as exc:
        return _refuse(msg, site, str(exc))
    except DatasetInvalidError:
        return _refuse(msg, site, "the site's dataset fails its check (see echocare-data verify at the site)")
    except ValueError as exc:  # a job this toolkit version cannot read or build; details stay in the site's log
        log.warning("site %s cannot run the job: %s", site, exc)
        return _refuse(msg, site, f"unreadable job ({type(exc).__name__})")
    sent = state_dir / "sent" / f"round_{rnd:04d}.safetensors"
    sent.parent.mkdir(parents=True, exist_ok=True)
    tmp = sent.with_name(f".{sent.name}.tmp")
    save_file({k: v.contiguous() for k, v in result.shared.items()}, str(tmp),
              metadata={"num-examples": str(result.samples)})
    os.replace(tmp, sent)
    metrics = {"num-examples": result.samples, "compute_s": time.perf_counter() - t0,
               **{k: v for k, v in result.metrics.items() if math.isfinite(v)}}
    return Message(RecordDict({"arrays": ArrayRecord(result.shared), "metrics": MetricRecord(metrics),
                               "site": ConfigRecord({"name": site})}), reply_to=msg)
