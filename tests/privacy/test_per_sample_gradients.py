"""DP-SGD is only as good as its per-sample gradients: for the EchoCare encoder (MONAI's v2 layout, conv blocks
included) with every head and every fine-tuning mode, each trainable parameter's per-sample gradient (Opacus
hooks plus our rules for the relative-position bias and for non-contiguous conv input, a clip's frames and a
report's views folded into their sample) equals the gradient of that sample alone, in float64."""

import dataclasses

import pytest
import torch
from conftest import TINY_ENCODER
from torch import nn

from echocare_core.data.text import ReportTokenizer
from echocare_core.engine.training import check_dataset, num_classes
from echocare_core.models.lora import apply_finetune_mode
from echocare_core.models.report import ReportHeadConfig
from echocare_core.models.swin import EncoderConfig
from echocare_core.privacy.dp import DPSettings, DPTraining, PrivacyError
from echocare_core.synthetic.dataset import write_dataset
from echocare_core.tasks import get_task
from echocare_core.tasks.dataset import TaskDataset, collate_task, split_rows
from echocare_core.tasks.model import EchoCareTaskModel

ENCODER = EncoderConfig(**{**TINY_ENCODER, "drop_path": 0.0})
TASKS = ("classification", "segmentation", "landmarks", "detection", "enhancement", "regression", "report")
FRAMES, TOKENIZER = 2, ReportTokenizer(max_tokens=12)
REPORT = ReportHeadConfig(width=8, heads=2, depth=1, max_tokens=12, views=2)  # two views: the encoder sees 2B rows


def _close(got, want, task, rtol, msg):
    """Equal to float64 rounding; for enhancement to float32 rounding of the tensor's scale: MONAI's SSIM (its
    loss) computes in float32 whatever its input, while a wrong per-sample gradient is off by its own size."""
    atol = 1e-5 * float(want.abs().max()) if task == "enhancement" else 1e-10
    torch.testing.assert_close(got, want, rtol=1e-5 if task == "enhancement" else rtol, atol=atol, msg=msg)


@pytest.fixture(scope="module")
def batches(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dp")
    out = {}
    for task in TASKS:
        folder = write_dataset(tmp / task, task, sites=1, per_site=6, size=64, seed=3)[0]
        spec = check_dataset(folder)
        rows = split_rows(folder, "train") + split_rows(folder, "val")
        ds = TaskDataset(
            folder,
            spec,
            rows[:3],
            64,
            1,
            True,
            ENCODER.scale,
            frames=FRAMES,
            tokenizer=TOKENIZER if task == "report" else None,
            views=REPORT.views,
        )
        out[task] = (spec, collate_task([ds[(0, i)] for i in range(3)]), ds.images_per_sample)
    return out


def _sample(target, i):
    return [target[i]] if isinstance(target, list) else target[i : i + 1]


def _case(batches, task, mode, decoder="unetr"):
    """A float64 model in `mode` for `task`, its forward, non-contiguous images, targets, loss and images per
    sample."""
    spec, batch, per_sample = batches[task]
    torch.manual_seed(0)
    report = dataclasses.replace(REPORT, findings=spec.findings)
    model = EchoCareTaskModel(
        ENCODER,
        task,
        num_classes(spec, TOKENIZER),
        feature_size=4,
        multi_label=spec.multi_label,
        target_stats=(50.0, 10.0),
        report=report,
        decoder=decoder,
    )
    apply_finetune_mode(model, mode, lora_rank=2)
    model.double()
    for p in model.parameters():  # LoRA's B starts at zero, which would hide errors in A's gradients
        if p.requires_grad:
            p.data.add_(torch.randn_like(p) * 0.02)
    images = batch["image"].double().transpose(-1, -2).contiguous().transpose(-1, -2)  # non-contiguous input
    target = [t.double() for t in batch["target"]] if isinstance(batch["target"], list) else batch["target"]
    if task in ("landmarks", "enhancement", "regression"):
        target = target.double()
    if task == "report":

        def forward(m, x, t):
            return tuple(o.double() for o in m(x, t))  # teacher forcing: the model reads the report
    else:

        def forward(m, x, t):
            return m(x)

    return model, forward, images, target, get_task(spec.task).loss(spec, (50.0, 10.0), TOKENIZER, report), per_sample


def _single_sample_gradients(model, forward, images, target, loss_fn):
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return named, [
        torch.autograd.grad(
            loss_fn(forward(model, images[i : i + 1], _sample(target, i)), _sample(target, i)), [p for _, p in named]
        )
        for i in range(len(images))
    ]


@pytest.mark.parametrize("mode", ["full", "frozen", "lora"])
@pytest.mark.parametrize(
    "task,decoder", [(t, "unetr") for t in TASKS] + [("segmentation", "light"), ("detection", "light")]
)
def test_per_sample_gradients_equal_single_sample_gradients(batches, task, decoder, mode):
    model, forward, images, target, loss_fn, per_sample = _case(batches, task, mode, decoder)
    dp = DPTraining(
        model,
        torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1),
        DPSettings(epsilon=1.0),
        sigma=0.0,
        expected_batch_size=3,
        images_per_sample=per_sample,
    )
    loss_fn(forward(dp.module, images, target), target).backward()
    dp.check(3)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    got = {n: p.grad_sample.clone() for n, p in named}
    dp.module.disable_hooks()
    named, reference = _single_sample_gradients(model, forward, images, target, loss_fn)
    for i, grads in enumerate(reference):
        for (name, _), g in zip(named, grads):
            _close(got[name][i], g, task, 1e-8, f"{name}, sample {i}")


