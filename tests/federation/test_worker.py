"""The site worker: the ClientApp's rounds run in `echocare-client`'s long-lived process, with the same result
as in the ClientApp's own process; refusals and failures come back with a reason and no data."""

import dataclasses
import json
import os
import stat
import subprocess
import sys

import pytest
import torch
from in_process import TINY_JOB
from safetensors.torch import load_file, save_file

from echocare_client.config import SiteConfig
from echocare_client.worker import SiteWorker, ask_worker, failure_reason, run_request
from echocare_core import __version__
from echocare_core.federation.job import Job, job_hash
from echocare_core.federation.rounds import initial_state
from echocare_core.synthetic.dataset import write_dataset

JOB = TINY_JOB


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("worker")
    folder = write_dataset(tmp / "seg", "segmentation", sites=1, per_site=8, size=64, seed=4)[0]
    node = SiteConfig(
        name="site_w", data=str(folder), state_dir=str(tmp / "state"), device="cpu", insecure=True, num_workers=0
    )
    arrays = tmp / "global.safetensors"
    save_file(initial_state(JOB, None), str(arrays))
    worker = SiteWorker(node)
    worker.start()
    yield node, str(arrays), worker
    worker.close()


def test_the_worker_gives_what_the_clientapp_process_gives(site):
    node, arrays, worker = site
    assert stat.S_IMODE(os.stat(worker.folder).st_mode) == 0o700  # only the site's user reaches the socket
    request = {"round": 1, "job": JOB.to_json(), "arrays": arrays, "toolkit": __version__}
    here = run_request(node, request)
    here_shared = load_file(here["shared"])
    there = ask_worker(worker.socket_path, request)
    assert there["samples"] == here["samples"] > 0 and there["shared"] == here["shared"]
    assert there["metrics"]["train_steps"] == 1 and there["metrics"].keys() == here["metrics"].keys()
    there_shared = load_file(there["shared"])
    assert there_shared.keys() == here_shared.keys()
    assert all(torch.equal(there_shared[k], here_shared[k]) for k in here_shared)


def test_refusals_and_failures_come_back_with_a_reason_and_the_worker_goes_on(site):
    node, arrays, worker = site
    wrong = Job(task="classification", classes=("a", "b"), encoder=JOB.encoder).to_json()
    refused = ask_worker(worker.socket_path, {"round": 2, "job": wrong, "arrays": arrays, "toolkit": __version__})
    assert refused == {"refused": "job task 'classification' but the site's dataset is 'segmentation'"}
    failed = ask_worker(
        worker.socket_path, {"round": 3, "job": JOB.to_json(), "arrays": arrays + ".missing", "toolkit": __version__}
    )
    assert failed == {"failed": "the round failed at the site (FileNotFoundError; see the site's log)"}
    assert "refused" not in ask_worker(
        worker.socket_path, {"round": 4, "job": JOB.to_json(), "arrays": arrays, "toolkit": __version__}
    )


def test_the_site_runs_only_jobs_it_approved_from_coordinators_it_accepts(site):
    node, arrays, _ = site
    request = {"round": 5, "job": JOB.to_json(), "arrays": arrays, "toolkit": "9.9.9"}
    assert run_request(node, request) == {
        "refused": f"the coordinator runs echocare 9.9.9; this site accepts {__version__}"
    }
    assert "refused" not in run_request(dataclasses.replace(node, server_versions=("9.9.9", __version__)), request)
    pinned = dataclasses.replace(node, approved_jobs=("0" * 64,))
    refused = run_request(pinned, {**request, "toolkit": __version__})
    assert refused == {"refused": f"job {job_hash(JOB)[:12]} is not among the site's approved_jobs"}
    assert "refused" not in run_request(
        dataclasses.replace(pinned, approved_jobs=("0" * 64, job_hash(JOB))), {**request, "toolkit": __version__}
    )


def test_memory_failures_are_named_without_the_exception_text():
    with pytest.raises(RuntimeError) as cpu:  # a real allocator failure
        torch.empty(10**14)  # 400 TB: more than the address space, also with overcommit
    assert failure_reason(cpu.value) == "the site ran out of memory"
    gpu = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB while reading case_0042.dcm")
    assert "case_0042" not in failure_reason(gpu) and "GPU ran out of memory" in failure_reason(gpu)
    assert failure_reason(ValueError("mask of /data/patient_7.png")) == (
        "the round failed at the site (ValueError; see the site's log)"
    )


def test_a_round_asked_again_is_answered_again_not_trained_twice(site):
    node, arrays, _ = site
    request = {"round": 7, "job": JOB.to_json(), "arrays": arrays, "toolkit": __version__, "global": "g1"}
    first = run_request(node, request)
    sent = os.stat(first["shared"]).st_mtime_ns
    assert run_request(node, request) == first and os.stat(first["shared"]).st_mtime_ns == sent
    assert "refused" not in run_request(node, {**request, "global": "g2"})  # another global model: trains
    events = [json.loads(line) for line in open(f"{node.state_dir}/audit.jsonl")]
    assert [e["event"] for e in events if e.get("round") == 7] == ["trained", "resent", "trained"]


def test_the_clientapp_process_reads_the_site_config_without_the_training_stack():
    code = "import sys, echocare_client.client_app; print(sorted({'torch', 'monai'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"  # Flower starts a process per round: it imports flwr, numpy and the site's config
