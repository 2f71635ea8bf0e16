"""federation.yaml and site.yaml: bad values are refused with the key named, before anything starts."""

import re

import pytest
import yaml

from echocare_client.cli import main as client_main
from echocare_client.config import SiteConfig
from echocare_core.config import ConfigError, load_config
from echocare_server.cli import main as server_main
from echocare_server.config import FederationConfig


def test_federation_config_checks(tmp_path):
    with pytest.raises(ConfigError, match="set server.keys to an echocare-keys folder and list server.allowed_sites"):
        load_config(FederationConfig, None, [], base={"server": {"insecure": False}})
    (tmp_path / "keys").mkdir()
    with pytest.raises(
        ConfigError,
        match=r"server.keys: missing .*ca.pem.*sites/site_a.pub; make them with: "
        r"echocare-keys --out .* --sites site_a",
    ):
        load_config(
            FederationConfig, None, [], base={"server": {"keys": str(tmp_path / "keys"), "allowed_sites": ["site_a"]}}
        )
    with pytest.raises(ConfigError, match="set root_certificates"):
        load_config(SiteConfig, None, [], base={"name": "a", "data": "d"})
    with pytest.raises(ConfigError, match="fedprox needs proximal_mu > 0"):
        load_config(FederationConfig, None, ["strategy.name=fedprox"], base={"server": {"insecure": True}})
    with pytest.raises(ConfigError, match="differential privacy does not support FedProx"):
        load_config(
            FederationConfig,
            None,
            ["strategy.name=fedprox", "job.proximal_mu=0.1", "job.train.privacy.epsilon=3"],
            base={"server": {"insecure": True}},
        )
    with pytest.raises(
        ConfigError, match=r"job.train.privacy: epsilon=-1(.0)?: must be >= 0 \(0: no differential privacy\)"
    ):
        load_config(FederationConfig, None, ["job.train.privacy.epsilon=-1"], base={"server": {"insecure": True}})
    with pytest.raises(ConfigError, match="job.train.mode"):
        load_config(FederationConfig, None, ["job.train.mode=partial"], base={"server": {"insecure": True}})
    (tmp_path / "federation.yaml").write_text(yaml.safe_dump({"server": {"insecure": True}, "rounds": {"rounds": 0}}))
    assert server_main(["--config", str(tmp_path / "federation.yaml")]) == 2
    for key, value, rule in (("expected_sites", -1, ">= 0 (0: min_sites)"), ("participation", 1.5, "in (0, 1]")):
        with pytest.raises(ConfigError, match=re.escape(f"rounds: {key}={value}: must be {rule}")):  # key, value, rule
            load_config(FederationConfig, None, [f"rounds.{key}={value}"], base={"server": {"insecure": True}})


def test_site_config_and_a_dataset_that_fails_the_check(tmp_path, capsys):
    with pytest.raises(ConfigError, match="name and data are required"):
        load_config(SiteConfig, None, [], base={"insecure": True})
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "dataset.yaml").write_text("name: x\ntask: segmentation\nlabels: {0: bg, 1: lesion}\n")
    (folder / "manifest.csv").write_text("image,mask\nmissing.png,missing_mask.png\n")
    site = {"name": "site_x", "insecure": True, "data": str(folder), "state_dir": str(tmp_path / "state")}
    (tmp_path / "site.yaml").write_text(yaml.safe_dump(site))
    assert client_main(["--config", str(tmp_path / "site.yaml")]) == 2
    assert "fails the dataset check with 2 problem(s)" in capsys.readouterr().err.replace("\n", "")
    assert not (tmp_path / "state").exists()  # nothing started, nothing written