@pytest.mark.parametrize("grad_mode", ["hooks", "ghost"])
@pytest.mark.parametrize("mode", ["full", "lora"])
@pytest.mark.parametrize("task", TASKS)
def test_the_clipped_update_is_the_mean_of_clipped_single_sample_gradients(batches, task, mode, grad_mode):
    model, forward, images, target, loss_fn, per_sample = _case(batches, task, mode)
    named, reference = _single_sample_gradients(model, forward, images, target, loss_fn)
    norms = torch.stack([torch.cat([g.flatten() for g in grads]).norm() for grads in reference])
    clip = float(norms.median())  # some samples are clipped, some are not
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    expected = [sum(f * grads[j] for f, grads in zip(factors, reference)) / 3 for j in range(len(named))]
    settings = DPSettings(epsilon=1.0, max_grad_norm=clip, mode=grad_mode)
    optimizer = torch.optim.SGD([p for _, p in named], lr=0.1)
    if grad_mode == "ghost" and per_sample > 1:  # per-image norms do not add up to a sample's
        with pytest.raises(ValueError, match="use mode hooks"):
            DPTraining(model, optimizer, settings, 0.0, 3, per_sample)
        return
    dp = DPTraining(model, optimizer, settings, sigma=0.0, expected_batch_size=3, images_per_sample=per_sample)
    dp.loss(loss_fn, forward(dp.module, images, target), target).backward()
    dp.check(3)
    dp.optimizer.pre_step()  # clip, add (zero) noise, average
    for (name, p), e in zip(named, expected):
        _close(p.grad, e, task, 1e-7, name)
    trained = {n for n, _ in named}
    if mode == "lora":
        assert {
            "encoder.layers1.0.blocks.0.attn.qkv.lora_A.weight",
            "encoder.layers4.0.blocks.0.attn.proj.lora_B.weight",
        } <= trained
    if mode == "full":
        assert {
            "encoder.layers1.0.blocks.0.attn.rel_pos.relative_position_bias_table",
            "encoder.layers2c.0.layer.conv1.conv.weight",
            "encoder.patch_embed.proj.weight",
        } <= trained


def test_a_gradient_that_is_not_per_sample_stops_training():
    model = nn.Linear(3, 2)
    dp = DPTraining(model, torch.optim.SGD(model.parameters(), lr=0.1), DPSettings(epsilon=1.0), 1.0, 4)
    dp.module(torch.randn(4, 3)).sum().backward()
    dp.check(4)
    with pytest.raises(PrivacyError, match="not the batch size 2"):
        dp.check(2)
    other = nn.Linear(3, 2)
    ghost = DPTraining(other, torch.optim.SGD(other.parameters(), lr=0.1), DPSettings(1.0, mode="ghost"), 1.0, 4)
    ghost.loss(lambda out, _: out.sum(), ghost.module(torch.randn(4, 3)), torch.zeros(4)).backward()
    ghost.check(4)
    with pytest.raises(PrivacyError, match="has none"):  # a step's norms are not reused by the next one
        ghost.check(4)


def test_an_empty_poisson_batch_is_a_noise_only_step():
    from echocare_core.engine.training import LocalTraining, Recipe, train_epoch

    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    dp = DPTraining(model, optimizer, DPSettings(epsilon=1.0), sigma=1.0, expected_batch_size=4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    recipe = Recipe(LocalTraining(privacy=DPSettings(epsilon=1.0)), optimizer, scheduler)
    losses, skipped = train_epoch(dp.module, [{"skipped": 0}], recipe, None, torch.device("cpu"), dp=dp)
    assert losses == [] and skipped == 0
    moved = [(p - b).abs().max().item() for p, b in zip(model.parameters(), before)]
    assert all(m > 0 for m in moved)  # noise of std sigma * C / expected batch, nothing from data
