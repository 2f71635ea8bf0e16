"""Metrics on hand-made cases with known answers."""

import pytest
import torch

from echocare_core.tasks.classification import classification_metrics, youden
from echocare_core.tasks.segmentation import segmentation_metrics


def test_perfect_and_shifted_masks():
    true = torch.zeros(2, 32, 32, dtype=torch.long)
    true[:, 8:24, 8:24] = 1
    perfect = segmentation_metrics(true.clone(), true, num_classes=2)
    assert perfect["dice"] == pytest.approx(1.0) and perfect["nsd"] == pytest.approx(1.0)
    assert perfect["hd95"] == pytest.approx(0.0)
    shifted = torch.roll(true, shifts=4, dims=2)  # 16x16 square moved 4 px: overlap 16x12
    m = segmentation_metrics(shifted, true, num_classes=2)
    assert m["dice"] == pytest.approx(2 * 16 * 12 / (2 * 256), abs=1e-6)
    assert m["hd95"] == pytest.approx(4.0, abs=1e-6)
    assert 0.0 < m["nsd"] < 1.0


def test_binary_classification_with_youden():
    probs1 = torch.tensor([0.1, 0.2, 0.35, 0.4, 0.8, 0.9])
    labels = torch.tensor([0, 0, 1, 0, 1, 1])
    m = classification_metrics(torch.stack([1 - probs1, probs1], 1), labels)
    assert m["auc"] == pytest.approx(8 / 9)  # one discordant pair (0.35 vs 0.4) of 9
    assert m["accuracy"] == pytest.approx(5 / 6)
    assert (m["youden_threshold"], m["sensitivity"], m["specificity"]) == (
        pytest.approx(0.35),
        1.0,
        pytest.approx(2 / 3),
    )
    assert youden(probs1.numpy(), labels.numpy() == 1)[0] == pytest.approx(0.35)


def test_multiclass_macro_f1():
    probs = torch.eye(3)[[0, 1, 2, 2]]
    m = classification_metrics(probs, torch.tensor([0, 1, 2, 1]))
    assert m["accuracy"] == 0.75 and m["macro_f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)


def test_multilabel_metrics():
    from echocare_core.tasks.classification import multilabel_metrics

    probs = torch.tensor([[0.9, 0.2], [0.8, 0.7], [0.1, 0.6], [0.3, 0.1]])
    truth = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.0, 0.0]])
    m = multilabel_metrics(probs, truth)
    assert m == {"auc": pytest.approx(1.0), "exact_match": 1.0, "macro_f1": 1.0}
    m = multilabel_metrics(probs, torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    assert m["exact_match"] == 0.75 and m["macro_f1"] == pytest.approx((1 + 2 / 3) / 2)


def test_a_missed_structure_is_not_a_perfect_hd95():
    true = torch.zeros(2, 32, 32, dtype=torch.long)
    true[:, 8:24, 8:24] = 1
    pred = true.clone()
    pred[1] = 0  # nothing found in the second image
    m = segmentation_metrics(pred, true, num_classes=2)
    assert m["hd95"] == pytest.approx((0.0 + 32 * 2**0.5) / 2)  # the image diagonal for the miss
    assert m["dice"] == pytest.approx(0.5)


def test_auc_over_present_classes_and_a_fixed_operating_point():
    probs = torch.tensor([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.8, 0.1]])
    m = classification_metrics(probs, torch.tensor([0, 1, 0, 1]))  # class 2 never occurs
    assert m["auc"] == pytest.approx(1.0)
    binary = torch.tensor([[0.9, 0.1], [0.4, 0.6], [0.3, 0.7], [0.2, 0.8]])
    m = classification_metrics(binary, torch.tensor([0, 0, 1, 1]), threshold=0.65)
    assert (m["youden_threshold"], m["sensitivity"], m["specificity"]) == (0.65, 1.0, 1.0)
    m = classification_metrics(binary, torch.tensor([0, 0, 1, 1]), threshold=0.9)
    assert m["sensitivity"] == 0.0


def test_landmark_errors_of_a_known_shift():
    from echocare_core.tasks.landmarks import landmark_metrics

    true = torch.tensor([[[10.0, 10.0], [30.0, 40.0]], [[5.0, 5.0], [60.0, 2.0]]])
    shift = torch.tensor([[[3.0, 4.0], [0.0, 0.0]], [[0.0, 1.5], [-6.0, 8.0]]])  # radial errors 5, 0, 1.5, 10
    m = landmark_metrics(true + shift, true)
    assert m["mre"] == pytest.approx((5 + 0 + 1.5 + 10) / 4)
    assert (m["sdr_2px"], m["sdr_4px"], m["sdr_10px"]) == (0.5, 0.5, 1.0)
    assert (m["mre_point1"], m["mre_point2"]) == (pytest.approx(3.25), pytest.approx(5.0))


def test_detection_ap_per_class_and_map():
    from echocare_core.models.detection import Detections
    from echocare_core.tasks.detection import detection_metrics

    def det(boxes, scores, classes):
        return Detections(
            torch.tensor(boxes, dtype=torch.float32).view(-1, 4),
            torch.tensor(scores),
            torch.tensor(classes, dtype=torch.long),
        )

    true = [torch.tensor([[10.0, 10, 20, 20, 0], [30, 30, 40, 40, 1]]), torch.tensor([[50.0, 50, 60, 60, 1]])]
    perfect = [det([[10, 10, 20, 20], [30, 30, 40, 40]], [0.9, 0.8], [0, 1]), det([[50, 50, 60, 60]], [0.7], [1])]
    assert detection_metrics(perfect, true, 2) == {
        "map50": pytest.approx(1.0),
        "ap50_class0": pytest.approx(1.0),
        "ap50_class1": pytest.approx(1.0),
    }
    # class 1: one of two boxes found (the other detection misses, IoU 1/7), at full precision:
    # 101-point interpolated AP = 51/101; a third class without true boxes stays out of the mean
    shifted = [perfect[0], det([[55, 55, 65, 65]], [0.3], [1])]
    m = detection_metrics(shifted, true, 3)
    assert m["ap50_class1"] == pytest.approx(51 / 101) and m["ap50_class0"] == pytest.approx(1.0)
    assert m["map50"] == pytest.approx((1 + 51 / 101) / 2) and m["ap50_class2"] != m["ap50_class2"]


def test_regression_errors():
    from echocare_core.tasks.regression import regression_metrics

    m = regression_metrics(torch.tensor([50.0, 62.0, 38.0]), torch.tensor([52.0, 60.0, 40.0]))
    assert m["mae"] == pytest.approx(2.0) and m["rmse"] == pytest.approx(2.0)
    assert m["bias"] == pytest.approx(-2 / 3) and 0.9 < m["pearson_r"] <= 1.0


def test_enhancement_metrics_on_hand_made_images():
    from echocare_core.tasks.enhancement import enhancement_metrics

    target = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    same = enhancement_metrics(target.clone(), target)
    assert same["psnr"] == float("inf") and same["ssim"] == pytest.approx(1.0) and same["l1"] == 0.0
    off = enhancement_metrics((target + 0.1).clamp(0, 1), target)
    mse = float(((target + 0.1).clamp(0, 1) - target).pow(2).flatten(1).mean(1).log10().mul(-10).mean())
    assert off["psnr"] == pytest.approx(mse, rel=1e-4) and 0 < off["ssim"] < 1
