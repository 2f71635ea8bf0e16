"""Encoder weights in: the EchoCare release layout, SwinUNETR and the toolkit's checkpoints load exactly or not at
all; out: the release layout that MONAI's class loads strictly."""

import dataclasses

import pytest
import torch
from models.test_swin import monai_twin
from safetensors.torch import save_file

from echocare_core.checkpoint import read_meta, save_checkpoint
from echocare_core.config import to_dict
from echocare_core.data.ontology import load_ontology
from echocare_core.models.lora import apply_finetune_mode
from echocare_core.models.pretrain import EchoCarePretrainModel
from echocare_core.models.swin import EncoderConfig, SwinEncoder
from echocare_core.tasks.model import EchoCareTaskModel
from echocare_core.weights import WeightsMismatch, load_encoder_weights

RELEASE_LIKE = dict(variant="test", img_size=64, window_size=4, in_chans=3, drop_path=0.0)


def _release_file(tmp_path, cfg: EncoderConfig, name="echocare.pth", **kwargs):
    """A file laid out as the authors ship the release: MONAI's state dict plus `mask_token`, torch.save'd."""
    torch.manual_seed(1)
    ref = monai_twin(dataclasses.replace(cfg, **kwargs)).eval()
    state = {**ref.state_dict(), "mask_token": torch.randn(1, 1, ref.embed_dim)}
    torch.save(state, tmp_path / name)
    return tmp_path / name, ref, state


