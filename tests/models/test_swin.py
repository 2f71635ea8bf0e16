"""The encoder is MONAI's `SwinTransformer(spatial_dims=2, use_v2=True)`: same state dict, same five outputs."""

import pytest
import torch
from monai.networks.nets.swin_unetr import SwinTransformer
from torch import nn

from echocare_core.models.swin import EncoderConfig, RelPosBias, SwinEncoder


def monai_twin(cfg: EncoderConfig) -> nn.Module:
    """MONAI's class with the same numbers, as the EchoCare authors build the release."""
    a = cfg.arch
    return SwinTransformer(
        in_chans=cfg.in_chans,
        embed_dim=a["embed_dim"],
        window_size=(cfg.window_size,) * 2,
        patch_size=(cfg.patch_size,) * 2,
        depths=a["depths"],
        num_heads=a["num_heads"],
        mlp_ratio=cfg.mlp_ratio,
        qkv_bias=True,
        spatial_dims=2,
        use_v2=True,
    )


def test_the_release_numbers_give_monais_keys_and_shapes():
    """The default encoder is the release: 358 tensors, 120.2 M parameters, exactly MONAI's names and shapes."""
    cfg = EncoderConfig()
    assert (cfg.variant, cfg.in_chans, cfg.img_size, cfg.patch_size, cfg.window_size) == ("echocare", 3, 256, 2, 8)
    assert cfg.stage_channels == [128, 256, 512, 1024, 2048] and cfg.stage_resolutions == [128, 64, 32, 16, 8]
    with torch.device("meta"):
        ours = SwinEncoder(cfg).state_dict()
    torch.manual_seed(0)
    ref = monai_twin(cfg).state_dict()
    assert len(ref) == 358 and list(ours) == list(ref)
    assert all(ours[k].shape == ref[k].shape and ours[k].dtype == ref[k].dtype for k in ref)
    assert sum(v.numel() for k, v in ref.items() if not k.endswith("index")) == pytest.approx(120.22e6, rel=1e-4)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(variant="test", img_size=64, window_size=4, in_chans=3),  # shifted windows in stages 1-3
        dict(variant="test", img_size=64, window_size=8, in_chans=1),  # stages 3-4 smaller than the window
        dict(variant="mini", img_size=128, window_size=8, in_chans=3),  # two blocks per stage
    ],
)
def test_all_five_outputs_equal_monais_on_the_same_weights(kwargs, fused):
    torch.manual_seed(0)
    cfg = EncoderConfig(drop_path=0.0, fused_attn=fused, **kwargs)
    ref = monai_twin(cfg).eval()
    enc = SwinEncoder(cfg).eval()
    enc.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, cfg.in_chans, cfg.img_size, cfg.img_size)
    with torch.no_grad():
        expected, got = ref(x), enc.forward_intermediates(x, intermediates_only=True)
        final = enc.forward_features(x)
    assert [tuple(t.shape[1:]) for t in got] == [(c, r, r) for c, r in zip(cfg.stage_channels, cfg.stage_resolutions)]
    # float32 rounding; fused attention sums in another order, which grows to ~1e-5 by the last stage of `mini`
    atol = 3e-5 if fused else 1e-5
    for i, (a, b) in enumerate(zip(got, expected)):
        torch.testing.assert_close(a, b, atol=atol, rtol=1e-5, msg=f"output {i}")
    torch.testing.assert_close(final, expected[-1].permute(0, 2, 3, 1), atol=atol, rtol=1e-5)


def test_timm_style_api_and_finite_backward():
    cfg = EncoderConfig(variant="test", img_size=64, window_size=4, in_chans=1)
    enc = SwinEncoder(cfg)
    x = torch.randn(2, 1, 64, 64)
    final, feats = enc.forward_intermediates(x)
    assert len(feats) == 5 and final.shape == (2, 2, 2, enc.num_features) and enc.num_features == 256
    with torch.no_grad():
        enc.eval()  # no drop-path: both calls see the same network
        early = enc.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
        every = enc.forward_intermediates(x)[1]
        enc.train()
    assert len(early) == 2 and all(torch.equal(a, b) for a, b in zip(early, every[:2]))
    assert [f.shape for f in enc.forward_intermediates(x, indices=1, intermediates_only=True)] == [feats[-1].shape]
    with pytest.raises(ValueError, match="outputs are 0..4"):
        enc.forward_intermediates(x, indices=[5])
    enc(x).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in enc.parameters())


def test_batch_dimension_stays_the_batch_dimension():
    """Every parametrised layer sees the true batch first, so per-sample gradients are per image; the bias table
    is read in one call of the attention module, on per-sample logits."""
    enc = SwinEncoder(EncoderConfig(variant="test", img_size=64, window_size=4, in_chans=1, fused_attn=False))
    seen = []
    for m in enc.modules():
        if isinstance(m, (nn.Linear, nn.LayerNorm, nn.Conv2d, RelPosBias)):
            m.register_forward_hook(lambda mod, inp, out: seen.append((type(mod).__name__, inp[0].shape[0])))
    enc(torch.randn(5, 1, 64, 64))
    assert {name for name, _ in seen} == {"Linear", "LayerNorm", "Conv2d", "RelPosBias"}
    assert all(b == 5 for _, b in seen), seen


def test_samples_do_not_interact():
    enc = SwinEncoder(EncoderConfig(variant="test", img_size=64, window_size=4, in_chans=1, fused_attn=False)).eval()
    x = torch.randn(4, 1, 64, 64)
    with torch.no_grad():
        full = enc(x)
        alone = torch.cat([enc(x[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(full, alone, atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    cfg = dict(variant="test", img_size=64, window_size=4, in_chans=1, drop_path=0.0)
    plain = SwinEncoder(EncoderConfig(**cfg))
    ckpt = SwinEncoder(EncoderConfig(**cfg, grad_checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 1, 64, 64)
    plain(x).square().sum().backward()
    ckpt(x).square().sum().backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(variant="huge"), "unknown encoder variant 'huge'"),
        (dict(variant="echocre"), "Did you mean 'echocare'"),
        (dict(in_chans=2), "in_chans=2"),
        (dict(img_size=100), "img_size=100 must be a multiple of patch_size"),
        (dict(img_size=96, window_size=5), "window_size=5 does not divide"),
        (dict(drop_path=1.5), "drop_path=1.5"),
        (dict(depths=(2, 2, 2)), "need 4 entries"),
        (dict(input_std=0.0), "input_std=0.0"),
    ],
)
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EncoderConfig(**{"variant": "test", "img_size": 64, "window_size": 4, **kwargs})
