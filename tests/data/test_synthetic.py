"""Tests of the synthetic ultrasound generator, dataset writer and `echocare-data synth`."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from echocare_core.cli.data import main
from echocare_core.data import synthetic
from echocare_core.data.synthetic import DEVICE_PROFILES, LESIONS, SCENES, generate_image
from echocare_core.data.synthetic_dataset import manifest_anatomy, write_dataset

ONTOLOGY = Path(synthetic.__file__).resolve().parents[1] / "resources" / "ontology.yaml"


def _ring(mask: np.ndarray, width: int = 5) -> np.ndarray:
    """Pixels within `width` of the mask, outside it."""
    grown = mask.astype(bool)
    for _ in range(width):
        grown = grown | np.roll(grown, 1, 0) | np.roll(grown, -1, 0) | np.roll(grown, 1, 1) | np.roll(grown, -1, 1)
    return grown & ~mask.astype(bool)


def _read_manifest(folder: Path) -> list[dict[str, str]]:
    with open(folder / "manifest.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("profile", list(DEVICE_PROFILES))
def test_same_seed_same_bytes_and_other_seed_differs(profile: str) -> None:
    a = generate_image(np.random.default_rng(7), 64, profile, lesion="cyst")
    b = generate_image(np.random.default_rng(7), 64, profile, lesion="cyst")
    c = generate_image(np.random.default_rng(8), 64, profile, lesion="cyst")
    assert a.image.tobytes() == b.image.tobytes() and a.mask.tobytes() == b.mask.tobytes()
    assert a.image.tobytes() != c.image.tobytes()


@pytest.mark.parametrize("scene", [None, *SCENES])
def test_shapes_dtypes_and_anatomy(scene: str | None) -> None:
    s = generate_image(np.random.default_rng(0), 48, "highend_linear", scene=scene)
    assert s.image.shape == s.mask.shape == (48, 48)
    assert s.image.dtype == s.mask.dtype == np.uint8
    assert s.label is None and not s.mask.any()
    assert s.anatomy == (scene or synthetic.DEFAULT_SCENE)
    assert 10 < s.image.mean() < 200  # neither blank nor saturated


def test_scenes_are_paths_of_the_ontology() -> None:
    tree = yaml.safe_load(ONTOLOGY.read_text(encoding="utf-8"))
    assert len(SCENES) >= 5
    for path in SCENES:
        region, organ, structure = path.split("/")
        assert structure in tree[region][organ], path


@pytest.mark.parametrize("lesion", LESIONS)
def test_lesion_mask_is_aligned(lesion: str) -> None:
    inside, around = [], []
    for seed in range(4):
        s = generate_image(np.random.default_rng(seed), 96, "highend_linear", lesion=lesion)
        assert s.mask.any() and set(np.unique(s.mask)) <= {0, 1}
        assert s.label == ("malignant" if lesion == "irregular" else "benign")
        inside.append(s.image[s.mask == 1].mean())
        around.append(s.image[_ring(s.mask)].mean())
    if lesion == "hyperechoic":
        assert np.mean(inside) > np.mean(around) + 5
    else:
        assert np.mean(inside) < np.mean(around) - 15


def test_malignant_lesions_are_taller_than_wide() -> None:
    for seed in range(3):
        m = generate_image(np.random.default_rng(seed), 96, "highend_linear", lesion="irregular").mask
        rows, cols = np.nonzero(m)
        assert np.ptp(rows) > np.ptp(cols)


@pytest.mark.parametrize("profile", ["legacy_sector", "portable_convex"])
def test_fan_geometry_has_black_corners(profile: str) -> None:
    s = generate_image(np.random.default_rng(0), 64, profile, lesion="cyst")
    assert s.image[:6, :6].max() == 0 and s.image[:6, -6:].max() == 0
    assert s.image[20:40, 28:36].mean() > 20


def test_scene_brings_its_probe_geometry() -> None:
    heart = generate_image(np.random.default_rng(0), 64, "highend_linear", scene="Thorax/Heart/Apical four-chamber")
    assert heart.image[:6, :6].max() == 0


def test_device_profiles_look_different() -> None:
    stats = {}
    for name in DEVICE_PROFILES:
        imgs = [generate_image(np.random.default_rng(s), 64, name, scene="Abdomen/Liver/Subcostal oblique").image
                for s in range(3)]
        core = np.stack(imgs)[:, 20:50, 20:44].astype(float)  # inside every fan
        speckle = np.abs(np.diff(core, axis=2)).mean()
        stats[name] = (round(core.mean()), round(speckle))
    assert len(set(stats.values())) == len(stats), stats


def test_bad_arguments_raise() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="highend_linear"):
        generate_image(rng, 64, "highend_linaer")
    with pytest.raises(ValueError, match="scene"):
        generate_image(rng, 64, scene="Thorax/Heart")
    with pytest.raises(ValueError, match="lesion"):
        generate_image(rng, 64, lesion="tumour")
    with pytest.raises(ValueError, match="size"):
        generate_image(rng, 8)
    with pytest.raises(ValueError, match="sites"):
        write_dataset(Path("unused"), "segmentation", 0, 3)
    with pytest.raises(ValueError, match="task"):
        write_dataset(Path("unused"), "detection", 1, 3)


def test_manifest_anatomy_stops_at_every_level() -> None:
    rng = np.random.default_rng(0)
    path = "Thorax/Heart/Apical four-chamber"
    depths = [len(a.split("/")) if a else 0 for a in (manifest_anatomy(path, rng) for _ in range(400))]
    counts = np.bincount(depths, minlength=4) / 400
    assert counts[3] > 0.5 and all(0.05 < c < 0.25 for c in counts[:3])


@pytest.mark.parametrize("task", synthetic.TASKS)
def test_write_dataset_follows_the_contract(tmp_path: Path, task: str) -> None:
    folders = write_dataset(tmp_path, task, sites=2, per_site=12, size=48, seed=3)
    assert folders == [tmp_path / "site_00", tmp_path / "site_01"]
    column = {"classification": "label", "segmentation": "mask", "pretrain": "anatomy"}[task]
    profiles = set()
    for folder in folders:
        meta = yaml.safe_load((folder / "dataset.yaml").read_text(encoding="utf-8"))
        assert meta["task"] == task and meta["channels"] == 1 and meta["synthetic"] is True
        assert meta["device_profile"] in DEVICE_PROFILES
        profiles.add(meta["device_profile"])
        if task == "classification":
            assert meta["classes"] == ["benign", "malignant"]
        if task == "segmentation":
            assert meta["labels"] == {0: "background", 1: "lesion"}
        rows = _read_manifest(folder)
        assert len(rows) == 12 and list(rows[0]) == ["image", "patient", "split", column]
        split_of: dict[str, str] = {}
        for row in rows:
            assert split_of.setdefault(row["patient"], row["split"]) == row["split"]
            assert row["split"] in ("train", "val", "test")
            with Image.open(folder / row["image"]) as im:
                assert im.mode == "L" and im.size == (48, 48)
            if task == "segmentation":
                with Image.open(folder / row["mask"]) as m:
                    assert m.size == (48, 48) and set(np.unique(np.asarray(m))) <= {0, 1}
            if task == "classification":
                assert row["label"] in meta["classes"]
            if task == "pretrain" and row["anatomy"]:
                assert row["anatomy"].split("/")[0] in {p.split("/")[0] for p in SCENES}
        assert set(split_of.values()) == {"train", "val", "test"}  # 12 images -> >= 4 patients
    assert len(profiles) == 2


def test_write_dataset_is_deterministic_and_refuses_non_empty(tmp_path: Path) -> None:
    a = write_dataset(tmp_path / "a", "segmentation", 1, 4, size=40, seed=1)[0]
    b = write_dataset(tmp_path / "b", "segmentation", 1, 4, size=40, seed=1)[0]
    for name in ("manifest.csv", "images/00000.png", "masks/00003.png"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    with pytest.raises(FileExistsError, match="overwrite"):
        write_dataset(tmp_path / "a", "segmentation", 1, 4, size=40, seed=1)
    write_dataset(tmp_path / "a", "classification", 1, 2, size=40, seed=1, overwrite=True)
    assert not (a / "masks").exists() and len(list((a / "images").iterdir())) == 2


def test_cli_synth_writes_sites(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["synth", "--out", str(tmp_path), "--sites", "2", "--per-site", "3", "--task", "classification",
            "--size", "40"]
    assert main(argv) == 0
    assert (tmp_path / "site_01" / "dataset.yaml").is_file()
    assert capsys.readouterr().out.count("profile") == 2
    assert main(argv) == 2  # refuses to write into non-empty site folders
    assert "--overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0


@pytest.mark.parametrize("bad", [["--sites", "0"], ["--task", "detection"], ["--per-site", "x"],
                                 ["--size", "8"]])
def test_cli_bad_arguments_exit_2(tmp_path: Path, bad: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["synth", "--out", str(tmp_path), "--sites", "1", "--per-site", "1", "--task", "pretrain"]
    with pytest.raises(SystemExit) as exc:
        main(argv + bad)
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_cli_requires_a_subcommand() -> None:
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2