def test_the_site_prints_its_ledger_and_refuses_to_start_when_it_was_edited(tmp_path, capsys):
    from echocare_core.privacy.ledger import PrivacyLedger, dataset_fingerprint
    from echocare_core.synthetic.dataset import write_dataset

    folder = write_dataset(tmp_path / "data", "segmentation", sites=1, per_site=6, size=64, seed=1)[0]
    site = {
        "name": "site_x",
        "insecure": True,
        "data": str(folder),
        "state_dir": str(tmp_path / "state"),
        "privacy": {"required": True, "epsilon_budget": 5.0},
    }
    (tmp_path / "site.yaml").write_text(yaml.safe_dump(site))
    assert client_main(["privacy", "--config", str(tmp_path / "site.yaml")]) == 0
    assert "no privacy ledger yet" in capsys.readouterr().err
    ledger = PrivacyLedger(tmp_path / "state" / "privacy", 5.0)
    ledger.record(dataset_fingerprint(folder), "f" * 64, 1, 1.2, 0.1, 30)
    assert client_main(["privacy", "--config", str(tmp_path / "site.yaml")]) == 0
    out = capsys.readouterr().out.replace("\n", " ")
    assert f"epsilon {ledger.spent(dataset_fingerprint(folder)):.3f} spent" in out and "budget 5" in out
    ledger.path.write_text(ledger.path.read_text().replace('"steps": 30', '"steps": 3'))
    assert client_main(["--config", str(tmp_path / "site.yaml")]) == 1
    assert "does not match its key" in capsys.readouterr().err.replace("\n", "")
    with pytest.raises(ConfigError, match="privacy.required is true but privacy.epsilon_budget is 0"):
        load_config(SiteConfig, None, [], base={**site, "privacy": {"required": True}})


def test_the_site_model_command_needs_its_arguments_and_names_what_is_wrong(tmp_path, capsys):
    from echocare_core.synthetic.dataset import write_dataset

    folder = write_dataset(tmp_path / "data", "segmentation", sites=1, per_site=6, size=64, seed=1)[0]
    site = {"name": "site_x", "insecure": True, "data": str(folder), "state_dir": str(tmp_path / "state")}
    (tmp_path / "site.yaml").write_text(yaml.safe_dump(site))
    with pytest.raises(SystemExit) as exc:
        client_main(["model", "--config", str(tmp_path / "site.yaml")])
    assert exc.value.code == 2 and "model needs --checkpoint and --out" in capsys.readouterr().err
    args = [
        "model",
        "--config",
        str(tmp_path / "site.yaml"),
        "--checkpoint",
        str(tmp_path / "nowhere"),
        "--out",
        str(tmp_path / "mine"),
    ]
    assert client_main(args) == 2
    assert "nowhere" in capsys.readouterr().err and not (tmp_path / "mine").exists()


def test_a_site_personalises_the_global_model_and_sees_both_scores(tmp_path, capsys):
    from conftest import TINY_ENCODER

    from echocare_core.checkpoint import read_meta
    from echocare_core.engine.training import LocalTraining
    from echocare_core.federation.job import Job
    from echocare_core.federation.rounds import initial_state, save_round
    from echocare_core.models.swin import EncoderConfig
    from echocare_core.synthetic.dataset import write_dataset

    folder = write_dataset(tmp_path / "data", "segmentation", sites=1, per_site=8, size=64, seed=1)[0]
    site = {"name": "site_x", "insecure": True, "data": str(folder), "state_dir": str(tmp_path / "state")}
    (tmp_path / "site.yaml").write_text(yaml.safe_dump(site))
    job = Job(labels=(0, 1), encoder=EncoderConfig(**TINY_ENCODER), feature_size=8, train=LocalTraining(mode="lora"))
    checkpoint = save_round(tmp_path / "run", job, initial_state(job, None), 3, {}, [])
    args = ["model", "--config", str(tmp_path / "site.yaml"), "--checkpoint", str(checkpoint)]
    with pytest.raises(SystemExit) as exc:
        client_main([*args, "--out", str(tmp_path / "mine"), "--personalise", "-1"])
    assert exc.value.code == 2 and "--personalise -1: epochs must be >= 0" in capsys.readouterr().err
    assert client_main([*args, "--out", str(tmp_path / "mine"), "--personalise", "1"]) == 0
    out = " ".join(capsys.readouterr().err.split())
    assert "site_x: validation split" in out and "personalised" in out and "dice" in out
    assert "personalised: 1 epoch(s) on this site's training split, without the job's DP: keep it at this site" in out
    assert read_meta(tmp_path / "mine")["site_model_of"] == {
        "checkpoint_job_hash": read_meta(checkpoint)["job_hash"],
        "round": 3,
        "personalised_epochs": 1,
    }
