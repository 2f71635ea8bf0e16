"""Aggregation strategies on hand-made updates with known answers."""

import pytest
import torch

from echocare_core.federation.strategies import StrategyConfig, aggregate_updates

CURRENT = {"w": torch.zeros(3)}
UPDATES = [
    ({"w": torch.tensor([1.0, 0.0, 10.0])}, 1),
    ({"w": torch.tensor([2.0, 0.0, 20.0])}, 1),
    ({"w": torch.tensor([3.0, 0.0, 30.0])}, 2),
    ({"w": torch.tensor([100.0, 0.0, -50.0])}, 1),
]


def _agg(name, updates=UPDATES, state=None, steps=None, **kw):
    return aggregate_updates(StrategyConfig(name=name, **kw), CURRENT, updates, state or {}, steps)


def test_weighted_mean_median_and_trimmed_mean():
    assert _agg("fedavg")[0]["w"].tolist() == pytest.approx([109 / 5, 0.0, 40 / 5])
    assert _agg("fedmedian")[0]["w"].tolist() == pytest.approx([2.5, 0.0, 15.0])  # even count: middle two
    assert _agg("fedtrimmedavg", trim=0.25)[0]["w"].tolist() == pytest.approx([2.5, 0.0, 15.0])
    assert _agg("fedtrimmedavg", trim=0.0)[0]["w"].tolist() == pytest.approx([106 / 4, 0.0, 10 / 4])


def test_fednova_weights_every_image_once_and_the_server_steps_towards_the_mean():
    def w(name, updates, steps=None, **kw):
        return _agg(name, updates=updates, steps=steps, **kw)[0]["w"].tolist()

    # site 0: 4 samples, 4 steps; site 1: 1 sample, 1 step; the steps' sample-weighted mean is 3.4
    same = [({"w": torch.full((3,), 4.0)}, 4), ({"w": torch.full((3,), 1.0)}, 1)]  # one unit per step at each site
    assert w("fednova", same, [4, 1], server_lr=1.0) == pytest.approx([3.4] * 3)
    assert w("fedavg", same, server_lr=1.0) == pytest.approx([17 / 5] * 3)  # FedAvg agrees when steps move alike
    faster = [({"w": torch.full((3,), 8.0)}, 4), ({"w": torch.full((3,), 1.0)}, 1)]  # site 0: two units per step
    assert w("fednova", faster, [4, 1], server_lr=1.0) == pytest.approx([3.4 * (0.8 * 2 + 0.2 * 1)] * 3)
    assert w("fedavg", faster, server_lr=1.0) == pytest.approx([33 / 5] * 3)  # its steps counted twice
    assert w("fedavg", same, server_lr=2.0) == pytest.approx([2 * 17 / 5] * 3)
    assert w("fednova", same, [4, 1]) == pytest.approx([2 * 3.4] * 3)  # fednova's usual step is 2
    assert StrategyConfig(name="fedadam").step == 0.1 and StrategyConfig(name="fedavg").step == 1.0
    # under DP fednova steps 1 (2 would double every update's noise too), unless the coordinator sets server_lr
    assert StrategyConfig().private(True).step == 1.0 and StrategyConfig().private(False).step == 2.0
    assert StrategyConfig(server_lr=3.0).private(True).step == 3.0
    assert StrategyConfig(name="fedadam").private(True).step == 0.1
    with pytest.raises(ValueError, match="fednova needs each update's local steps"):
        w("fednova", same)
    with pytest.raises(ValueError, match="server_lr=0: must be > 0"):
        StrategyConfig(server_lr=0)


def test_krum_picks_an_update_close_to_the_others_and_never_the_outlier():
    five = UPDATES + [({"w": torch.tensor([2.5, 0.0, 25.0])}, 1)]
    chosen, _ = _agg("krum", updates=five, krum_f=1)
    assert chosen["w"].tolist() == [2.0, 0.0, 20.0] or chosen["w"].tolist() == [2.5, 0.0, 25.0]
    with pytest.raises(ValueError, match="needs at least 5 replies"):
        _agg("krum", krum_f=1)


def test_fedadam_first_step_and_its_state():
    new, state = _agg("fedadam", server_lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    delta = torch.tensor([109 / 5, 0.0, 8.0], dtype=torch.float64)
    m = 0.1 * delta
    v = 0.99 * 1e-6 + 0.01 * delta**2
    torch.testing.assert_close(new["w"].double(), (0.1 * m / (v.sqrt() + 1e-3)), rtol=1e-5, atol=1e-6)
    assert set(state) == {"m.w", "v.w"}
    again, state2 = _agg("fedadam", state=state)
    assert not torch.equal(state2["m.w"], state["m.w"]) and again["w"].shape == (3,)


def test_fedyogi_second_moment_moves_by_a_bounded_step():
    _, state = _agg("fedyogi", beta2=0.99, tau=1e-3)
    delta2 = torch.tensor([109 / 5, 0.0, 8.0], dtype=torch.float64) ** 2
    expected = 1e-6 - 0.01 * delta2 * torch.sign(1e-6 - delta2)
    torch.testing.assert_close(state["v.w"], expected)


def test_a_private_job_aggregates_with_fednova_stepping_one():
    from dataclasses import replace

    from echocare_core.engine.training import LocalTraining
    from echocare_core.federation.job import Job
    from echocare_core.federation.rounds import aggregate
    from echocare_core.privacy.settings import DPSettings

    job = Job(train=LocalTraining(batch_size=1, privacy=DPSettings(epsilon=8.0)))  # a site's steps: its samples
    same = [({"w": torch.full((3,), 4.0)}, 4), ({"w": torch.full((3,), 1.0)}, 1)]
    assert aggregate(CURRENT, same, job)[0]["w"].tolist() == pytest.approx([3.4] * 3)
    assert aggregate(CURRENT, same, replace(job, train=LocalTraining(batch_size=1)))[0]["w"].tolist() == pytest.approx(
        [6.8] * 3
    )
