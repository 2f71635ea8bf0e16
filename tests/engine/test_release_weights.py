"""The released EchoCare encoder, laid out as the authors ship it (MONAI's class with the release numbers and
`mask_token`; random weights here, the file cannot be downloaded), loads exactly into a fine-tuning run and a
federation job; a frozen run keeps it bit-identical and exports it back; a file that does not fit stops with
exit code 2."""

import dataclasses

import pytest
import torch
import yaml
from models.test_swin import monai_twin

from echocare_core.checkpoint import load_weights
from echocare_core.cli.finetune import main as finetune_main
from echocare_core.config import ConfigError, load_config
from echocare_core.engine.training import LocalTraining
from echocare_core.federation.job import Job, shared_names
from echocare_core.federation.rounds import initial_state
from echocare_core.federation.site import build_job_model, site_round
from echocare_core.models.swin import EncoderConfig
from echocare_core.synthetic.dataset import write_dataset
from echocare_core.weights import export_release
from echocare_server.cli import main as server_main
from echocare_server.config import FederationConfig

pytestmark = pytest.mark.slow
# the release's numbers at 64 px: the weights do not depend on the input size, and a CPU runs it in seconds
ENCODER = {"img_size": 64, "drop_path": 0.0}


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    torch.manual_seed(0)
    state = {**monai_twin(EncoderConfig()).state_dict(), "mask_token": torch.randn(1, 1, 128)}
    path = tmp_path_factory.mktemp("release") / "echocare_encoder.pth"
    torch.save(state, path)
    return path, state


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data"), "classification", sites=1, per_site=12, size=64, seed=2)[0]


def _site_yaml(tmp_path, site, release, **model):
    cfg = {
        "output": str(tmp_path / "run"),
        "device": "cpu",
        "data": {"folder": str(site), "num_workers": 0},
        "model": {"init": str(release), "encoder": ENCODER, **model},
        "epochs": 1,
        "train": {"mode": "frozen", "batch_size": 4, "warmup_epochs": 0},
    }
    (tmp_path / "site.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path / "site.yaml"


def test_a_frozen_run_from_the_release_keeps_it_bit_identical_and_exports_it_back(tmp_path, release, site):
    path, state = release
    assert finetune_main(["--config", str(_site_yaml(tmp_path, site, path))]) == 0
    weights = load_weights(tmp_path / "run" / "best")
    encoder = {k[len("encoder.") :]: v for k, v in weights.items() if k.startswith("encoder.")}
    assert encoder.keys() == state.keys() - {"mask_token"}
    assert all(torch.equal(encoder[k], state[k]) for k in encoder)
    export_release(tmp_path / "run" / "best", tmp_path / "back.pth")
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    back.pop("mask_token")
    reference = monai_twin(EncoderConfig())
    reference.load_state_dict(back, strict=True)  # the authors' own loading
    assert all(torch.equal(back[k], state[k]) for k in back)


def test_a_release_that_does_not_fit_the_encoder_stops_the_run_with_exit_code_2(tmp_path, release, site, capsys):
    path, _ = release
    config = _site_yaml(tmp_path, site, path, encoder={**ENCODER, "depths": [2, 2, 6, 2]})
    assert finetune_main(["--config", str(config)]) == 2
    err = capsys.readouterr().err.replace("\n", " ")
    assert (
        "echocare_encoder.pth does not fit the encoder" in err
        and "168 unexpected (first: layers3.0.blocks.6" in err
        and "init_partial: true" in err
    )
    assert not (tmp_path / "run" / "best").exists()


def test_a_federation_job_starts_from_the_release_and_the_server_refuses_one_that_does_not_fit(
    tmp_path, release, site, capsys
):
    path, state = release
    job = Job(
        task="classification",
        classes=("benign", "malignant"),
        encoder=EncoderConfig(**ENCODER),
        train=LocalTraining(mode="lora", lora_rank=2, batch_size=4),
    )
    global_state = initial_state(job, str(path))
    assert all(torch.equal(global_state[f"encoder.{k}"], v) for k, v in state.items() if k != "mask_token")
    result = site_round(job, global_state, site, 1)
    assert set(result.shared) == set(shared_names(build_job_model(job), job))
    assert all(".lora_" in k or k.startswith("head.") for k in result.shared)  # the release itself never leaves
    other = dataclasses.replace(job, encoder=EncoderConfig(**ENCODER, depths=(2, 2, 6, 2)))
    fed = {
        "server": {"insecure": True},
        "output": str(tmp_path / "fed"),
        "init": str(path),
        "job": {
            "task": "classification",
            "classes": ["benign", "malignant"],
            "train": {"mode": "lora"},
            "encoder": {**ENCODER, "depths": list(other.encoder.depths)},
        },
    }
    (tmp_path / "federation.yaml").write_text(yaml.safe_dump(fed))
    assert server_main(["--config", str(tmp_path / "federation.yaml")]) == 2
    fed["job"] = {**fed["job"], "encoder": ENCODER, "base": "0" * 64}  # fits, but the job names other weights
    (tmp_path / "federation.yaml").write_text(yaml.safe_dump(fed))
    assert server_main(["--config", str(tmp_path / "federation.yaml")]) == 2
    assert f"is not the SHA-256 of init {path}" in capsys.readouterr().err.replace("\n", "")
    assert not (tmp_path / "fed").exists()  # nothing started, nothing written
    with pytest.raises(ConfigError, match="names base weights but init is empty"):
        load_config(FederationConfig, None, [], base={**fed, "init": None})


def test_pretraining_continues_from_the_release_and_exports_to_its_layout(tmp_path, pretrain_data):
    """Continued pretraining starts from the release (its mask token included); its checkpoint goes back to the
    release layout. A learning rate of 1e-12 keeps the weights where they started, to compare them."""
    from conftest import TINY_ENCODER, tiny_pretrain_cfg

    from echocare_core.checkpoint import latest_checkpoint
    from echocare_core.engine.pretrain import run_pretraining

    cfg = EncoderConfig(**TINY_ENCODER)
    torch.manual_seed(3)
    state = {**monai_twin(cfg).state_dict(), "mask_token": torch.randn(1, 1, 16)}
    torch.save(state, tmp_path / "release.pth")
    still = ["optim.steps=2", "optim.lr=1.0e-12", "optim.min_lr=1.0e-12", "optim.warmup_steps=0"]
    run = tiny_pretrain_cfg(pretrain_data, tmp_path / "run", still, init_weights=str(tmp_path / "release.pth"))
    assert run_pretraining(run).status == "finished"
    export_release(latest_checkpoint(tmp_path / "run" / "checkpoints"), tmp_path / "back.pth")
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    assert back.keys() == state.keys()
    for key, value in state.items():
        torch.testing.assert_close(back[key], value, atol=1e-8, rtol=0, msg=key)
    back.pop("mask_token")
    monai_twin(cfg).load_state_dict(back, strict=True)
