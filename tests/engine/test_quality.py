"""FID and BRISQUE from torchmetrics / piq with their weights read from local files only; NIQE and PIQE written
here (echocare_core.engine.nr_quality). The FID/BRISQUE weights are stand-ins of the right shapes (the real files
cannot be downloaded on a test machine): those tests check the wiring and that nothing reaches for the network, not
the published values. NIQE's models are fitted here on synthetic images; NIQE and PIQE are also checked against
values that BasicSR's NIQE and pypiqe's PIQE gave for the same deterministic images (computed outside the repo)."""

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat
from scipy.ndimage import gaussian_filter

from echocare_core.cli.evaluate import main as evaluate_main
from echocare_core.engine.nr_quality import NiqeParams, fit_niqe_params, load_niqe_params, niqe, piqe, save_niqe_params
from echocare_core.engine.quality import QualityWeights, quality_metrics
from echocare_core.synthetic.ultrasound import generate_image


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
    assert set(quality_metrics(a, a, QualityWeights())) == {"piqe"}  # PIQE needs no file


def test_a_missing_weights_file_is_named_with_its_key(tmp_path):
    with pytest.raises(
        FileNotFoundError,
        match=r"quality weights fid: .*inception.pth is not a file .*nothing is "
        r"downloaded",
    ):
        quality_metrics(
            torch.rand(2, 1, 32, 32), torch.rand(2, 1, 32, 32), QualityWeights(fid=str(tmp_path / "inception.pth"))
        )


def test_a_weights_file_that_does_not_load_or_too_few_images_are_refused(weights, tmp_path):
    (tmp_path / "other.pth").write_bytes(b"not a checkpoint")
    images = torch.rand(3, 1, 32, 32)
    with pytest.raises(ValueError, match="quality weights fid: .*other.pth does not load"):
        quality_metrics(images, images, QualityWeights(fid=str(tmp_path / "other.pth")))
    with pytest.raises(ValueError, match="quality weights brisque: .*other.pth does not load"):
        quality_metrics(images, images, QualityWeights(brisque=str(tmp_path / "other.pth")))
    with pytest.raises(ValueError, match="FID needs at least 2 images"):
        quality_metrics(images[:1], images[:1], weights)


def _batch(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images))[:, None].double() / 255  # uint8 [H, W] -> [N, 1, H, W] in [0, 1]


def _scans(seeds: range, profile: str = "highend_convex", size: int = 192) -> list[np.ndarray]:
    return [generate_image(np.random.default_rng(i), size, profile).image for i in seeds]


def _pattern(h: int, w: int, shift: int = 0) -> np.ndarray:
    """A deterministic textured image (no random generator, whose streams may change between numpy versions)."""
    y, x = np.mgrid[:h, :w]
    img = (
        128
        + 70 * np.sin(x / 5.0) * np.cos(y / 9.0)
        + 40 * np.sin((x + 2 * y + shift) / 13.0)
        + ((x * 7919 + y * 104729 + shift) % 61)
        - 30
    )
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def niqe_file(tmp_path_factory):
    """A NIQE model fitted on high-end synthetic scans (4 blocks of 96 each), written as BasicSR lays it out."""
    path = tmp_path_factory.mktemp("niqe") / "pristine.npz"
    save_niqe_params(path, fit_niqe_params(_batch(_scans(range(12)))))
    return path


def test_clean_scans_score_better_than_noisy_blurred_or_low_end_ones(niqe_file):
    clean = _scans(range(100, 104))
    rng = np.random.default_rng(7)
    noisy = [np.clip(im + rng.normal(0, 30, im.shape), 0, 255).round().astype(np.uint8) for im in clean]
    blurred = [gaussian_filter(im.astype(float), 2.5).round().astype(np.uint8) for im in clean]
    params = load_niqe_params(niqe_file)
    scores = {
        name: niqe(_batch(images), params)
        for name, images in (
            ("clean", clean),
            ("noisy", noisy),
            ("blurred", blurred),
            ("low_end", _scans(range(100, 104), "portable_convex")),
        )
    }
    assert np.isfinite(scores["clean"]).all() and (scores["clean"] > 0).all()
    for worse in ("noisy", "blurred", "low_end"):  # image by image, against the same scene
        assert (scores["clean"] < scores[worse]).all(), (worse, scores)
    quality = {
        name: piqe(_batch(images)) for name, images in (("clean", clean), ("noisy", noisy), ("blurred", blurred))
    }
    assert (
        (0 < quality["clean"])
        & (quality["clean"] < quality["noisy"])
        & (quality["clean"] < quality["blurred"])
        & (quality["blurred"] <= 100)
    ).all(), quality


