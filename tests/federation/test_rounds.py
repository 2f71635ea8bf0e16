"""The federation's plain functions (no Flower): the job, a site's round, aggregation, round checkpoints."""

import dataclasses

import pytest
import torch
from conftest import TINY_ENCODER

from echocare_core.checkpoint import build_from_checkpoint
from echocare_core.data.contract import load_spec
from echocare_core.engine.evaluate import evaluate_checkpoint
from echocare_core.engine.training import LocalTraining
from echocare_core.federation.job import JOB_SCHEMA, Job, check_job, job_hash, weighted_mean
from echocare_core.federation.rounds import aggregate, initial_state, resume, save_round
from echocare_core.federation.site import JobRefused, site_round
from echocare_core.federation.site_terms import SiteLimits
from echocare_core.federation.strategies import StrategyConfig
from echocare_core.models.swin import EncoderConfig
from echocare_core.synthetic.dataset import write_dataset

JOB = Job(
    task="segmentation",
    labels=(0, 1),
    encoder=EncoderConfig(**TINY_ENCODER),
    feature_size=8,
    local_epochs=1,
    local=("head.out.*",),
    train=LocalTraining(mode="lora", lora_rank=2, batch_size=8),
)

SMALL_BATCH = dataclasses.replace(JOB.train, batch_size=2)


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    root = tmp_path_factory.mktemp("fed")
    return write_dataset(root / "seg", "segmentation", sites=2, per_site=14, size=64, seed=5) + write_dataset(
        root / "cls", "classification", sites=1, per_site=8, size=64, seed=5
    )


def test_weighted_mean_is_exact_and_checks_its_input():
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0])}
    b = {"w": torch.tensor([4.0, 8.0]), "b": torch.tensor([3.0])}
    out = weighted_mean([(a, 1), (b, 2)])
    torch.testing.assert_close(out["w"], torch.tensor([3.0, 6.0]))
    torch.testing.assert_close(out["b"], torch.tensor([2.0]))
    with pytest.raises(ValueError, match="same parameter names"):
        weighted_mean([(a, 1), ({"w": a["w"]}, 1)])
    with pytest.raises(ValueError, match="no update"):
        weighted_mean([])


def test_job_round_trips_as_json_and_sites_check_it(sites):
    assert Job.from_json(JOB.to_json()) == JOB and len(job_hash(JOB)) == 64
    with pytest.raises(ValueError, match="Did you mean 'task'"):
        Job.from_json(f'{{"schema": {JOB_SCHEMA}, "tak": "segmentation"}}')
    with pytest.raises(ValueError, match=f"job schema {JOB_SCHEMA - 1}: this toolkit reads schema {JOB_SCHEMA}"):
        Job.from_json(f'{{"schema": {JOB_SCHEMA - 1}, "task": "segmentation"}}')
    seg, cls = load_spec(sites[0]), load_spec(sites[2])
    assert check_job(JOB, seg, SiteLimits()) == []
    assert check_job(JOB, cls, SiteLimits()) == ["job task 'segmentation' but the site's dataset is 'classification'"]
    greedy = dataclasses.replace(
        JOB, train=dataclasses.replace(JOB.train, batch_size=128), local_epochs=20, labels=(0, 255)
    )
    reasons = check_job(greedy, seg, SiteLimits(max_batch_size=32, max_local_epochs=5))  # batches of 128 go through
    assert len(reasons) == 2 and "mask values [0, 255]" in reasons[0] and "local_epochs 20" in reasons[1]  # in pieces


def test_a_round_shares_only_trainable_non_local_weights(sites, tmp_path):
    state = initial_state(JOB, None)
    result = site_round(JOB, state, sites[0], 1, local_file=tmp_path / "local.safetensors")
    assert result.samples > 0 and "global_dice" in result.metrics and "local_dice" in result.metrics
    assert all(".lora_" in n or n.startswith("head.") for n in result.shared)
    assert not any(n.startswith("head.out.") for n in result.shared)  # site-local: kept on the site's disk
    assert (tmp_path / "local.safetensors").is_file()
    assert any(not torch.equal(result.shared[n], state[n]) for n in result.shared)
    with pytest.raises(JobRefused, match="dataset is 'classification'"):
        site_round(JOB, state, sites[2], 1)


def test_local_steps_train_exactly_that_many_batches_within_the_site_limit(sites):
    state = initial_state(JOB, None)
    train = site_round(dataclasses.replace(JOB, local=(), train=SMALL_BATCH), state, sites[0], 1).metrics["train_steps"]
    for steps in (1, int(train) + 3):  # fewer, and more than one epoch's batches
        result = site_round(
            dataclasses.replace(JOB, local=(), train=SMALL_BATCH, local_steps=steps), state, sites[0], 1
        )
        assert result.metrics["train_steps"] == steps
    too_many = dataclasses.replace(JOB, train=SMALL_BATCH, local_steps=1000)
    with pytest.raises(
        JobRefused,
        match="local_steps 1000 x train.batch_size 2 is .* passes over the site's training "
        "split, more than its max_local_epochs 10",
    ):
        site_round(too_many, state, sites[0], 1)


def test_fedprox_keeps_the_update_nearer_the_global_model(sites):
    state = initial_state(JOB, None)
    drift = {}
    for mu in (0.0, 100.0):
        shared = site_round(dataclasses.replace(JOB, proximal_mu=mu, local=()), state, sites[0], 1).shared
        drift[mu] = sum((shared[n] - state[n]).pow(2).sum() for n in shared)
    assert drift[100.0] < drift[0.0]


def test_two_sites_aggregate_checkpoint_evaluate_and_resume(sites, tmp_path):
    job = dataclasses.replace(JOB, local=())
    state = initial_state(job, None)
    results = [site_round(job, state, folder, 1) for folder in sites[:2]]
    new, _ = aggregate(state, [(r.shared, r.samples) for r in results], job, StrategyConfig("fedavg"))
    n0, n1 = results[0].samples, results[1].samples
    name = next(iter(results[0].shared))
    expected = (results[0].shared[name] * n0 + results[1].shared[name] * n1) / (n0 + n1)
    torch.testing.assert_close(new[name], expected)
    frozen = "encoder.patch_embed.proj.weight"
    assert torch.equal(new[frozen], state[frozen])
    path = save_round(tmp_path, job, new, 1, {"sites": 2}, [{"round": 1}])
    model, meta = build_from_checkpoint(path)
    assert meta["round"] == 1 and meta["task"] == "segmentation"
    assert evaluate_checkpoint(path, sites[0], "test", rounds=20)["main_metric"] == "dice"
    state2, last, history, server_state = resume(tmp_path, job)
    assert last == 1 and history == [{"round": 1}] and server_state == {} and torch.equal(state2[name], new[name])
    with pytest.raises(ValueError, match="belongs to another job"):
        resume(tmp_path, dataclasses.replace(job, train=dataclasses.replace(job.train, lr=0.5)))
