"""Landmark, detection, clip-regression and enhancement heads: shapes, finite gradients, per-sample losses,
decoding."""

import pytest
import torch

from echocare_core.data.contract import DatasetSpec
from echocare_core.models.detection import centre_targets, decode_detections, detection_loss
from echocare_core.models.landmarks import decode_heatmaps, gaussian_heatmaps, heatmap_loss
from echocare_core.tasks import get_task
from echocare_core.tasks.model import EchoCareTaskModel

BOXES = [torch.tensor([[8.0, 10.0, 30.0, 22.0, 1.0], [40.0, 36.0, 56.0, 60.0, 0.0]]), torch.zeros(0, 5)]


def _inputs(task):
    torch.manual_seed(0)
    if task == "regression":
        return torch.randn(2, 3, 1, 64, 64), torch.tensor([40.0, 65.0])
    if task == "landmarks":
        return torch.randn(2, 1, 64, 64), torch.rand(2, 4, 2) * 63
    if task == "enhancement":
        return torch.randn(2, 1, 64, 64), torch.rand(2, 1, 64, 64)
    return torch.randn(2, 1, 64, 64), BOXES


LOSSES = {
    "landmarks": heatmap_loss,
    "detection": detection_loss,
    "regression": lambda pred, target: torch.nn.functional.smooth_l1_loss(pred, (target - 50) / 10),
    "enhancement": get_task("enhancement").loss(DatasetSpec("x", "enhancement")),
}
SHAPES = {
    "landmarks": (2, 4, 64, 64),
    "detection": (2, 2 + 2, 64, 64),
    "regression": (2,),
    "enhancement": (2, 1, 64, 64),
}


@pytest.mark.parametrize("task", ["landmarks", "detection", "regression", "enhancement"])
def test_head_shapes_and_finite_backward(tiny_encoder_cfg, task):
    model = EchoCareTaskModel(
        tiny_encoder_cfg, task, num_classes=4 if task == "landmarks" else 2, feature_size=8, target_stats=(50.0, 10.0)
    )
    x, target = _inputs(task)
    out = model(x)
    assert out.shape == SHAPES[task]
    loss = LOSSES[task](out, target)
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert not any(getattr(m, "inplace", False) for m in model.modules())
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.mark.parametrize("task", ["landmarks", "detection", "regression", "enhancement"])
def test_losses_are_means_of_per_sample_losses(tiny_encoder_cfg, task):
    """DP clips per sample: a batch's loss must be the mean of its samples' losses."""
    model = EchoCareTaskModel(tiny_encoder_cfg, task, num_classes=4 if task == "landmarks" else 2, feature_size=8)
    model.eval()
    x, target = _inputs(task)
    out = model(x).detach()
    singles = [LOSSES[task](out[i : i + 1], target[i : i + 1]) for i in range(2)]
    torch.testing.assert_close(LOSSES[task](out, target), torch.stack(singles).mean())


def test_regression_decodes_to_target_units(tiny_encoder_cfg):
    model = EchoCareTaskModel(tiny_encoder_cfg, "regression", 1, target_stats=(55.0, 8.0))
    torch.testing.assert_close(model.decode(torch.tensor([0.0, -1.0, 0.5])), torch.tensor([55.0, 47.0, 59.0]))


def test_heatmap_decoding_is_sub_pixel():
    points = torch.tensor([[[10.3, 20.7], [40.5, 33.1], [0.2, 63.0]]])
    logits = gaussian_heatmaps(points, (64, 64), sigma=2.0).clamp_min(1e-30).log() + 7.0  # an offset changes nothing
    decoded = decode_heatmaps(logits)
    torch.testing.assert_close(decoded[:, :2], points[:, :2], atol=1e-3, rtol=0)  # a Gaussian's peak is exact
    torch.testing.assert_close(decoded[:, 2], torch.tensor([[0.0, 63.0]]))  # no neighbour beyond the border
    assert heatmap_loss(logits, points) < 1e-4 < heatmap_loss(logits, points + 3)


def test_centre_heatmaps_decode_back_to_the_boxes():
    boxes = BOXES[0]
    heat, centres = centre_targets(boxes, 2, (64, 64))
    assert heat.amax() == 1 and int((heat == 1).sum()) == 2
    assert centres.tolist() == [[16, 18], [48, 48]]  # (row, column); centre (15.5, 18.5) rounds half to even
    out = torch.full((1, 4, 64, 64), -10.0)
    out[0, :2] = torch.logit(heat.clamp(1e-4, 1 - 1e-4))
    for (row, col), box in zip(centres.tolist(), boxes):
        out[0, 2:, row, col] = (box[2:4] - box[:2]).log()
    det = decode_detections(out, min_score=0.5)[0]
    order = det.classes.argsort(descending=True)  # class 1 first, as in BOXES
    assert det.classes[order].tolist() == [1, 0]
    # sizes are exact; the centre snaps to a pixel centre, so odd-sized boxes move by half a pixel
    torch.testing.assert_close(det.boxes[order], boxes[:, :4], atol=0.5 + 1e-4, rtol=0)
    assert detection_loss(out, [boxes]) < detection_loss(out, [boxes + torch.tensor([6.0, 6, 6, 6, 0])])


def test_enhancement_decodes_to_an_image_in_the_unit_range(tiny_encoder_cfg):
    model = EchoCareTaskModel(tiny_encoder_cfg, "enhancement", 1, feature_size=8)
    out = model.decode(model(torch.randn(2, 1, 64, 64)))
    assert out.shape == (2, 1, 64, 64) and 0 <= float(out.min()) and float(out.max()) <= 1
