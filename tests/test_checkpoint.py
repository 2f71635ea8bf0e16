import pickle
import re

import pytest
import timm
import torch
from safetensors.torch import save_file

from echocare_core.checkpoint import (build_from_checkpoint, latest_checkpoint, load_encoder_weights,
                                      load_train_state, prune_checkpoints, read_meta, save_checkpoint, unwrap)
from echocare_core.config import to_dict
from echocare_core.data.ontology import load_ontology
from echocare_core.models.pretrain import EchoCarePretrainModel
from echocare_core.models.swin import EncoderConfig, SwinEncoder


def _timm_swin(in_chans=3, window=4, num_classes=5):
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, in_chans=in_chans, img_size=64,
                             window_size=window, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4),
                             num_classes=num_classes).eval()


def _pretrain_model(cfg):
    return EchoCarePretrainModel(cfg, load_ontology())


def test_round_trip_rebuilds_the_model_from_the_checkpoint_alone(tmp_path, tiny_encoder_cfg):
    model = _pretrain_model(tiny_encoder_cfg)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 1, 64, 64), torch.ones(2, 16, 16), torch.tensor([-1, 3]))[0].backward()
    opt.step()
    meta = {"model_kind": "pretrain", "encoder": to_dict(tiny_encoder_cfg),
            "ontology": load_ontology().to_tree(), "step": 7}
    folder = save_checkpoint(tmp_path / "step_000007", model, meta, {"optimizer": opt.state_dict(), "step": 7})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000007"]  # no temp folder left
    rebuilt, meta2 = build_from_checkpoint(folder)
    assert meta2["step"] == 7 and meta2["format_version"] == 1 and "toolkit_version" in meta2
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


@pytest.mark.parametrize("wrappers", ["module._orig_mod.", "_orig_mod.module.", "_module.module."])
def test_timm_rgb_checkpoint_loads_into_grayscale_encoder(tmp_path, wrappers):
    ref = _timm_swin(in_chans=3)
    file = tmp_path / "swin_timm.pth"
    torch.save({"state_dict": {f"{wrappers}{k}": v for k, v in ref.state_dict().items()}}, file)
    enc = SwinEncoder(EncoderConfig(variant="test", img_size=64, window_size=4, drop_path=0.0)).eval()
    report = load_encoder_weights(enc, file)
    assert report.missing == []
    assert report.adapted == ["patch_embed.proj.weight"]
    assert set(report.unexpected) == {"head.fc.weight", "head.fc.bias"}
    gray = torch.rand(2, 1, 64, 64)
    with torch.no_grad():  # a gray image is R = G = B, so summing the stem's colours is exact
        torch.testing.assert_close(enc.forward_features(gray), ref.forward_features(gray.expand(-1, 3, -1, -1)),
                                   atol=1e-5, rtol=1e-5)


def test_original_swin_layout_and_simmim_prefix(tmp_path):
    ref = _timm_swin(in_chans=1, num_classes=0)
    original = {}
    for k, v in ref.state_dict().items():  # official Swin: downsample at the end of the previous stage
        k = re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k)
        original[f"encoder.{k}"] = v
    original["encoder.mask_token"] = torch.zeros(1, 1, 16)
    original["decoder.0.weight"] = torch.zeros(16, 128, 1, 1)
    save_file({k: v.contiguous() for k, v in original.items()}, str(tmp_path / "simmim.safetensors"))
    enc = SwinEncoder(EncoderConfig(variant="test", img_size=64, window_size=4, drop_path=0.0)).eval()
    report = load_encoder_weights(enc, tmp_path / "simmim.safetensors")
    assert report.missing == [] and "decoder.0.weight" in report.unexpected and "mask_token" in report.unexpected
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(enc.forward_features(x), ref.forward_features(x), atol=1e-5, rtol=1e-5)


def test_other_window_and_patch_sizes_are_resized(tmp_path):
    ref = _timm_swin(in_chans=1, window=4)
    enc = SwinEncoder(EncoderConfig(variant="test", img_size=64, window_size=8, patch_size=2))
    report = load_encoder_weights(enc, ref.state_dict())
    assert report.missing == []
    assert "patch_embed.proj.weight" in report.adapted
    assert "layers.0.blocks.0.attn.rel_pos.relative_position_bias_table" in report.adapted


def test_own_pretrain_checkpoint_feeds_an_encoder(tmp_path, tiny_encoder_cfg):
    model = _pretrain_model(tiny_encoder_cfg)
    save_checkpoint(tmp_path / "ck", model, {"model_kind": "pretrain"})
    enc = SwinEncoder(tiny_encoder_cfg)
    report = load_encoder_weights(enc, tmp_path / "ck")
    assert report.missing == []
    assert torch.equal(enc.patch_embed.proj.weight, model.encoder.patch_embed.proj.weight)


def test_pickled_objects_are_refused(tmp_path):
    file = tmp_path / "evil.pth"
    with file.open("wb") as f:
        pickle.dump({"weights": torch.zeros(1), "code": print}, f)
    with pytest.raises(ValueError, match="only tensor checkpoints are loaded"):
        load_encoder_weights(SwinEncoder(EncoderConfig(variant="test", img_size=64, window_size=4)), file)


def test_foreign_file_without_metadata_is_named(tmp_path):
    save_file({"x": torch.zeros(1)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(ValueError, match="no EchoCare metadata"):
        read_meta(tmp_path / "w.safetensors")
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        read_meta(tmp_path / "absent")
    with pytest.raises(ValueError, match="matches the encoder"):
        load_encoder_weights(SwinEncoder(EncoderConfig(variant="test", img_size=64, window_size=4)),
                             tmp_path / "w.safetensors")


def test_unwrap_removes_wrappers(tiny_encoder_cfg):
    enc = SwinEncoder(tiny_encoder_cfg)
    wrapped = torch.nn.Module()
    wrapped.module = torch.nn.Module()
    wrapped.module._orig_mod = enc
    assert unwrap(wrapped) is enc
