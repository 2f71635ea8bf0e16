"""federation.yaml and site.yaml: bad values are refused with the key named, before anything starts."""

import pytest
import yaml

from echocare_client.cli import main as client_main
from echocare_client.config import SiteConfig
from echocare_core.config import ConfigError, load_config
from echocare_server.cli import main as server_main
from echocare_server.config import FederationConfig


def test_federation_config_checks(tmp_path):
    with pytest.raises(ConfigError, match="TLS and site keys are not built yet"):
        load_config(FederationConfig, None, [], base={"server": {"insecure": False}})
    with pytest.raises(ConfigError, match="fedprox needs proximal_mu > 0"):
        load_config(FederationConfig, None, ["strategy.name=fedprox"], base={"server": {"insecure": True}})
    with pytest.raises(ConfigError, match="job.mode"):
        load_config(FederationConfig, None, ["job.mode=partial"], base={"server": {"insecure": True}})
    (tmp_path / "federation.yaml").write_text(yaml.safe_dump({"server": {"insecure": True}, "rounds": {"rounds": 0}}))
    assert server_main(["--config", str(tmp_path / "federation.yaml")]) == 2


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