def test_niqe_and_piqe_agree_with_basicsr_and_pypiqe():
    # BasicSR 1.4.2's niqe() on the float64 image with this model; pypiqe 1.2's piqe (which equals MATLAB's for
    # images whose maximum is 255 and whose sides are multiples of 16)
    mu, cov = np.linspace(0.1, 2.0, 36), np.eye(36) * 0.5
    scores = niqe(_batch([_pattern(192, 288)]), NiqeParams(mu, cov))
    assert scores[0] == pytest.approx(13.533323723092462, abs=1e-4)
    assert niqe(_batch([_pattern(200, 192, 5)]), NiqeParams(mu, cov))[0] == pytest.approx(13.527906155191031, abs=1e-4)
    assert piqe(_batch([_pattern(192, 288)]))[0] == pytest.approx(18.08519058870225, abs=1e-6)
    assert piqe(_batch([_pattern(96, 160, 5)]))[0] == pytest.approx(15.789602758282543, abs=1e-6)
    rgb = torch.from_numpy(_pattern(96, 160, 5)).double().div(255).expand(1, 3, -1, -1)  # grey in 3 channels
    assert piqe(rgb)[0] == pytest.approx(15.789602758282543, abs=1e-6)


def test_flat_images_and_odd_sizes():
    flat = torch.full((2, 1, 200, 200), 0.5)
    assert piqe(flat).tolist() == [100.0, 100.0]  # no active block: MATLAB's worst score
    assert np.isnan(niqe(flat, NiqeParams(np.zeros(36), np.eye(36)))).all()  # no texture, no features
    odd = piqe(_batch([_pattern(100, 90)]))  # padded to whole 16x16 blocks
    assert 0 < odd[0] < 100


def test_quality_metrics_reports_niqe_from_the_configured_file(niqe_file):
    images = _batch(_scans(range(200, 203)))
    out = quality_metrics(images, images, QualityWeights(niqe=str(niqe_file)))
    assert set(out) == {"niqe", "piqe"}
    assert out["niqe"] == pytest.approx(float(niqe(images, load_niqe_params(niqe_file)).mean()))
    assert out["piqe"] == pytest.approx(float(piqe(images).mean()))


def test_model_files_round_trip_in_basicsr_and_matlab_layouts(niqe_file, tmp_path):
    params = load_niqe_params(niqe_file)
    with np.load(niqe_file) as data:
        assert data["mu_pris_param"].shape == (1, 36) and data["cov_pris_param"].shape == (36, 36)
        assert data["gaussian_window"].sum() == pytest.approx(1.0) and int(data["block_size"]) == 96
    savemat(tmp_path / "modelparameters.mat", {"mu_prisparam": params.mu[None], "cov_prisparam": params.cov})
    from_mat = load_niqe_params(tmp_path / "modelparameters.mat")
    assert np.array_equal(from_mat.mu, params.mu) and np.array_equal(from_mat.cov, params.cov)
    images = _batch(_scans(range(300, 302)))
    assert np.allclose(niqe(images, from_mat), niqe(images, params))


