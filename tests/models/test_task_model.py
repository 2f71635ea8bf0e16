import dataclasses

import pytest
import torch

from echocare_core.models.lora import LoRALinear, apply_finetune_mode, count_trainable
from echocare_core.tasks.model import EchoCareTaskModel


@pytest.mark.parametrize("patch,size", [(2, 64), (4, 128)])
def test_segmentation_head_gives_full_resolution_logits(tiny_encoder_cfg, patch, size):
    cfg = dataclasses.replace(tiny_encoder_cfg, patch_size=patch, img_size=size)
    model = EchoCareTaskModel(cfg, "segmentation", num_classes=3, feature_size=8)
    x = torch.randn(2, 1, size, size)
    out = model(x)
    assert out.shape == (2, 3, size, size)
    out.square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert not any(getattr(m, "inplace", False) for m in model.modules())
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_classification_head(tiny_encoder_cfg):
    model = EchoCareTaskModel(tiny_encoder_cfg, "classification", num_classes=4)
    assert model(torch.randn(3, 1, 64, 64)).shape == (3, 4)
    with pytest.raises(ValueError, match="unknown task 'ranking'"):
        EchoCareTaskModel(tiny_encoder_cfg, "ranking", 2)


@pytest.mark.parametrize("mode", ["full", "frozen", "lora"])
def test_finetune_modes_train_what_they_say(tiny_encoder_cfg, mode):
    torch.manual_seed(0)
    model = EchoCareTaskModel(tiny_encoder_cfg, "classification", num_classes=2)
    x = torch.randn(2, 1, 64, 64)
    model.eval()
    before = model(x).detach()
    apply_finetune_mode(model, mode, lora_rank=4)
    after = model(x).detach()
    torch.testing.assert_close(before, after)  # LoRA starts as the identity change
    trainable, total = count_trainable(model)
    head = sum(p.numel() for p in model.head.parameters())
    if mode == "full":
        assert trainable == total
    elif mode == "frozen":
        assert trainable == head
    else:
        loras = [m for m in model.modules() if isinstance(m, LoRALinear)]
        assert len(loras) == 2 * 4  # qkv and proj in each of the 4 blocks
        assert head < trainable < 0.2 * total
        model.train()
        model(x).sum().backward()
        assert all(m.weight.grad is None and m.lora_B.weight.grad is not None for m in loras)
        assert "encoder.layers1.0.blocks.0.attn.qkv.weight" in model.state_dict()
    with pytest.raises(ValueError, match="choose one of full, frozen, lora"):
        apply_finetune_mode(model, "partial")


def test_segmentation_needs_a_deepest_map_above_one_pixel(tiny_encoder_cfg):
    cfg = dataclasses.replace(tiny_encoder_cfg, img_size=32)
    with pytest.raises(ValueError, match="need img_size >= 64"):
        EchoCareTaskModel(cfg, "segmentation", num_classes=2)
