"""Shared fixtures: tiny synthetic data and tiny configs, so every test runs on 2 CPU cores."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from echocare_core.config import load_config
from echocare_core.engine.pretrain_config import PretrainConfig
from echocare_core.models.swin import EncoderConfig
from echocare_core.synthetic.dataset import write_dataset

TINY_ENCODER = dict(variant="test", in_chans=1, img_size=64, patch_size=2, window_size=4, drop_path=0.1)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)  # two pytest-driven processes must not fight over 2 cores


@pytest.fixture
def flower_task(monkeypatch):
    """What Flower sets in its ServerApp and ClientApp processes, for the apps called in-process."""
    from flwr.supercore.task_identity import TaskIdentity

    for key in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, key, 1)


@pytest.fixture(scope="session")
def pretrain_data(tmp_path_factory) -> list[Path]:
    """Two synthetic sites with anatomy labels (some partial, some missing), 64x64."""
    return write_dataset(tmp_path_factory.mktemp("synth"), "pretrain", sites=2, per_site=24, size=64, seed=3)


@pytest.fixture
def tiny_encoder_cfg() -> EncoderConfig:
    return EncoderConfig(**TINY_ENCODER)


def tiny_pretrain_dict(sources: list[Path], output: Path, **top) -> dict:
    """A pretrain.yaml as a mapping: a 'test' Swin at 64 px, 8-image micro-batches."""
    return {
        "output": str(output),
        "seed": 0,
        "device": "cpu",
        "log_every": 1,
        **top,
        "data": {"sources": [str(s) for s in sources], "num_workers": 0, "min_nonzero": 100},
        "model": dict(TINY_ENCODER),
        "mim": {"mask_ratio": 0.5, "mask_patch_size": 16},
        "optim": {"lr": 1e-3, "batch_size": 16, "micro_batch": 8, "steps": 6, "warmup_steps": 2},
        "checkpoint": {"every_steps": 3, "keep_last": 5},
    }


def tiny_pretrain_cfg(sources: list[Path], output: Path, overrides: list[str] | None = None, **top) -> PretrainConfig:
    return load_config(PretrainConfig, None, overrides, base=tiny_pretrain_dict(sources, output, **top))
