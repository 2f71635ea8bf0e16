"""The ServerApp's round loop with the real ClientApp function, Flower's network replaced by in-process calls:
participation, deadline and quorum, and resuming a run killed in the middle of a round."""

import json
from pathlib import Path

import pytest
import torch
from in_process import TINY_JOB, InProcessGrid, federation_config, node_config, site_of, with_site
from safetensors import safe_open

from echocare_core.checkpoint import load_weights
from echocare_core.federation.rounds import choose_sites, initial_state
from echocare_core.federation.transport import decode
from echocare_core.synthetic.dataset import write_dataset
from echocare_server.server_app import run_rounds

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("flower_task")]


JOB = TINY_JOB


def _events(out):
    return [json.loads(line) for line in (out / "progress.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loop")
    folders = write_dataset(tmp / "seg", "segmentation", sites=4, per_site=8, size=64, seed=2)
    return {100 + i: node_config(f"site_{i}", f, tmp / "state") for i, f in enumerate(folders)}


def test_choose_sites_draws_a_share_reproducibly():
    nodes = [11, 5, 7, 3, 9]
    assert choose_sites(nodes, 1.0, 2, 0, 1) == [3, 5, 7, 9, 11]
    picked = choose_sites(nodes, 0.4, 1, 0, 1)
    assert len(picked) == 2 and set(picked) <= set(nodes) and picked == choose_sites(nodes[::-1], 0.4, 1, 0, 1)
    assert len(choose_sites(nodes, 0.2, 3, 0, 1)) == 3  # never fewer than the quorum
    assert {tuple(choose_sites(nodes, 0.4, 1, 0, r)) for r in range(1, 20)} != {tuple(picked)}  # drawn anew


def test_participation_asks_a_share_and_aggregates_exactly_their_replies(sites, tmp_path):
    grid = InProcessGrid(sites)
    run_rounds(grid, federation_config(tmp_path / "run", participation=0.5))
    for rnd in (1, 2):
        asked = [node for r, node in grid.asked if r == rnd]
        assert len(asked) == 2 and asked == choose_sites(list(sites), 0.5, 2, 0, rnd)
        reference = (
            initial_state(JOB, None)
            if rnd == 1
            else load_weights(tmp_path / "run" / "checkpoints" / f"round_{rnd - 1:04d}")
        )  # the global model the sites received
        sent = []
        for node in asked:
            state = site_of(sites[node]).state_dir
            with safe_open(f"{state}/sent/round_{rnd:04d}.safetensors", "pt") as f:
                assert f.metadata()["transport"] == "bf16"  # the default: deltas in 16 bits
                sent.append(
                    (
                        decode({k: f.get_tensor(k) for k in f.keys()}, reference, "bf16"),
                        int(f.metadata()["num-examples"]),
                    )
                )
        total = sum(n for _, n in sent)
        global_state = load_weights(tmp_path / "run" / "checkpoints" / f"round_{rnd:04d}")
        for name in sent[0][0]:
            mean, ref = sum(t[name].double() * n for t, n in sent) / total, reference[name].double()
            expected = ref + 2 * (mean - ref)  # the default fednova: each site took one step; a server step of 2
            torch.testing.assert_close(global_state[name].double(), expected, rtol=1e-6, atol=1e-7)
    replies = [e for e in _events(tmp_path / "run") if e["event"] == "reply"]
    assert len(replies) == 4 and all(e["train_steps"] == 1 and e["seconds"] >= 0 for e in replies)


def test_the_frozen_model_goes_once_and_again_to_a_site_that_lost_it(sites, tmp_path):
    two = {n: with_site(sites[n], state_dir=site_of(sites[n]).state_dir + "_bytes") for n in list(sites)[:2]}
    full = initial_state(JOB, None)
    shared = {k: v for k, v in full.items() if ".lora_" in k or k.startswith("head.")}
    shared_bytes = sum(v.numel() * 4 for v in shared.values())
    frozen_bytes = sum(v.numel() * v.element_size() for v in full.values()) - shared_bytes
    lost = list(two)[1]

    def forget(trained, _):  # after its round 1 the site loses its copy: in round 2 it asks and gets it again
        for cached in Path(site_of(two[lost]).state_dir, "frozen").glob("*"):
            cached.unlink()
        return trained

    run_rounds(InProcessGrid(two, tamper={lost: forget}), federation_config(tmp_path / "run", rounds=2))
    replies = [e for e in _events(tmp_path / "run") if e["event"] == "reply"]
    down = {(e["round"], e["site"]): e["bytes_sent"] for e in replies}
    assert down == {
        (1, "site_0"): shared_bytes + frozen_bytes,
        (1, "site_1"): shared_bytes + frozen_bytes,
        (2, "site_0"): shared_bytes,
        (2, "site_1"): 2 * shared_bytes + frozen_bytes,
    }
    assert frozen_bytes > 0 and all(e["bytes_received"] == shared_bytes // 2 for e in replies)  # bf16 up


def test_a_silent_site_misses_the_round_and_a_missing_quorum_fails_the_run(sites, tmp_path):
    three = {n: sites[n] for n in list(sites)[:3]}
    silent = list(three)[2]
    run_rounds(InProcessGrid(three, silent=(silent,)), federation_config(tmp_path / "ok", rounds=1, deadline=1))
    end = [e for e in _events(tmp_path / "ok") if e["event"] == "round_end"]
    assert [s["site"] for s in end[0]["sites"]] == ["site_0", "site_1"]
    with pytest.raises(RuntimeError, match="round 1: 2 valid replies; min_sites is 3"):
        run_rounds(
            InProcessGrid(three, silent=(silent,)), federation_config(tmp_path / "quorum", min_sites=3, deadline=1)
        )
    assert _events(tmp_path / "quorum")[-1]["event"] == "failed"
    assert not (tmp_path / "quorum" / "checkpoints").exists()


def test_a_site_whose_supernode_restarted_is_asked_again_within_the_round(sites, tmp_path):
    two = {n: sites[n] for n in list(sites)[:2]}
    restarting = list(two)[1]
    grid = InProcessGrid(two, restarting=(restarting,))
    run_rounds(grid, federation_config(tmp_path / "run", rounds=1))
    assert [node for _, node in grid.asked].count(restarting) == 2  # NODE_UNAVAILABLE, then asked again
    events = _events(tmp_path / "run")
    assert not [e for e in events if e["event"] == "refused"]
    assert [s["site"] for s in events[-2]["sites"]] == ["site_0", "site_1"]


def test_a_run_killed_mid_round_resumes_to_the_same_model_as_an_uninterrupted_run(sites, tmp_path):
    two = {n: sites[n] for n in list(sites)[:2]}
    out = tmp_path / "killed"
    with pytest.raises(RuntimeError, match="killed"):
        run_rounds(InProcessGrid(two, crash_in_round=2), federation_config(out, rounds=3))
    run_rounds(InProcessGrid(two), federation_config(out, rounds=3))
    events = _events(out)
    assert [e["resumed_after"] for e in events if e["event"] == "start"] == [0, 1]
    assert [e["round"] for e in events if e["event"] == "round_start"] == [1, 2, 2, 3]
    assert [e["round"] for e in events if e["event"] == "round_end"] == [1, 2, 3]
    assert [json.loads(line)["round"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    fresh = {n: with_site(c, state_dir=site_of(c).state_dir + "_whole") for n, c in two.items()}  # trains, no replays
    run_rounds(InProcessGrid(fresh), federation_config(tmp_path / "whole", rounds=3))
    resumed, whole = (load_weights(tmp_path / run / "checkpoints" / "round_0003") for run in ("killed", "whole"))
    assert resumed.keys() == whole.keys() and all(torch.equal(resumed[k], whole[k]) for k in whole)


def test_a_site_whose_privacy_budget_runs_out_stops_and_the_run_goes_on(sites, tmp_path):
    from echocare_core.checkpoint import read_meta
    from echocare_core.privacy.dp import epsilon, noise_multiplier
    from echocare_core.privacy.settings import DPSettings, SitePrivacy
    from echocare_core.tasks.dataset import split_rows

    two = {n: with_site(sites[n], state_dir=site_of(sites[n]).state_dir + "_dp") for n in list(sites)[:2]}
    small = list(two)[0]
    n_train = len(split_rows(site_of(two[small]).data, "train"))
    q, dp = min(1.0, 8 / n_train), DPSettings(epsilon=8.0)
    sigma = noise_multiplier(dp, q, 4)  # 4 rounds of one step
    budget = (epsilon([(sigma, q, 1)] * 2, 1e-5) + epsilon([(sigma, q, 1)] * 3, 1e-5)) / 2
    two[small] = with_site(two[small], privacy=SitePrivacy(epsilon_budget=budget))
    run_rounds(
        InProcessGrid(two),
        federation_config(
            tmp_path / "run",
            {"train": {"mode": "lora", "lora_rank": 2, "batch_size": 8, "privacy": {"epsilon": 8.0}}},
            rounds=4,
            min_sites=1,
        ),
    )
    events = _events(tmp_path / "run")
    ends = {e["round"]: [s["site"] for s in e["sites"]] for e in events if e["event"] == "round_end"}
    assert ends == {1: ["site_0", "site_1"], 2: ["site_0", "site_1"], 3: ["site_1"], 4: ["site_1"]}
    refused = [e for e in events if e["event"] == "refused"]
    assert [e["round"] for e in refused] == [3, 4] and all("privacy budget" in e["reason"] for e in refused)
    spent = read_meta(tmp_path / "run" / "checkpoints" / "round_0004")["metrics"]["privacy"]
    assert spent["site_0"]["epsilon"] == pytest.approx(epsilon([(sigma, q, 1)] * 2, 1e-5), rel=1e-6)
    assert spent["site_0"]["epsilon"] < spent["site_1"]["epsilon"] <= 8.0 and spent["site_1"]["delta"] == 1e-5


@pytest.fixture
def full_disk(tmp_path):
    """A real, tiny filesystem (tmpfs of 8 KiB; needs root, as on the project's machines and CI)."""
    import os
    import subprocess

    folder = tmp_path / "tiny"
    folder.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8k", "tmpfs", str(folder)]).returncode:
        pytest.skip("mounting a tmpfs needs root")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_a_site_whose_disk_is_full_says_so_and_the_run_goes_on(sites, tmp_path, full_disk):
    two = {n: sites[n] for n in list(sites)[:2]}
    full = list(two)[1]
    two[full] = with_site(two[full], state_dir=str(full_disk / "site_1"))
    run_rounds(InProcessGrid(two), federation_config(tmp_path / "run", rounds=1, min_sites=1))
    events = _events(tmp_path / "run")
    (refused,) = [e for e in events if e["event"] == "refused"]
    assert refused["reason"] == "site site_1 failed: the site's disk is full"  # no path, no data
    assert [s["site"] for s in events[-2]["sites"]] == ["site_0"]


def test_the_server_keeps_the_newest_rounds_and_the_best_scored_model(sites, tmp_path):
    from echocare_core.checkpoint import read_meta

    two = {n: sites[n] for n in list(sites)[:2]}
    run_rounds(InProcessGrid(two), federation_config(tmp_path / "run", rounds=4, keep_checkpoints=2))
    folders = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert folders == ["best", "round_0003", "round_0004"]
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    scores = {
        r["round"] - 1: sum(s["global_dice"] * s["val_samples"] for s in r["sites"])
        / sum(s["val_samples"] for s in r["sites"])
        for r in history[1:]
    }  # round N's model, scored in N+1
    best = read_meta(tmp_path / "run" / "checkpoints" / "best")
    assert best["round"] == max(scores, key=scores.get) and best["metrics"]["scores"]["0"] == pytest.approx(
        max(scores.values())
    )