def test_the_release_layout_loads_exactly_with_its_mask_token(tmp_path):
    cfg = EncoderConfig(**RELEASE_LIKE)
    file, ref, state = _release_file(tmp_path, cfg)
    enc = SwinEncoder(cfg).eval()
    report = load_encoder_weights(enc, file)
    assert report.complete and report.matched == report.total == len(state) - 1 and report.other == []
    assert torch.equal(report.mask_token, state["mask_token"].reshape(-1))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(enc.forward_intermediates(x, intermediates_only=True), ref(x)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("prefix", ["swinViT.", "module.swinViT.", "_orig_mod.module.encoder."])
def test_swinunetr_and_wrapped_checkpoints_load(tmp_path, prefix):
    cfg = EncoderConfig(**RELEASE_LIKE)
    _, ref, state = _release_file(tmp_path, cfg)
    decoder = {"encoder1.layer.conv1.conv.weight": torch.zeros(2, 3, 3, 3), "out.conv.conv.weight": torch.zeros(1)}
    nested = {
        "state_dict": {
            **{prefix + k: v for k, v in ref.state_dict().items()},
            **{prefix.replace("swinViT.", "").replace("encoder.", "") + k: v for k, v in decoder.items()},
        }
    }
    torch.save(nested, tmp_path / "swinunetr.pt")
    enc = SwinEncoder(cfg)
    report = load_encoder_weights(enc, tmp_path / "swinunetr.pt")
    assert report.complete and sorted(report.other) == sorted(decoder) and report.mask_token is None
    assert torch.equal(enc.layers4c[0].layer.conv2.conv.weight, state["layers4c.0.layer.conv2.conv.weight"])


def test_a_file_that_fits_only_in_part_stops_unless_partial_loading_is_asked_for(tmp_path):
    cfg = EncoderConfig(**RELEASE_LIKE)
    file, _, _ = _release_file(tmp_path, cfg, window_size=8)  # other bias tables
    enc = SwinEncoder(cfg)
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    with pytest.raises(
        WeightsMismatch,
        match=r"echocare.pth does not fit the encoder .*window 4.*: 70 of the "
        r"encoder's 78 tensors loaded; 8 of another shape \(first: "
        r"layers1.0.blocks.0.attn.relative_position_bias_table: file \(225, 1\), "
        r"encoder \(49, 1\).*set init_partial: true",
    ) as exc:
        load_encoder_weights(enc, file)
    assert isinstance(exc.value, ValueError)
    assert all(torch.equal(v, enc.state_dict()[k]) for k, v in before.items())  # nothing loaded
    report = load_encoder_weights(enc, file, partial=True)
    assert report.matched == 70 and len(report.reshaped) == 8 and not report.complete
    deeper = SwinEncoder(dataclasses.replace(cfg, depths=(1, 1, 2, 1)))
    with pytest.raises(WeightsMismatch, match=r"14 missing \(first: layers3.0.blocks.1.norm1.weight"):
        load_encoder_weights(deeper, file)


def test_three_channel_weights_serve_a_grayscale_encoder_exactly(tmp_path):
    file, ref, _ = _release_file(tmp_path, EncoderConfig(**RELEASE_LIKE))
    gray = SwinEncoder(EncoderConfig(**{**RELEASE_LIKE, "in_chans": 1})).eval()
    report = load_encoder_weights(gray, file)
    assert report.complete and report.adapted == ["patch_embed.proj.weight (3 -> 1 channels)"]
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(
            gray.forward_intermediates(x, intermediates_only=True)[-1],
            ref(x.expand(-1, 3, -1, -1))[-1],
            atol=1e-5,
            rtol=1e-5,
        )


def test_own_pretrain_checkpoint_feeds_an_encoder(tmp_path, tiny_encoder_cfg):
    model = EchoCarePretrainModel(tiny_encoder_cfg, load_ontology())
    save_checkpoint(tmp_path / "ck", model, {"model_kind": "pretrain"})
    enc = SwinEncoder(tiny_encoder_cfg)
    report = load_encoder_weights(enc, tmp_path / "ck")
    assert report.missing == []
    assert torch.equal(enc.patch_embed.proj.weight, model.encoder.patch_embed.proj.weight)


def test_code_a_damaged_file_and_another_model_each_get_their_own_message(tmp_path):
    enc = SwinEncoder(EncoderConfig(**RELEASE_LIKE))
    evil = tmp_path / "evil.pth"
    torch.save({"weights": torch.zeros(1), "code": print}, evil)
    with pytest.raises(ValueError, match="evil.pth holds pickled code or objects, not only tensors"):
        load_encoder_weights(enc, evil)
    file, _, _ = _release_file(tmp_path, EncoderConfig(**RELEASE_LIKE))
    cut = tmp_path / "cut.pth"
    cut.write_bytes(file.read_bytes()[: len(file.read_bytes()) // 2])
    with pytest.raises(ValueError, match="cut.pth is cut short or damaged .*compare its SHA-256"):
        load_encoder_weights(enc, cut)
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 512)}, tmp_path / "resnet.pth")
    with pytest.raises(ValueError, match=r"resnet.pth holds no weights of an EchoCare .* none of its 2 tensors"):
        load_encoder_weights(enc, tmp_path / "resnet.pth")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(ValueError, match="no EchoCare metadata"):
        read_meta(tmp_path / "w.safetensors")
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        read_meta(tmp_path / "absent")


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_export_writes_the_release_layout_that_monai_loads_strictly(tmp_path, mode):
    cfg = EncoderConfig(**RELEASE_LIKE)
    model = EchoCareTaskModel(cfg, "segmentation", 2, feature_size=4)
    apply_finetune_mode(model, mode, lora_rank=2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # LoRA's B starts at zero: make the adapters count
    save_checkpoint(
        tmp_path / "best",
        model,
        {
            "model_kind": "task",
            "task": "segmentation",
            "encoder": to_dict(cfg),
            "head": {"num_classes": 2, "feature_size": 4, "multi_label": False},
            "finetune": {"mode": mode, "lora_rank": 2, "lora_alpha": 16.0},
        },
    )
    from echocare_core.cli.export import main as export_main

    assert export_main([str(tmp_path / "best"), "--out", str(tmp_path / "out" / "encoder.pth")]) == 0
    state = torch.load(tmp_path / "out" / "encoder.pth", weights_only=True)
    assert state.pop("mask_token").shape == (1, 1, 16)
    ref = monai_twin(cfg).eval()
    ref.load_state_dict(state, strict=True)
    fresh = SwinEncoder(cfg).eval()  # the checkpoint as a new run's init: the adapters merged the same way
    assert load_encoder_weights(fresh, tmp_path / "best").complete
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ours = model.eval().encoder.forward_intermediates(x, intermediates_only=True)
        for a, b, c in zip(ours, ref(x), fresh.forward_intermediates(x, intermediates_only=True)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)
    assert export_main([str(tmp_path / "nothing"), "--out", str(tmp_path / "x.pth")]) == 2
