"""The one training driver: a federated round trains with the job's recipe exactly as local fine-tuning does."""

import dataclasses
import math

import pytest
import torch
from conftest import TINY_ENCODER

from echocare_core.engine.optim import warmup_cosine
from echocare_core.engine.training import MIN_LR_RATIO, LocalTraining, Recipe, train_epoch
from echocare_core.federation.job import Job
from echocare_core.federation.rounds import initial_state
from echocare_core.federation.site import JobRefused, site_round
from echocare_core.models.swin import EncoderConfig
from echocare_core.privacy.settings import DPSettings
from echocare_core.synthetic.dataset import write_dataset
from echocare_core.tasks.dataset import split_rows

JOB = Job(
    task="segmentation",
    labels=(0, 1),
    encoder=EncoderConfig(**TINY_ENCODER),
    feature_size=8,
    local_steps=2,
    train=LocalTraining(mode="lora", lora_rank=2, batch_size=4, lr=1e-2, warmup_epochs=1),
)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("site"), "segmentation", sites=1, per_site=16, size=64, seed=3)[0]


def test_the_rounds_of_a_job_follow_one_schedule_the_local_recipe_would_run(site):
    rounds, steps = 4, JOB.local_steps
    n = len(split_rows(site, "train"))
    warmup = math.ceil(n / JOB.train.batch_size)  # one epoch of warm-up, then cosine over all rounds' steps
    reference = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=JOB.train.lr)
    schedule = warmup_cosine(reference, warmup, rounds * steps, MIN_LR_RATIO)
    state = initial_state(JOB, None)
    for rnd in range(1, rounds + 1):
        result = site_round(JOB, state, site, rnd, rounds=rounds)
        for _ in range(steps):
            schedule.step()
        assert result.metrics["lr"] == pytest.approx(reference.param_groups[0]["lr"], rel=1e-9), rnd
        assert result.metrics["train_steps"] == steps and result.metrics["train_unreadable"] == 0
    assert reference.param_groups[0]["lr"] == pytest.approx(JOB.train.lr * MIN_LR_RATIO)  # the job's end
    with pytest.raises(JobRefused, match="round 5 of a job of 4 rounds"):
        site_round(JOB, state, site, rounds + 1, rounds=rounds)


def test_precision_and_clipping_reach_the_site_from_the_job(site):
    state = initial_state(JOB, None)

    def update(**train):
        job = dataclasses.replace(JOB, train=dataclasses.replace(JOB.train, warmup_epochs=0, **train))
        return site_round(job, state, site, 1, rounds=1).shared

    fp32, again = update(), update()
    for name in fp32:  # the round is deterministic: the differences below come from the recipe
        torch.testing.assert_close(fp32[name], again[name], rtol=0, atol=0)
    for changed in (update(precision="bf16"), update(clip_grad=1e-4)):
        assert max((changed[k] - fp32[k]).abs().max().item() for k in fp32) > 1e-6


@pytest.mark.parametrize(
    "precision,dp,expected",
    [
        ("fp32", False, torch.float32),
        ("auto", False, torch.float32),
        ("bf16", False, torch.bfloat16),
        ("bf16", True, torch.float32),
    ],
)
def test_train_epoch_computes_in_the_recipes_precision(precision, dp, expected):
    model = torch.nn.Linear(3, 2)
    seen = []
    model.register_forward_hook(lambda _, __, out: seen.append(out.dtype))
    train = LocalTraining(precision=precision, privacy=DPSettings(epsilon=1.0 if dp else 0.0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    recipe = Recipe(train, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0))
    batch = {"image": torch.randn(4, 3), "target": torch.zeros(4, dtype=torch.long), "skipped": 0}
    losses, _ = train_epoch(model, [batch], recipe, torch.nn.functional.cross_entropy, torch.device("cpu"))
    assert seen == [expected] and len(losses) == 1


@pytest.mark.parametrize("dp_mode", ["none", "hooks", "ghost"])
def test_a_batch_in_pieces_the_device_holds_trains_as_the_whole_batch(dp_mode):
    """max_batch splits a batch (a site's memory); the gradients add up to one step of the whole batch, under DP
    every sample clipped on its own and the noise drawn once (zero here, to compare)."""
    from echocare_core.privacy.dp import DPTraining

    torch.manual_seed(0)
    batch = {"image": torch.randn(7, 3), "target": torch.randint(0, 2, (7,)), "skipped": 0}
    reference = torch.nn.Linear(3, 2)

    def step(max_batch):
        model = torch.nn.Linear(3, 2)
        model.load_state_dict(reference.state_dict())
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        settings = DPSettings(
            epsilon=1.0 if dp_mode != "none" else 0.0,
            max_grad_norm=0.3,
            mode="ghost" if dp_mode == "ghost" else "hooks",
        )
        recipe = Recipe(
            LocalTraining(privacy=settings), optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        )
        dp = DPTraining(model, optimizer, settings, 0.0, 7) if settings.on else None
        net = dp.module if dp else model
        losses, _ = train_epoch(
            net, [batch], recipe, torch.nn.functional.cross_entropy, torch.device("cpu"), dp, max_batch
        )
        return losses, [p.detach().clone() for p in model.parameters()]

    (whole_loss, whole), (pieces_loss, pieces) = step(0), step(3)
    assert pieces_loss == pytest.approx(whole_loss, rel=1e-6)
    for w, p, r in zip(whole, pieces, reference.parameters()):
        assert (w - r).abs().max() > 1e-3  # it trained
        torch.testing.assert_close(p, w, rtol=1e-6, atol=1e-7)
