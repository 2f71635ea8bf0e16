"""The coordinator's round logic with plain values, no Flower: plan, receive, screen, quorum, aggregate, resume."""

import json

import pytest
import torch
from conftest import TINY_ENCODER

from echocare_core.checkpoint import load_weights
from echocare_core.engine.training import LocalTraining
from echocare_core.federation.coordinator import EVENTS, Coordinator, QuorumError, RoundSettings
from echocare_core.federation.job import Job
from echocare_core.federation.transport import encode
from echocare_core.models.swin import EncoderConfig

JOB = Job(
    task="segmentation",
    labels=(0, 1),
    encoder=EncoderConfig(**TINY_ENCODER),
    feature_size=8,
    train=LocalTraining(mode="frozen"),
    transport="fp32",
)


def _trained(coordinator, shift, samples=4):
    """What a site sends: the shared parameters moved by `shift`, with its metrics."""
    trained = {k: v + shift for k, v in coordinator.shared().items()}
    return encode(trained, coordinator.shared(), JOB.transport), {"num-examples": float(samples), "global_dice": 0.5}


def _events(out):
    return [json.loads(line) for line in (out / "progress.jsonl").read_text().splitlines()]


def test_a_round_aggregates_the_valid_replies_and_leaves_out_the_others(tmp_path):
    coordinator = Coordinator(tmp_path, JOB, RoundSettings(rounds=2, min_sites=2, max_norm_ratio=10))
    before = coordinator.shared()
    current = coordinator.plan(1, [11, 12, 13, 14, 15])
    assert current.nodes == [11, 12, 13, 14, 15]
    replies = {11: _trained(coordinator, 0.01, 4), 12: _trained(coordinator, 0.01, 20), 13: _trained(coordinator, 50.0)}
    for node, (sent, metrics) in replies.items():
        assert coordinator.receive(current, node, f"site_{node}", sent, metrics) == ""
    broken = {k: v[..., :1] for k, v in replies[11][0].items()}
    assert "names or shapes" in coordinator.receive(current, 14, "site_14", broken, replies[11][1])
    assert coordinator.receive(current, 15, "site_15", replies[11][0], {"num-examples": 0.0}) == "no training samples"
    path = coordinator.close(current)  # site_13's update is 2500x the median distance: screened out
    # the default strategy, fednova with a server step of 2: the coordinator counts site_11's local steps (4 samples
    # at batch 16: 1) and site_12's (20 samples: 2) from the job, so per step they moved 0.01 and 0.005
    mean_steps = (4 * 1 + 20 * 2) / 24
    expected = {k: v + 2 * mean_steps * (4 / 24 * 0.01 + 20 / 24 * 0.005) for k, v in before.items()}
    saved = load_weights(path)
    for name, value in expected.items():
        torch.testing.assert_close(saved[name], value)
    events = _events(tmp_path)
    assert {e["event"] for e in events} <= set(EVENTS)
    rejected = {e["site"]: e["reason"] for e in events if e["event"] == "rejected"}
    assert set(rejected) == {"site_13", "site_14", "site_15"} and "median" in rejected["site_13"]
    (end,) = [e for e in events if e["event"] == "round_end"]
    assert [s["site"] for s in end["sites"]] == ["site_11", "site_12"] and end["round"] == 1

    resumed = Coordinator(tmp_path, JOB, RoundSettings(rounds=2, min_sites=2))  # a restarted coordinator
    assert list(resumed.rounds_left()) == [2] and resumed.history == coordinator.history
    for name, value in expected.items():
        torch.testing.assert_close(resumed.shared()[name], value)


def test_too_few_sites_or_valid_replies_end_the_run_as_failed(tmp_path):
    coordinator = Coordinator(tmp_path, JOB, RoundSettings(rounds=1, min_sites=2))
    with pytest.raises(QuorumError, match="1 site\\(s\\) connected, min_sites is 2"):
        coordinator.check_connected(1)
    current = coordinator.plan(1, [1, 2])
    coordinator.receive(current, 1, "site_1", *_trained(coordinator, 0.01))
    coordinator.refused(current, 2, 1001, "site site_2 refused the job: job task 'x'")
    with pytest.raises(QuorumError, match="round 1: 1 valid replies; min_sites is 2"):
        coordinator.close(current)
    assert [e["event"] for e in _events(tmp_path)] == ["start", "failed", "round_start", "reply", "refused", "failed"]
    assert not (tmp_path / "checkpoints").exists()  # nothing aggregated, nothing saved
