"""One hostile or broken site out of five: what the server leaves out before aggregating, and what the robust
strategies do with what it cannot tell from a normal update."""

import json

import pytest
import torch
from in_process import InProcessGrid, federation_config, node_config
from safetensors import safe_open

from echocare_core.checkpoint import load_weights
from echocare_core.federation.rounds import outlier_reasons
from echocare_core.federation.transport import decode
from echocare_core.synthetic.dataset import write_dataset
from echocare_server.server_app import run_rounds

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("flower_task")]
HOSTILE = 100


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return write_dataset(
        tmp_path_factory.mktemp("screen") / "seg", "segmentation", sites=5, per_site=8, size=64, seed=7
    )


def _run(folders, out, tamper=None, strategy="fedavg", max_norm_ratio=10.0):
    sites = {HOSTILE + i: node_config(f"site_{i}", f, out / "state") for i, f in enumerate(folders)}
    cfg = federation_config(
        out / "run",
        {"local_steps": 2},
        {"name": strategy, "trim": 0.2},
        min_sites=3,
        max_norm_ratio=max_norm_ratio,
    )
    run_rounds(InProcessGrid(sites, tamper={HOSTILE: tamper} if tamper else None), cfg)
    events = [json.loads(line) for line in (out / "run" / "progress.jsonl").read_text().splitlines()]
    return load_weights(out / "run" / "checkpoints" / "round_0002"), events


def _trained(out, site, rnd):
    """What a site trained in round `rnd` >= 2: its sent deltas added to the global model it received."""
    reference = load_weights(out / "run" / "checkpoints" / f"round_{rnd - 1:04d}")
    with safe_open(str(out / "state" / site / "sent" / f"round_{rnd:04d}.safetensors"), "pt") as f:
        sent = {k: f.get_tensor(k) for k in f.keys()}
        return decode(sent, reference, f.metadata()["transport"]), int(f.metadata()["num-examples"])


def test_outlier_reasons_flag_only_the_far_update():
    state = {"w": torch.zeros(4)}
    updates = [({"w": torch.full((4,), v)}, 1) for v in (1.0, 1.2, 0.9, 30.0)]
    reasons = outlier_reasons(state, updates, 10.0)
    assert reasons[:3] == ["", "", ""] and "times the round's median" in reasons[3] and "(limit 10)" in reasons[3]
    assert outlier_reasons(state, [updates[0], updates[3]], 10.0) == ["", ""]  # two: no median to trust
    assert outlier_reasons(state, updates, 0.0) == [""] * 4


@pytest.mark.parametrize("attack", ["scaled", "nan"])
def test_a_scaled_or_broken_update_is_left_out_and_the_mean_is_the_honest_sites(folders, tmp_path, attack):
    def tamper(sent, state):
        if attack == "nan":
            return {k: v.fill_(float("nan")) for k, v in sent.items()}
        return {k: state[k] + 100 * (v - state[k]) for k, v in sent.items()}

    final, events = _run(folders, tmp_path, tamper)
    rejected = [e for e in events if e["event"] == "rejected"]
    assert [e["round"] for e in rejected] == [1, 2] and all(e["site"] == "site_0" for e in rejected)
    reason = "non-finite values" if attack == "nan" else "times the round's median"
    assert all(reason in e["reason"] for e in rejected)
    honest = [_trained(tmp_path, f"site_{i}", 2) for i in range(1, 5)]
    total = sum(n for _, n in honest)
    for name in honest[0][0]:
        expected = sum(t[name].double() * n for t, n in honest) / total
        torch.testing.assert_close(final[name].double(), expected, rtol=1e-6, atol=1e-7)


def test_robust_strategies_hold_against_a_sign_flipped_update_the_norm_screen_is_off_for(folders, tmp_path):
    flip = lambda sent, state: {k: state[k] - 50 * (v - state[k]) for k, v in sent.items()}  # noqa: E731
    distance = {}  # how far the attack moves each strategy's global model from its result without the attack
    for strategy in ("fedavg", "fedmedian", "fedtrimmedavg"):
        clean, _ = _run(folders, tmp_path / f"{strategy}_clean", strategy=strategy, max_norm_ratio=0)
        attacked, _ = _run(folders, tmp_path / strategy, flip, strategy, max_norm_ratio=0)
        distance[strategy] = sum(float((attacked[k] - clean[k]).double().norm() ** 2) for k in clean) ** 0.5
    assert distance["fedmedian"] < 0.2 * distance["fedavg"] and distance["fedtrimmedavg"] < 0.2 * distance["fedavg"]
