import pytest
import timm
import torch
from torch import nn

from echocare_core.checkpoint import load_encoder_weights
from echocare_core.models.swin import EncoderConfig, RelPosBias, SwinEncoder, WindowAttention


def _timm_twin(cfg: EncoderConfig, in_chans: int | None = None) -> nn.Module:
    a = cfg.arch
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, in_chans=in_chans or cfg.in_chans,
                             img_size=cfg.img_size, patch_size=cfg.patch_size, window_size=cfg.window_size,
                             embed_dim=a["embed_dim"], depths=a["depths"], num_heads=a["num_heads"],
                             num_classes=0).eval()


@pytest.mark.parametrize("patch,size", [(4, 64), (2, 64), (4, 128)])
@pytest.mark.parametrize("chans", [1, 3])
def test_shapes_and_finite_backward(patch, size, chans):
    cfg = EncoderConfig(variant="test", img_size=size, patch_size=patch, window_size=4, in_chans=chans)
    enc = SwinEncoder(cfg)
    x = torch.randn(2, chans, size, size)
    final, feats = enc.forward_intermediates(x)
    assert [tuple(f.shape[1:]) for f in feats] == [
        (c, r, r) for c, r in zip(cfg.stage_channels, cfg.stage_resolutions)]
    assert final.shape == (2, cfg.stage_resolutions[-1], cfg.stage_resolutions[-1], enc.num_features)
    with torch.no_grad():
        enc.eval()  # no drop-path: both calls see the same network
        early = enc.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
        every = enc.forward_intermediates(x)[1]
        enc.train()
    assert len(early) == 2 and all(torch.equal(a, b) for a, b in zip(early, every[:2]))
    assert [f.shape for f in enc.forward_intermediates(x, indices=1, intermediates_only=True)] == [feats[-1].shape]
    with pytest.raises(ValueError, match="stages are 0..3"):
        enc.forward_intermediates(x, indices=[4])
    enc(x).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in enc.parameters())


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("variant,size", [("test", 64), ("mini", 128)])  # mini has shifted-window blocks
def test_matches_timm_swin_with_timm_weights(fused, variant, size):
    cfg = EncoderConfig(variant=variant, img_size=size, window_size=4, drop_path=0.0, fused_attn=fused)
    ref = _timm_twin(cfg)
    enc = SwinEncoder(cfg).eval()
    report = load_encoder_weights(enc, ref.state_dict())
    assert report.missing == [] and report.unexpected == []
    assert any(block.shift for stage in enc.layers for block in stage.blocks) == (variant == "mini")
    x = torch.randn(2, 1, size, size)
    with torch.no_grad():
        torch.testing.assert_close(enc.forward_features(x), ref.forward_features(x), atol=1e-5, rtol=1e-5)


def test_batch_dimension_stays_the_batch_dimension():
    """Every parametrised layer sees the true batch first, so per-sample gradients are per image."""
    enc = SwinEncoder(EncoderConfig(variant="test", img_size=64, window_size=4, fused_attn=False))
    seen = []
    for m in enc.modules():
        if isinstance(m, (nn.Linear, nn.LayerNorm, nn.Conv2d, RelPosBias)):
            m.register_forward_hook(lambda mod, inp, out: seen.append((type(mod).__name__, inp[0].shape[0])))
    enc(torch.randn(5, 1, 64, 64))
    assert seen and all(b == 5 for _, b in seen), seen
    # the bias table lives alone (no buffer beside a trainable parameter, Opacus' requirement)
    for m in enc.modules():
        if isinstance(m, RelPosBias):
            assert list(m.buffers()) == []
        if isinstance(m, WindowAttention):
            assert list(m.parameters(recurse=False)) == []


def test_samples_do_not_interact():
    enc = SwinEncoder(EncoderConfig(variant="test", img_size=64, window_size=4, fused_attn=False)).eval()
    x = torch.randn(4, 1, 64, 64)
    with torch.no_grad():
        full = enc(x)
        alone = torch.cat([enc(x[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(full, alone, atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = SwinEncoder(EncoderConfig(variant="test", img_size=64, window_size=4, drop_path=0.0))
    ckpt = SwinEncoder(EncoderConfig(variant="test", img_size=64, window_size=4, drop_path=0.0,
                                     grad_checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 1, 64, 64)
    plain(x).square().sum().backward()
    ckpt(x).square().sum().backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("kwargs,match", [
    (dict(variant="huge"), "unknown encoder variant 'huge'"),
    (dict(in_chans=2), "in_chans=2"),
    (dict(img_size=100), "img_size=100 must be a multiple of"),
    (dict(img_size=96, window_size=5), "window_size=5 does not divide"),
    (dict(drop_path=1.5), "drop_path=1.5"),
])
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EncoderConfig(**{"variant": "test", **kwargs})


def test_named_variants_build():
    cfg = EncoderConfig(variant="base")
    assert cfg.arch == dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))
    assert cfg.stride == 32 and cfg.stage_resolutions == [64, 32, 16, 8]
    assert EncoderConfig(variant="large", patch_size=2).stage_resolutions == [128, 64, 32, 16]
