"""The real Flower runtime on 127.0.0.1: `echocare-server` (SuperLink + ServerApp) and three `echocare-client`s
(SuperNodes + ClientApps) as separate processes, over HTTP. One site has the wrong task and is refused."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import TINY_ENCODER
from safetensors import safe_open

from echocare_core.checkpoint import build_from_checkpoint, load_weights
from echocare_core.data.synthetic_dataset import write_dataset
from echocare_core.federation.processes import free_port

pytestmark = pytest.mark.slow
HANG_GUARD_S = 900  # only against a hung run; not a performance limit


def _federation(tmp_path, port, rounds):
    cfg = {"output": str(tmp_path / "run"), "server": {"host": "127.0.0.1", "port": port, "insecure": True},
           "rounds": {"rounds": rounds, "min_sites": 2, "expected_sites": 3, "wait_for_sites": 300, "deadline": 600},
           "job": {"task": "segmentation", "labels": [0, 1], "encoder": dict(TINY_ENCODER), "feature_size": 8,
                   "mode": "lora", "lora_rank": 2, "batch_size": 8}}
    path = tmp_path / f"federation_{rounds}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _server(config):
    return subprocess.Popen([sys.executable, "-m", "echocare_server.cli", "--config", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _events(tmp_path):
    return [json.loads(line) for line in (tmp_path / "run" / "progress.jsonl").read_text().splitlines()]


def _sent(state, rnd):
    with safe_open(str(state / "sent" / f"round_{rnd:04d}.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, int(f.metadata()["num-examples"])


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("deploy")
    seg = write_dataset(tmp / "seg", "segmentation", sites=2, per_site=14, size=64, seed=5)
    cls = write_dataset(tmp / "cls", "classification", sites=1, per_site=8, size=64, seed=5)
    port = free_port()
    clients = []
    server = _server(_federation(tmp, port, rounds=2))
    for name, folder in zip(("a", "b", "wrong_task"), [*seg, *cls]):
        site = {"name": f"site_{name}", "server": f"127.0.0.1:{port}", "insecure": True, "data": str(folder),
                "device": "cpu", "state_dir": str(tmp / f"state_{name}")}
        (tmp / f"site_{name}.yaml").write_text(yaml.safe_dump(site))
        clients.append(subprocess.Popen([sys.executable, "-m", "echocare_client.cli", "--config",
                                         str(tmp / f"site_{name}.yaml")], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, start_new_session=True))
    output, _ = server.communicate(timeout=HANG_GUARD_S)
    yield tmp, port, server.returncode, output
    for c in clients:
        os.killpg(c.pid, signal.SIGTERM)
    for c in clients:
        c.wait(60)


def test_two_rounds_aggregate_the_sample_weighted_mean(federation):
    tmp, _, code, output = federation
    assert code == 0, output
    assert "finished:completed" in output and "round 2" in output
    for rnd in (1, 2):
        (a, na), (b, nb) = _sent(tmp / "state_a", rnd), _sent(tmp / "state_b", rnd)
        assert set(a) == set(b) and all(".lora_" in k or k.startswith("head.") for k in a)
        global_state = load_weights(tmp / "run" / "checkpoints" / f"round_{rnd:04d}")
        for name in a:
            expected = (a[name].double() * na + b[name].double() * nb) / (na + nb)
            torch.testing.assert_close(global_state[name].double(), expected, rtol=1e-6, atol=1e-7)
    model, meta = build_from_checkpoint(tmp / "run" / "checkpoints" / "round_0001")
    assert meta["round"] == 1 and meta["task"] == "segmentation"
    assert (tmp / "run" / "curves.png").is_file() and "global dice" in (tmp / "run" / "report.md").read_text()


def test_the_site_with_another_task_is_refused_and_says_why(federation):
    tmp, *_ = federation
    refused = [e for e in _events(tmp) if e["event"] == "refused"]
    assert len(refused) == 2 and all("site site_wrong_task refused the job: job task 'segmentation' but the site's "
                                     "dataset is 'classification'" in e["reason"] for e in refused)
    assert not (tmp / "state_wrong_task" / "sent").exists()  # nothing left that site
    ends = [e for e in _events(tmp) if e["event"] == "round_end"]
    assert [sorted(s["site"] for s in e["sites"]) for e in ends] == [["site_a", "site_b"]] * 2


def test_the_server_resumes_after_its_last_round(federation):
    tmp, port, *_ = federation
    server = _server(_federation(tmp, port, rounds=3))
    output, _ = server.communicate(timeout=HANG_GUARD_S)
    assert server.returncode == 0, output
    starts = [e for e in _events(tmp) if e["event"] == "start"]
    assert starts[-1]["resumed_after"] == 2 and "resuming after round 2" in output
    assert [e["round"] for e in _events(tmp) if e["event"] == "round_end"] == [1, 2, 3]
    assert len((tmp / "run" / "metrics.jsonl").read_text().splitlines()) == 3
    assert build_from_checkpoint(tmp / "run" / "checkpoints" / "round_0003")[1]["round"] == 3
