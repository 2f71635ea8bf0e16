"""The dataset contract and `echocare-data verify`: one case per kind of error, on real files."""

import hashlib
import json

import numpy as np
import pytest
import yaml
from PIL import Image

from echocare_core.cli.data import main as data_main
from echocare_core.data.contract import load_spec, patient_splits, verify_dataset
from echocare_core.synthetic.dataset import write_dataset


def _dataset(folder, task, header, rows, **spec):
    """A dataset folder with 64x48 images img0.png... and the given manifest rows."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dataset.yaml").write_text(yaml.safe_dump({"name": "t", "task": task, **spec}))
    for i in range(4):
        Image.fromarray(np.full((48, 64), 50 + i, np.uint8)).save(folder / f"img{i}.png")
    (folder / "manifest.csv").write_text(",".join(header) + "\n" + "".join(",".join(r) + "\n" for r in rows))
    return folder


def _found(report):
    return [(p.row, p.column, p.allowed) for p in report.problems]


def test_synthetic_datasets_pass(tmp_path):
    for task in ("classification", "segmentation", "pretrain"):
        folder = write_dataset(tmp_path / task, task, sites=1, per_site=12, size=64, seed=1)[0]
        report = verify_dataset(folder)
        assert report.ok, report.problems
        assert report.rows == 12 and sum(report.splits.values()) == 12


def test_classification_labels_must_be_declared(tmp_path):
    folder = _dataset(
        tmp_path / "d",
        "classification",
        ["image", "label"],
        [["img0.png", "benign"], ["img1.png", "malignnt"], ["img2.png", ""]],
        classes=["benign", "malignant"],
    )
    found = _found(verify_dataset(folder))
    assert found[0][:2] == (3, "label") and "Did you mean 'malignant'" in found[0][2]
    assert found[1][:2] == (4, "label") and "needs one" in found[1][2]


def test_segmentation_mask_size_and_values(tmp_path):
    folder = _dataset(
        tmp_path / "d",
        "segmentation",
        ["image", "mask"],
        [["img0.png", "m0.png"], ["img1.png", "m1.png"], ["img2.png", "nomask.png"]],
        labels={0: "background", 1: "nodule"},
    )
    Image.fromarray(np.zeros((48, 64), np.uint8)).save(folder / "m0.png")
    Image.fromarray(np.full((32, 32), 3, np.uint8)).save(folder / "m1.png")
    found = _found(verify_dataset(folder))
    assert [(r, c) for r, c, _ in found] == [(3, "mask"), (3, "mask"), (4, "mask")]
    assert "64x48 (mask is 32x32)" in found[0][2] and "found [3]" in found[1][2]


def test_landmarks_parse_count_and_bounds(tmp_path):
    folder = _dataset(
        tmp_path / "d",
        "landmarks",
        ["image", "landmarks"],
        [
            ["img0.png", '"[[1, 2], [3, 4]]"'],
            ["img1.png", '"[[1, 2]]"'],
            ["img2.png", '"[[1, 2], [99, 4]]"'],
            ["img3.png", "not json"],
        ],
    )
    found = _found(verify_dataset(folder))
    assert [r for r, _, _ in found] == [3, 4, 5]
    assert "2 points, as in row 2" in found[0][2] and "inside the 64x48 image" in found[1][2]
    assert "JSON list" in found[2][2]


def test_boxes_inside_image_with_declared_classes(tmp_path):
    folder = _dataset(
        tmp_path / "d",
        "detection",
        ["image", "boxes"],
        [
            ["img0.png", '"[[1, 2, 10, 20, ""heart""]]"'],
            ["img1.png", '"[[10, 2, 5, 20, ""heart""]]"'],
            ["img2.png", '"[[1, 2, 70, 20, ""heart""]]"'],
            ["img3.png", '"[[1, 2, 10, 20, ""liver""]]"'],
        ],
        classes=["heart", "thorax"],
    )
    found = _found(verify_dataset(folder))
    assert [(r, a.split(",")[0]) for r, _, a in found] == [
        (3, "x1 < x2 and y1 < y2"),
        (4, "boxes inside the 64x48 image"),
        (5, "box classes from dataset.yaml classes: heart"),
    ]


def test_regression_numbers_and_enhancement_pairs(tmp_path):
    reg = _dataset(
        tmp_path / "r",
        "regression",
        ["image", "target"],
        [["img0.png", "55.5"], ["img1.png", "fifty"], ["img2.png", "nan"]],
    )
    assert [r for r, _, _ in _found(verify_dataset(reg))] == [3, 4]
    enh = _dataset(
        tmp_path / "e", "enhancement", ["image", "target_image"], [["img0.png", "img1.png"], ["img1.png", "small.png"]]
    )
    Image.fromarray(np.full((10, 10), 9, np.uint8)).save(enh / "small.png")
    assert _found(verify_dataset(enh)) == [(3, "target_image", "the image's size 64x48")]


def test_reports_need_text_a_second_image_that_decodes_and_distinct_findings(tmp_path):
    rep = _dataset(
        tmp_path / "r",
        "report",
        ["image", "report", "image2"],
        [
            ["img0.png", "a cyst", "img1.png"],
            ["img1.png", "", "img2.png"],
            ["img2.png", "a nodule", "no.png"],
            ["img3.png", "seen", ""],
        ],
        findings=["cyst", "calcification"],
    )
    assert load_spec(rep).findings == ("cyst", "calcification")
    assert [(r, c) for r, c, _ in _found(verify_dataset(rep))] == [(3, "report"), (4, "image2")]
    for bad in (["cyst", "Cyst"], "cyst", ["cyst", ""]):
        (rep / "dataset.yaml").write_text(yaml.safe_dump({"name": "t", "task": "report", "findings": bad}))
        with pytest.raises(ValueError, match="key 'findings'.*distinct phrases"):
            load_spec(rep)


def test_structure_errors(tmp_path):
    no_col = _dataset(tmp_path / "a", "segmentation", ["image"], [["img0.png"]], labels={0: "bg"})
    ((row, column, allowed),) = _found(verify_dataset(no_col))
    assert (row, column) == (1, "mask") and "required for task 'segmentation'" in allowed
    (tmp_path / "a" / "dataset.yaml").write_text("name: x\ntask: segmentaton\n")
    assert "choose one of" in verify_dataset(tmp_path / "a").problems[0].allowed
    (tmp_path / "a" / "dataset.yaml").write_text("name: x\ntask: pretrain\nclases: [a]\n")
    with pytest.raises(ValueError, match="Did you mean 'classes'"):
        load_spec(tmp_path / "a")
    broken = _dataset(
        tmp_path / "b",
        "pretrain",
        ["image", "split", "patient", "anatomy"],
        [
            ["img0.png", "train", "p1", "Neck/Thyroid"],
            ["img1.png", "test", "p1", "Nek"],
            ["garbage.png", "dev", "p2", ""],
        ],
    )
    (broken / "garbage.png").write_bytes(b"not an image")
    found = _found(verify_dataset(broken))
    assert [(r, c) for r, c, _ in found] == [(3, "anatomy"), (4, "image"), (4, "split"), (2, "patient")]
    assert "found in test, train" in found[3][2]


def test_patient_splits_are_grouped_and_fixed():
    rows = [{"patient": f"p{i // 3}"} for i in range(60)]
    splits = patient_splits(rows, seed=5)
    assert splits == patient_splits(rows, seed=5)
    for p in range(20):
        assert len(set(splits[3 * p : 3 * p + 3])) == 1
    assert set(splits) == {"train", "val", "test"}
    assert patient_splits([{"split": "val"}, {"split": "test"}]) == ["val", "test"]


def _tree_hash(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p.relative_to(folder)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def test_cli_exit_codes_json_and_no_writes(tmp_path, capsys):
    folder = write_dataset(tmp_path / "ok", "classification", sites=1, per_site=10, size=64, seed=2)[0]
    before = _tree_hash(folder)
    assert data_main(["verify", str(folder)]) == 0
    assert _tree_hash(folder) == before
    bad = _dataset(tmp_path / "bad", "classification", ["image", "label"], [["img0.png", "x"]], classes=["a", "b"])
    assert data_main(["verify", str(bad), "--json", str(tmp_path / "r.json")]) == 1
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["ok"] is False and report["problems"][0]["column"] == "label"
    assert "1 problem(s)" in capsys.readouterr().out
    assert data_main(["verify", str(tmp_path / "nowhere")]) == 2


def test_rows_without_split_follow_their_patient_and_bom_headers_work(tmp_path):
    rows = [{"patient": "p1", "split": "test"}, {"patient": "p1", "split": ""}, {"patient": "p2", "split": ""}]
    for seed in range(20):
        assert patient_splits(rows, seed)[:2] == ["test", "test"]
    folder = _dataset(tmp_path / "d", "classification", ["image", "label"], [["img0.png", "a"]], classes=["a", "b"])
    (folder / "manifest.csv").write_text("\ufeffimage, label\nimg0.png,a\n", encoding="utf-8")
    assert verify_dataset(folder).ok


def test_landmark_names_fix_the_point_count(tmp_path):
    folder = _dataset(
        tmp_path / "d",
        "landmarks",
        ["image", "landmarks"],
        [["img0.png", '"[[1, 2], [3, 4]]"'], ["img1.png", '"[[1, 2], [3, 4], [5, 6]]"']],
        landmark_names=["apex", "base", "mid"],
    )
    found = _found(verify_dataset(folder))
    assert found == [
        (2, "landmarks", "3 points, as in dataset.yaml landmark_names (landmarks keep a fixed order and count)")
    ]
    (folder / "dataset.yaml").write_text(
        yaml.safe_dump({"name": "t", "task": "landmarks", "landmark_names": ["a", "a"]})
    )
    with pytest.raises(ValueError, match="landmark_names.*distinct point names"):
        load_spec(folder)
