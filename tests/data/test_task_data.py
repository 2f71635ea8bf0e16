"""Task samples in the model's pixel grid: landmarks and boxes follow the resize and the flip."""

import csv
import json

import numpy as np
import torch
import yaml
from PIL import Image

from echocare_core.data.contract import load_spec, read_manifest
from echocare_core.tasks.dataset import TaskDataset, collate_task
from echocare_core.tasks.landmarks import from_model_points, to_model_points


def _folder(tmp_path, task, column, values, **spec):
    (tmp_path / "dataset.yaml").write_text(yaml.safe_dump({"name": "t", "task": task, **spec}))
    for i in range(len(values)):
        Image.fromarray(np.full((48, 64), 40 * (i + 1), np.uint8)).save(tmp_path / f"img{i}.png")  # W 64, H 48
    with (tmp_path / "manifest.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["image", column], *[[f"img{i}.png", json.dumps(v)] for i, v in enumerate(values)]])
    return load_spec(tmp_path), read_manifest(tmp_path)[1]


def test_points_map_to_the_model_grid_and_back():
    points = torch.tensor([[0.0, 0.0], [63.0, 47.0], [10.25, 30.5]])
    model = to_model_points(points, 48, 64, 32)  # pixel centres: 0 -> -0.25 (x), 63 -> 31.25
    torch.testing.assert_close(model[:2], torch.tensor([[-0.25, -1 / 6], [31.25, 31 + 1 / 6]]))
    back = from_model_points(model[None], torch.tensor([[48, 64]]), 32)[0]
    torch.testing.assert_close(back, points)


def test_boxes_scale_and_flip_with_the_image(tmp_path):
    spec, rows = _folder(
        tmp_path,
        "detection",
        "boxes",
        [[[8, 6, 24, 30, "b"]], [[0, 0, 64, 48, "a"], [4, 4, 8, 8, "b"]]],
        classes=["a", "b"],
    )
    plain = TaskDataset(tmp_path, spec, rows, img_size=32, channels=1, train=False, scale=(0.5, 0.5))
    item = plain[(0, 0)]
    assert item["image"].shape == (1, 32, 32) and item["size"].tolist() == [48, 64]
    torch.testing.assert_close(item["target"], torch.tensor([[4.0, 4.0, 12.0, 20.0, 1.0]]))
    flipping = TaskDataset(tmp_path, spec, rows, img_size=32, channels=1, train=True, scale=(0.5, 0.5))
    flipped = [flipping[(e, 0)] for e in range(8)]
    mirrored = [f for f in flipped if not torch.equal(f["target"], item["target"])]
    assert mirrored, "a flip has probability 0.5 per epoch"
    torch.testing.assert_close(mirrored[0]["target"], torch.tensor([[20.0, 4.0, 28.0, 20.0, 1.0]]))
    batch = collate_task([plain[(0, 0)], plain[(0, 1)]])
    assert isinstance(batch["target"], list) and [t.shape[0] for t in batch["target"]] == [1, 2]


def test_landmarks_are_never_flipped(tmp_path):
    spec, rows = _folder(tmp_path, "landmarks", "landmarks", [[[10, 20], [50, 40]]])
    ds = TaskDataset(tmp_path, spec, rows, img_size=32, channels=1, train=True, scale=(0.5, 0.5))
    expected = to_model_points(torch.tensor([[10.0, 20.0], [50.0, 40.0]]), 48, 64, 32)
    for epoch in range(6):
        torch.testing.assert_close(ds[(epoch, 0)]["target"], expected)


def test_report_samples_read_the_models_views_never_flip_and_count_cut_reports(tmp_path, caplog):
    from echocare_core.data.text import ReportTokenizer
    from echocare_core.synthetic.dataset import write_dataset

    folder = write_dataset(tmp_path, "report", sites=1, per_site=6, size=48, seed=3)[0]
    spec, (_, rows) = load_spec(folder), read_manifest(folder)
    rows[1]["image2"] = ""  # a study with one image: it is read twice
    tok = ReportTokenizer(max_tokens=24)
    with caplog.at_level("WARNING"):
        two = TaskDataset(folder, spec, rows, 32, 1, True, (0.5, 0.5), tokenizer=tok, views=2)
    assert "6 of 6 reports are longer than max_tokens=24" in caplog.text and rows[0]["report"] not in caplog.text
    one = TaskDataset(folder, spec, rows, 32, 1, True, (0.5, 0.5), tokenizer=tok)
    unflipped = TaskDataset(folder, spec, rows, 32, 1, False, (0.5, 0.5), tokenizer=tok, views=2)[(0, 0)]["image"]
    for epoch in range(6):  # training never flips a report's images: it would swap "left" and "right"
        a, b = two[(epoch, 0)], one[(epoch, 0)]
        assert a["image"].shape == (2, 1, 32, 32) and b["image"].shape == (1, 1, 32, 32)
        assert torch.equal(a["image"], unflipped) and torch.equal(b["image"][0], unflipped[0])
        assert not torch.equal(a["image"][0], a["image"][1])
        assert torch.equal(a["target"], tok.encode(rows[0]["report"]))
    same = two[(0, 1)]["image"]
    assert torch.equal(same[0], same[1])
