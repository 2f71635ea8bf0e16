"""A site's DP round: epsilon reported as spent, refusals that name the privacy terms, and the spend on disk
before training, so that a client killed in the middle of a round cannot hide it."""

import dataclasses
import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import TINY_ENCODER

from echocare_core.engine.training import LocalTraining
from echocare_core.federation.job import Job
from echocare_core.federation.rounds import initial_state
from echocare_core.federation.site import JobRefused, site_round
from echocare_core.models.swin import EncoderConfig
from echocare_core.privacy.ledger import PrivacyLedger
from echocare_core.privacy.settings import DPSettings, SitePrivacy
from echocare_core.synthetic.dataset import write_dataset

JOB = Job(
    task="segmentation",
    labels=(0, 1),
    encoder=EncoderConfig(**TINY_ENCODER),
    feature_size=8,
    local_steps=3,
    train=LocalTraining(mode="lora", lora_rank=2, batch_size=4, privacy=DPSettings(epsilon=4.0)),
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_dataset(
        tmp_path_factory.mktemp("dp_site") / "seg", "segmentation", sites=1, per_site=14, size=64, seed=6
    )[0]


def test_a_private_round_trains_and_reports_what_it_spent(folder, tmp_path):
    result = site_round(JOB, initial_state(JOB, None), folder, 1, ledger_dir=tmp_path, rounds=5)
    assert result.metrics["train_steps"] == 3 and result.metrics["delta"] == 1e-5
    spends = PrivacyLedger(tmp_path).spends(next(iter(PrivacyLedger(tmp_path).datasets)))
    assert len(spends) == 1 and spends[0].steps == 3 and spends[0].round == 1
    assert 0 < result.metrics["epsilon"] == spends[0].epsilon < 4.0  # one of five planned rounds
    assert result.metrics["noise_multiplier"] == spends[0].noise_multiplier > 0


def test_privacy_terms_are_checked_before_anything_trains(folder, tmp_path):
    state = initial_state(JOB, None)
    plain = dataclasses.replace(JOB, train=dataclasses.replace(JOB.train, privacy=DPSettings()))
    with pytest.raises(JobRefused, match="trains only with differential privacy"):
        site_round(plain, state, folder, 1, privacy=SitePrivacy(required=True, epsilon_budget=8))
    with pytest.raises(JobRefused, match="train.privacy.delta 0.001 is above the site's delta 1e-05"):
        site_round(
            dataclasses.replace(JOB, train=dataclasses.replace(JOB.train, privacy=DPSettings(4.0, 1e-3))),
            state,
            folder,
            1,
            ledger_dir=tmp_path,
        )
    with pytest.raises(JobRefused, match="keeps no privacy ledger"):
        site_round(JOB, state, folder, 1)
    (tmp_path / "ledger.json").write_text("{}")
    with pytest.raises(JobRefused, match="privacy ledger cannot be trusted"):
        site_round(JOB, state, folder, 1, ledger_dir=tmp_path)


SCRIPT = """
import sys
from echocare_core.federation.job import Job
from echocare_core.federation.rounds import initial_state
from echocare_core.federation.site import site_round
job = Job.from_json(sys.argv[1])
site_round(job, initial_state(job, None), sys.argv[2], 1, ledger_dir=sys.argv[3], rounds=2)
"""


def test_the_spend_is_on_disk_before_training_and_survives_a_kill(folder, tmp_path):
    long = dataclasses.replace(JOB, local_steps=25)
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, long.to_json(), str(folder), str(tmp_path)])
    try:
        while (
            not (tmp_path / "ledger.json").is_file()
            or not json.loads((tmp_path / "ledger.json").read_text())["datasets"]
        ):
            assert proc.poll() is None, "the round ended before the spend was seen"
            time.sleep(0.05)
        time.sleep(0.2)  # into training
        assert proc.poll() is None
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    ledger = PrivacyLedger(tmp_path)  # intact: its key still matches
    (spends,) = [ledger.spends(d) for d in ledger.datasets]
    assert len(spends) == 1 and spends[0].steps == 25 and spends[0].epsilon > 0


def test_a_ghost_round_spends_what_a_hooks_round_spends(folder, tmp_path):
    state = initial_state(JOB, None)
    hooks = site_round(JOB, state, folder, 1, ledger_dir=tmp_path / "hooks", rounds=5)
    ghost = site_round(
        dataclasses.replace(JOB, train=dataclasses.replace(JOB.train, privacy=DPSettings(epsilon=4.0, mode="ghost"))),
        state,
        folder,
        1,
        ledger_dir=tmp_path / "ghost",
        rounds=5,
    )
    assert ghost.metrics["train_steps"] == 3 and ghost.metrics["epsilon"] == hooks.metrics["epsilon"]
    assert any(not torch.equal(ghost.shared[n], state[n]) for n in ghost.shared)
