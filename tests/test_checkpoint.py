"""The toolkit's own checkpoints: written atomically, rebuilt from the folder alone, pruned, and refused by name when
they are of another format."""

import pytest
import torch

from echocare_core.checkpoint import (
    build_from_checkpoint,
    latest_checkpoint,
    load_train_state,
    prune_checkpoints,
    read_meta,
    save_checkpoint,
    unwrap,
)
from echocare_core.config import to_dict
from echocare_core.data.ontology import load_ontology
from echocare_core.models.pretrain import EchoCarePretrainModel
from echocare_core.models.swin import SwinEncoder


def _pretrain_model(cfg):
    return EchoCarePretrainModel(cfg, load_ontology())


def test_round_trip_rebuilds_the_model_from_the_checkpoint_alone(tmp_path, tiny_encoder_cfg):
    model = _pretrain_model(tiny_encoder_cfg)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 1, 64, 64), torch.ones(2, 32, 32), torch.tensor([-1, 3]))[0].backward()
    opt.step()
    meta = {
        "model_kind": "pretrain",
        "encoder": to_dict(tiny_encoder_cfg),
        "ontology": load_ontology().to_tree(),
        "step": 7,
    }
    folder = save_checkpoint(tmp_path / "step_000007", model, meta, {"optimizer": opt.state_dict(), "step": 7})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000007"]  # no temp folder left
    rebuilt, meta2 = build_from_checkpoint(folder)
    assert meta2["step"] == 7 and meta2["format_version"] == 2 and "toolkit_version" in meta2
    # the safetensors header alone describes the model too
    assert read_meta(folder / "model.safetensors")["encoder"] == meta["encoder"]
    for (k, a), b in zip(model.state_dict().items(), rebuilt.state_dict().values()):
        assert torch.equal(a, b), k
    state = load_train_state(folder)
    opt2 = torch.optim.AdamW(rebuilt.parameters())
    opt2.load_state_dict(state["optimizer"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    # saving again over the same step replaces it atomically
    save_checkpoint(folder, model, {**meta, "step": 8})
    assert read_meta(folder)["step"] == 8


def test_latest_and_prune(tmp_path, tiny_encoder_cfg):
    enc = SwinEncoder(tiny_encoder_cfg)
    for step in (3, 10, 6):
        save_checkpoint(tmp_path / f"step_{step:06d}", enc, {"step": step})
    (tmp_path / "step_000099").mkdir()  # incomplete: no meta.json
    assert latest_checkpoint(tmp_path).name == "step_000010"
    prune_checkpoints(tmp_path, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000010", "step_000099"]
    assert latest_checkpoint(tmp_path / "nothing") is None


def test_unwrap_removes_wrappers(tiny_encoder_cfg):
    enc = SwinEncoder(tiny_encoder_cfg)
    wrapped = torch.nn.Module()
    wrapped.module = torch.nn.Module()
    wrapped.module._orig_mod = enc
    assert unwrap(wrapped) is enc


def test_a_checkpoint_of_the_former_encoder_layout_is_refused_by_name(tmp_path, tiny_encoder_cfg, pretrain_data):
    from conftest import tiny_pretrain_cfg

    from echocare_core.checkpoint import CheckpointFormatError
    from echocare_core.engine.pretrain import run_pretraining

    old = save_checkpoint(
        tmp_path / "run" / "checkpoints" / "step_000004",
        SwinEncoder(tiny_encoder_cfg),
        {"format_version": 1, "toolkit_version": "0.1.0", "model_kind": "pretrain"},
    )
    with pytest.raises(
        CheckpointFormatError, match=r"echocare 0.1.0 with the former Swin layout \(checkpoint format 1"
    ):
        read_meta(old)
    with pytest.raises(CheckpointFormatError):  # a run folder of the old layout is not started over
        run_pretraining(tiny_pretrain_cfg(pretrain_data, tmp_path / "run"))
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step_000004"]
