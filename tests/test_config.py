from dataclasses import dataclass, field
from typing import Literal

import pytest

from echocare_core.config import ConfigError, from_dict, load_config, save_config, to_dict
from echocare_core.engine.finetune_config import FinetuneConfig
from echocare_core.engine.pretrain_config import PretrainConfig


@dataclass(frozen=True)
class Inner:
    rate: float = 0.1
    mode: Literal["a", "b"] = "a"


@dataclass(frozen=True)
class Outer:
    name: str = "x"
    sizes: tuple[int, ...] = (1, 2)
    inner: Inner = field(default_factory=Inner)
    path: str | None = None


def test_unknown_key_names_path_and_suggests():
    with pytest.raises(ConfigError, match=r"unknown key 'inner.rat'.*Did you mean 'rate'"):
        from_dict(Outer, {"inner": {"rat": 0.2}})


def test_wrong_type_and_literal_are_named():
    with pytest.raises(ConfigError, match=r"inner.rate: expected a number, got 'fast'"):
        from_dict(Outer, {"inner": {"rate": "fast"}})
    with pytest.raises(ConfigError, match=r"inner.mode: 'c' is not allowed; choose one of \['a', 'b'\]"):
        from_dict(Outer, {"inner": {"mode": "c"}})
    with pytest.raises(ConfigError, match=r"sizes\[1\]: expected an integer"):
        from_dict(Outer, {"sizes": [1, 2.5]})


def test_overrides_parse_yaml_values_and_round_trip(tmp_path):
    file = tmp_path / "c.yaml"
    file.write_text("name: y\ninner:\n  rate: 0.5\n")
    cfg = load_config(Outer, file, ["inner.mode=b", "sizes=[3, 4]", "path=null"])
    assert cfg == Outer(name="y", sizes=(3, 4), inner=Inner(rate=0.5, mode="b"))
    save_config(cfg, tmp_path / "out.yaml")
    assert load_config(Outer, tmp_path / "out.yaml") == cfg
    assert not list(tmp_path.glob("*.tmp"))


def test_errors_start_with_the_file(tmp_path):
    file = tmp_path / "bad.yaml"
    file.write_text("inner: [1, 2]\n")
    with pytest.raises(ConfigError, match=r"^.*bad.yaml: inner: expected a mapping"):
        load_config(Outer, file)
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_config(Outer, tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(Outer, None, ["novalue"])


def test_pretrain_config_checks_values():
    base = {"data": {"sources": ["x"]}}
    with pytest.raises(ConfigError, match="batch_size=100 must be a multiple of micro_batch=32"):
        load_config(PretrainConfig, None, ["optim.batch_size=100"], base=base)
    with pytest.raises(ConfigError, match="unknown encoder variant 'echocre'.*Did you mean 'echocare'"):
        load_config(PretrainConfig, None, ["model.variant=echocre"], base=base)
    with pytest.raises(ConfigError, match="data.sources is empty"):
        load_config(PretrainConfig, None, [])
    cfg = load_config(PretrainConfig, None, ["model.variant=small"], base=base)
    assert to_dict(cfg)["model"]["variant"] == "small" and "arch" not in to_dict(cfg)["model"]


def test_shipped_example_configs_validate():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    from echocare_client.config import SiteConfig
    from echocare_server.config import FederationConfig

    kinds = {
        "pretrain": PretrainConfig,
        "site": FinetuneConfig,
        "federation": FederationConfig,
        "federated": SiteConfig,
    }
    shipped = sorted((root / "hospital_configs").glob("*.yaml"))
    assert len(shipped) >= 8
    for path in shipped:
        assert load_config(kinds[path.stem.split("_")[0]], path), path
