"""Tests of the synthetic ultrasound generator, dataset writer and `echocare-data synth`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, UltrasoundMultiFrameImageStorage

from echocare_core.cli.data import main
from echocare_core.data.contract import verify_dataset
from echocare_core.data.io import read_clip
from echocare_core.synthetic import ultrasound as synthetic
from echocare_core.synthetic.dataset import manifest_anatomy, write_dataset
from echocare_core.synthetic.ultrasound import (
    DEVICE_PROFILES,
    HEART_SCENE,
    LANDMARK_NAMES,
    LESIONS,
    SCENES,
    generate_echo_clip,
    generate_image,
    lv_scale,
)

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
        imgs = [
            generate_image(np.random.default_rng(s), 64, name, scene="Abdomen/Liver/Subcostal oblique").image
            for s in range(3)
        ]
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
        write_dataset(Path("unused"), "captioning", 1, 3)


def test_manifest_anatomy_stops_at_every_level() -> None:
    rng = np.random.default_rng(0)
    path = "Thorax/Heart/Apical four-chamber"
    depths = [len(a.split("/")) if a else 0 for a in (manifest_anatomy(path, rng) for _ in range(400))]
    counts = np.bincount(depths, minlength=4) / 400
    assert counts[3] > 0.5 and all(0.05 < c < 0.25 for c in counts[:3])


@pytest.mark.parametrize("task", ["classification", "segmentation", "pretrain"])
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
    argv = [
        "synth",
        "--out",
        str(tmp_path),
        "--sites",
        "2",
        "--per-site",
        "3",
        "--task",
        "classification",
        "--size",
        "40",
    ]
    assert main(argv) == 0
    assert (tmp_path / "site_01" / "dataset.yaml").is_file()
    assert capsys.readouterr().out.count("profile") == 2
    assert main(argv) == 2  # refuses to write into non-empty site folders
    assert "--overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0


@pytest.mark.parametrize("bad", [["--sites", "0"], ["--task", "captioning"], ["--per-site", "x"], ["--size", "8"]])
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


# --------------------------------------------------------------------------- landmarks, detection, regression


def _edge(mask: np.ndarray) -> np.ndarray:
    """[K, 2] (x, y) of mask pixels with a 4-neighbour outside the mask (the image border counts as outside)."""
    m = np.pad(mask.astype(bool), 1)
    inner = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    ys, xs = np.nonzero(mask.astype(bool) & ~inner)
    return np.stack([xs, ys], axis=1)


def _ranks(values: list[float]) -> np.ndarray:
    return np.argsort(np.argsort(values)).astype(float)


@pytest.mark.parametrize("profile", ["highend_linear", "portable_convex", "legacy_sector"])
@pytest.mark.parametrize("lesion", LESIONS)
def test_calipers_sit_on_the_lesion_edge_in_order(profile: str, lesion: str) -> None:
    for seed in range(6):
        s = generate_image(np.random.default_rng(seed), 48, profile, lesion=lesion)
        assert s.lesions == (lesion,) and s.calipers.shape == (1, 4, 2)
        points = s.calipers[0]  # [4, 2] in LANDMARK_NAMES order
        assert ((points >= 0) & (points <= 47)).all()
        edge = _edge(s.mask)
        assert np.hypot(*(points[:, None, :] - edge[None]).transpose(2, 0, 1)).min(axis=1).max() <= 2.0
        long_axis, short_axis = points[1] - points[0], points[3] - points[2]
        assert np.hypot(*long_axis) >= np.hypot(*short_axis)
        assert abs(long_axis @ short_axis) <= 0.05 * np.hypot(*long_axis) * np.hypot(*short_axis)  # perpendicular
        for d in (long_axis, short_axis):  # the "a" end: left of a flat axis, top of a steep one
            assert d[0] >= 0 if abs(d[0]) >= abs(d[1]) else d[1] >= 0


def test_irregular_lesions_have_a_vertical_long_axis() -> None:
    for seed in range(4):
        points = generate_image(np.random.default_rng(seed), 64, lesion="irregular").calipers[0]
        dx, dy = np.abs(points[1] - points[0])
        assert dy > dx


@pytest.mark.parametrize("profile", ["highend_linear", "portable_convex", "legacy_sector"])
def test_several_lesions_get_tight_boxes_that_never_overlap(profile: str) -> None:
    rng = np.random.default_rng(0)
    for seed in range(12):
        kinds = [str(k) for k in rng.choice(LESIONS, 2 + seed % 2)]
        s = generate_image(np.random.default_rng(seed), 48, profile, lesion=kinds)
        assert s.lesions == tuple(kinds) and s.boxes.shape == (len(kinds), 4) and s.calipers.shape == (len(kinds), 4, 2)
        assert s.label == ("malignant" if "irregular" in kinds else "benign")
        covered = np.zeros_like(s.mask)
        for x1, y1, x2, y2 in s.boxes:
            part = s.mask[y1:y2, x1:x2]
            assert part[0].any() and part[-1].any() and part[:, 0].any() and part[:, -1].any()  # tight
            covered[y1:y2, x1:x2] = 1
        assert not (s.mask & ~covered.astype(bool)).any()  # every lesion pixel is in a box
        assert all(left[2] <= right[0] for left, right in zip(s.boxes, s.boxes[1:]))  # left to right, apart


def test_one_lesion_box_is_the_mask_bounding_box() -> None:
    s = generate_image(np.random.default_rng(3), 64, lesion="cyst")
    rows, cols = np.nonzero(s.mask)
    assert s.boxes.tolist() == [[cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]]
    assert generate_image(np.random.default_rng(3), 64).boxes.shape == (0, 4)


def test_lesion_sequence_is_checked() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="1 to 3"):
        generate_image(rng, 48, lesion=[])
    with pytest.raises(ValueError, match="1 to 3"):
        generate_image(rng, 48, lesion=["cyst"] * 4)
    with pytest.raises(ValueError, match="Did you mean 'cyst'"):
        generate_image(rng, 48, lesion=["cyst", "cist"])


def test_lv_scale_ejects_the_ejection_fraction() -> None:
    assert lv_scale(0, 16, 60.0) == 1.0
    assert lv_scale(8, 16, 60.0) ** 3 == pytest.approx(0.4)
    assert lv_scale(3, 16, 60.0) == pytest.approx(lv_scale(13, 16, 60.0))
    assert lv_scale(4, 16, 60.0) > lv_scale(6, 16, 60.0) > lv_scale(8, 16, 60.0)


def test_echo_clip_moves_only_the_ventricle() -> None:
    clips = {ef: generate_echo_clip(np.random.default_rng(5), 64, ejection_fraction=ef) for ef in (25.0, 70.0)}
    clip = clips[70.0]
    assert clip.shape == (16, 64, 64) and clip.dtype == np.uint8
    assert (clip[:, :, :19] == clip[0, :, :19]).all()  # left of the LV and of its shadow: nothing moves
    assert not (clip[8] == clip[0]).all()
    np.testing.assert_array_equal(clip[3], clip[13])  # s(t) = s(T - t)
    one = generate_image(np.random.default_rng(5), 64, "cardiac_sector", scene=HEART_SCENE)
    np.testing.assert_array_equal(clip[0], one.image)  # end-diastole is the scene itself
    drops = {}
    for ef, c in clips.items():
        dark = (c[:, 6:45, 29:51] < 40).sum(axis=(1, 2))  # around the LV
        assert int(np.argmin(dark)) in (7, 8, 9)
        drops[ef] = (dark[0] - dark[8]) / dark[0]
    assert drops[70.0] > drops[25.0] + 0.05


def test_echo_clip_bad_arguments_raise() -> None:
    rng = np.random.default_rng(0)
    for kwargs, match in (
        ({"ejection_fraction": 100.0}, "ejection_fraction"),
        ({"ejection_fraction": 50.0, "ed_scale": 3.0}, "ed_scale"),
        ({"ejection_fraction": 50.0, "frames": 1}, "frames"),
    ):
        with pytest.raises(ValueError, match=match):
            generate_echo_clip(rng, 48, **kwargs)


@pytest.mark.parametrize("task", ["landmarks", "detection", "regression"])
def test_new_tasks_verify_and_are_deterministic(tmp_path: Path, task: str) -> None:
    a = write_dataset(tmp_path / "a", task, sites=2, per_site=12, size=64, seed=3)
    b = write_dataset(tmp_path / "b", task, sites=1, per_site=12, size=64, seed=3)[0]
    column = {"landmarks": "landmarks", "detection": "boxes", "regression": "target"}[task]
    for folder in a:
        report = verify_dataset(folder)
        assert report.ok, report.problems
        rows = _read_manifest(folder)
        assert list(rows[0]) == ["image", "patient", "split", column]
        assert {r["split"] for r in rows} == {"train", "val", "test"}
    files = sorted(p.relative_to(a[0]) for p in a[0].rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a[0] / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert (a[0] / "manifest.csv").read_bytes() != (a[1] / "manifest.csv").read_bytes()


def test_landmarks_dataset(tmp_path: Path) -> None:
    folder = write_dataset(tmp_path, "landmarks", sites=1, per_site=8, size=64, seed=1)[0]
    meta = yaml.safe_load((folder / "dataset.yaml").read_text(encoding="utf-8"))
    assert meta["task"] == "landmarks" and meta["landmark_names"] == list(LANDMARK_NAMES) and meta["channels"] == 1
    for row in _read_manifest(folder):
        points = np.array(json.loads(row["landmarks"]))
        assert row["image"].startswith("images/") and points.shape == (4, 2)
        assert np.array_equal(points, np.round(points, 2))
        assert np.hypot(*(points[1] - points[0])) >= np.hypot(*(points[3] - points[2]))


def test_detection_dataset(tmp_path: Path) -> None:
    folder = write_dataset(tmp_path, "detection", sites=1, per_site=24, size=64, seed=2)[0]
    meta = yaml.safe_load((folder / "dataset.yaml").read_text(encoding="utf-8"))
    assert meta["task"] == "detection" and meta["classes"] == ["cyst", "solid"]
    counts, names = set(), set()
    for row in _read_manifest(folder):
        boxes = json.loads(row["boxes"])
        counts.add(len(boxes))
        names |= {box[4] for box in boxes}
        assert all(isinstance(c, int) for box in boxes for c in box[:4])
        assert all(left[2] <= right[0] for left, right in zip(boxes, boxes[1:]))
    assert counts == {1, 2} and names == {"cyst", "solid"}


def test_regression_dataset_clips(tmp_path: Path) -> None:
    folder = write_dataset(tmp_path, "regression", sites=1, per_site=12, size=64, seed=0)[0]
    meta = yaml.safe_load((folder / "dataset.yaml").read_text(encoding="utf-8"))
    assert meta["task"] == "regression" and meta["target_name"] == "ejection_fraction"
    assert not (folder / "images").exists()
    efs, drops = [], []
    for row in _read_manifest(folder):
        assert row["image"].startswith("clips/") and row["image"].endswith(".dcm")
        ds = dcmread(folder / row["image"])
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.SOPClassUID == UltrasoundMultiFrameImageStorage and ds.PhotometricInterpretation == "MONOCHROME2"
        assert int(ds.NumberOfFrames) == 16 and ds.PatientID == row["patient"]
        assert not any(e.VR in ("DA", "TM", "DT") for e in ds.iterall())  # no dates or times
        clip = read_clip(folder / row["image"])
        assert clip.shape == (16, 1, 64, 64) and clip.dtype == np.uint8
        np.testing.assert_array_equal(clip[:, 0], ds.pixel_array)
        ef = float(row["target"])
        assert 20.0 <= ef <= 75.0 and row["target"] == f"{ef:.1f}"
        dark = (clip[:, 0, 6:45, 29:51] < 40).sum(axis=(1, 2))  # around the LV
        assert int(np.argmin(dark)) in (7, 8, 9)  # end-systole mid-cycle
        efs.append(ef)
        drops.append((dark[0] - dark[8]) / dark[0])
    assert np.corrcoef(_ranks(efs), _ranks(drops))[0, 1] > 0.6  # a larger EF empties more of the cavity


@pytest.mark.parametrize("task", ["landmarks", "detection", "regression"])
def test_cli_synth_new_tasks_then_verify(tmp_path: Path, task: str) -> None:
    argv = ["synth", "--out", str(tmp_path), "--sites", "2", "--per-site", "4", "--task", task, "--size", "48"]
    assert main(argv) == 0
    for site in ("site_00", "site_01"):
        assert main(["verify", str(tmp_path / site)]) == 0


def test_report_dataset_describes_each_lesion(tmp_path: Path) -> None:
    from echocare_core.synthetic.dataset import REPORT_FINDINGS, lesion_report

    folder = write_dataset(tmp_path, "report", sites=1, per_site=12, size=64, seed=3)[0]
    assert verify_dataset(folder).ok
    meta = yaml.safe_load((folder / "dataset.yaml").read_text(encoding="utf-8"))
    assert meta["findings"] == list(REPORT_FINDINGS)
    rows = _read_manifest(folder)
    assert list(rows[0]) == ["image", "patient", "split", "report", "image2"]
    for row in rows:
        with Image.open(folder / row["image"]) as a, Image.open(folder / row["image2"]) as b:
            assert a.size == b.size == (64, 64) and np.asarray(a).tobytes() != np.asarray(b).tobytes()
        assert row["report"].startswith(("A ", "An ")) and "Impression: " in row["report"]
    assert lesion_report("cyst", np.array([2, 40, 18, 60]), 64) == (
        "A 10 mm anechoic nodule in the left deep field, with a smooth margin and posterior acoustic enhancement. "
        "Impression: likely benign."
    )
    assert lesion_report("irregular", np.array([40, 5, 53, 25]), 64) == (
        "An 8 mm hypoechoic nodule in the right superficial field, with an irregular margin and posterior acoustic "
        "shadowing. Impression: suspicious for malignancy."
    )
