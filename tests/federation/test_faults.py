"""Faults on the real runtime with a real network: the coordinator and three sites, each in its own network
namespace (needs root and iproute2, as on the project's machines and CI), over HTTPS with site keys. In
round 2 one site's link goes down for 75 s (Flower reports a node unavailable after about 60 s without
heartbeats) and another site is killed; the run completes every round and loses nothing, the cut site is
asked again when it is back and makes its round, the killed one rejoins once restarted. `bench/faults.py`
runs more faults and prints a table."""

import time
from pathlib import Path

import pytest

from echocare_core.cli.keys import make_keys
from echocare_core.federation.runtime.testbed import COORDINATOR_ADDRESS, Testbed, can_isolate
from echocare_core.synthetic.dataset import write_dataset

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not can_isolate(), reason="network namespaces need root and ip")]


def _running(text):
    """Processes whose command line contains `text`."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if text in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                found.append(proc.name)
        except OSError:
            continue
    return found


def test_a_cut_link_and_a_killed_site_cost_no_round_and_no_data(tmp_path):
    sites = dict(
        zip(
            ("site_a", "site_b", "site_c"),
            write_dataset(tmp_path / "data", "segmentation", sites=3, per_site=10, size=64, seed=3),
        )
    )
    make_keys(tmp_path / "keys", [COORDINATOR_ADDRESS], list(sites))
    fed = {
        "output": str(tmp_path / "run"),
        "rounds": {"rounds": 4, "min_sites": 2, "expected_sites": 3, "wait_for_sites": 300, "deadline": 120},
        "job": {
            "task": "segmentation",
            "labels": [0, 1],
            "feature_size": 8,
            "train": {"batch_size": 8, "mode": "lora", "lora_rank": 2},
            "encoder": {"variant": "test", "img_size": 64, "window_size": 4},
        },
    }
    with Testbed(tmp_path, sites, fed, keys=tmp_path / "keys", isolated=True, show_server=False) as bed:
        bed.start_server()
        for site in sites:
            bed.start_site(site)
        bed.wait_for("round_start", round=2)
        time.sleep(3)
        bed.kill_site("site_b")
        bed.cut("site_c")
        time.sleep(75)
        assert not _running(str(tmp_path / "site_state" / "site_b"))  # its SuperNode died with it
        bed.cut("site_c", down=False)
        bed.wait_for("round_end", round=2)
        bed.start_site("site_b")
        assert bed.wait_server(timeout=1200) == 0
        rounds = {e["round"]: sorted(s["site"] for s in e["sites"]) for e in bed.events() if e["event"] == "round_end"}
        assert bed.lost(4) == []
    assert rounds[1] == ["site_a", "site_b", "site_c"]
    assert rounds[2] == ["site_a", "site_c"]  # site_c asked again after the cut; site_b left out at the deadline
    assert "site_b" in rounds[3] + rounds[4]  # restarted after round 2, it rejoins
