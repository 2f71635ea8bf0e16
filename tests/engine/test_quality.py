"""FID and BRISQUE from torchmetrics / piq with their weights read from local files only. The weights here are
stand-ins of the right shapes (the real files cannot be downloaded on a test machine): these tests check the
wiring and that nothing reaches for the network, not the published values."""

import pytest
import torch

from echocare_core.engine.quality import QualityWeights, quality_metrics


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    import torch_fidelity.feature_extractor_inceptionv3 as inception

    root = tmp_path_factory.mktemp("weights")
    with pytest.MonkeyPatch.context() as mp:  # a randomly initialised Inception-v3 of torch-fidelity's layout
        mp.setattr(inception, "load_state_dict_from_url", lambda *a, **k: {})
        mp.setattr(inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state, strict=True: None)
        torch.manual_seed(0)
        stand_in = inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    for module in stand_in.modules():  # variance-preserving, so that 2048 features do not all vanish
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight)
    torch.save(stand_in.state_dict(), root / "inception.pth")
    torch.save((torch.randn(50) * 0.1, torch.randn(50, 36)), root / "brisque.pt")  # (sv_coef, sv) of piq's SVM
    return QualityWeights(fid=str(root / "inception.pth"), brisque=str(root / "brisque.pt"))


def test_fid_and_brisque_come_from_the_configured_files(weights, monkeypatch):
    def offline(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(6, 1, 64, 64, generator=g), torch.rand(6, 1, 64, 64, generator=g).pow(3)
    same, other = quality_metrics(a, a, weights), quality_metrics(b, a, weights)
    assert abs(same["fid"]) < 1e-3 < other["fid"]
    assert torch.isfinite(torch.tensor(same["brisque"])) and same["brisque"] != other["brisque"]
    assert quality_metrics(a, a, QualityWeights()) == {}


def test_a_missing_weights_file_is_named_with_its_key(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"quality weights fid: .*inception.pth is not a file .*nothing is "
                                                r"downloaded"):
        quality_metrics(torch.rand(2, 1, 32, 32), torch.rand(2, 1, 32, 32),
                        QualityWeights(fid=str(tmp_path / "inception.pth")))


def test_a_weights_file_that_does_not_load_or_too_few_images_are_refused(weights, tmp_path):
    (tmp_path / "other.pth").write_bytes(b"not a checkpoint")
    images = torch.rand(3, 1, 32, 32)
    with pytest.raises(ValueError, match="quality weights fid: .*other.pth does not load"):
        quality_metrics(images, images, QualityWeights(fid=str(tmp_path / "other.pth")))
    with pytest.raises(ValueError, match="quality weights brisque: .*other.pth does not load"):
        quality_metrics(images, images, QualityWeights(brisque=str(tmp_path / "other.pth")))
    with pytest.raises(ValueError, match="FID needs at least 2 images"):
        quality_metrics(images[:1], images[:1], weights)