def test_fit_reads_a_folder_of_images_as_the_same_tensor(tmp_path):
    scans = _scans(range(3), size=128)
    for i, scan in enumerate(scans):
        Image.fromarray(scan).save(tmp_path / f"scan{i}.png")
    from_folder, from_tensor = fit_niqe_params(tmp_path, block_size=32), fit_niqe_params(_batch(scans), block_size=32)
    assert from_folder.block_size == 32 and np.allclose(from_folder.mu, from_tensor.mu)
    assert np.allclose(from_folder.cov, from_tensor.cov)
    save_niqe_params(tmp_path / "small.npz", from_folder)  # a smaller block size travels with the file
    assert load_niqe_params(tmp_path / "small.npz").block_size == 32
    assert np.isfinite(niqe(_batch(_scans(range(5, 7), size=128)), from_folder)).all()
    from echocare_core.cli.data import main as data_main

    out = tmp_path / "model" / "site.npz"
    out.parent.mkdir()
    (tmp_path / "broken.png").write_bytes(b"not a png")  # left out, counted in the log
    assert data_main(["niqe-model", str(tmp_path), "--out", str(out), "--block-size", "32"]) == 0
    assert np.allclose(load_niqe_params(out).cov, from_folder.cov) and sorted(p.name for p in out.parent.iterdir()) == [
        "site.npz"
    ]  # written whole, no temporary left
    assert data_main(["niqe-model", str(tmp_path / "absent"), "--out", str(out)]) == 2


def test_an_absent_niqe_model_is_named_with_its_key(tmp_path, capsys):
    images = torch.rand(2, 1, 192, 192)
    with pytest.raises(
        FileNotFoundError,
        match=r"quality weights niqe: .*pristine.npz is not a file .*nothing is "
        r"downloaded",
    ):
        quality_metrics(images, images, QualityWeights(niqe=str(tmp_path / "pristine.npz")))
    with pytest.raises(FileNotFoundError, match="NIQE params: .*pristine.npz is not a file"):
        load_niqe_params(tmp_path / "pristine.npz")
    assert (
        evaluate_main(
            ["--checkpoint", str(tmp_path), "--data", str(tmp_path), "--niqe-params", str(tmp_path / "pristine.npz")]
        )
        == 2
    )  # refused before anything is read
    assert "quality weights niqe" in capsys.readouterr().err


def test_a_niqe_model_that_does_not_load_or_fit_is_refused(tmp_path, niqe_file):
    images = torch.rand(2, 1, 192, 192)
    np.savez(tmp_path / "other.npz", mu=np.zeros(36))
    with pytest.raises(
        ValueError, match="quality weights niqe: .*other.npz does not load .*lacks mu_pris_param and cov_pris_param"
    ):
        quality_metrics(images, images, QualityWeights(niqe=str(tmp_path / "other.npz")))
    np.savez(tmp_path / "short.npz", mu_pris_param=np.zeros(18), cov_pris_param=np.eye(18))
    with pytest.raises(ValueError, match=r"shape \(18,\) .*expected finite \(36,\) and \(36, 36\)"):
        load_niqe_params(tmp_path / "short.npz")
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="broken.npz does not load as .npz"):
        load_niqe_params(tmp_path / "broken.npz")
    (tmp_path / "model.pkl").write_bytes(b"")
    with pytest.raises(ValueError, match="suffix '.pkl'; allowed: .npz, .mat"):
        load_niqe_params(tmp_path / "model.pkl")
    with pytest.raises(ValueError, match="NIQE needs at least two 96x96 blocks per image, got 128x128"):
        quality_metrics(images[:, :, :128, :128], images[:, :, :128, :128], QualityWeights(niqe=str(niqe_file)))
    with pytest.raises(ValueError, match=r"images must be \[N, C, H, W\] with C = 1 or 3, got shape \(2, 2, 8, 8\)"):
        piqe(torch.rand(2, 2, 8, 8))


def test_fit_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="block_size must be an even integer >= 16 .*got 95"):
        fit_niqe_params(torch.rand(1, 1, 192, 192), block_size=95)
    with pytest.raises(ValueError, match=r"sharpness must be in \[0, 1\), got 1"):
        fit_niqe_params(torch.rand(1, 1, 192, 192), sharpness=1)
    with pytest.raises(FileNotFoundError, match="NIQE pristine images: .*absent is not a folder"):
        fit_niqe_params(tmp_path / "absent")
    with pytest.raises(ValueError, match="no image file .* under"):
        fit_niqe_params(tmp_path)
    with pytest.raises(ValueError, match="fewer than 2 usable 96x96 blocks"):
        fit_niqe_params(torch.full((2, 1, 192, 192), 0.5))
