"""The task protocol: one object per task, looked up by name; what "better" means; what a job and a dataset
must agree on."""

import math

import pytest

from echocare_core.data.contract import DatasetSpec
from echocare_core.tasks import TASKS, get_task
from echocare_core.tasks.base import Declared


def test_every_registered_task_is_its_own_object_with_a_main_metric_and_a_manifest_column():
    for name in TASKS:
        assert get_task(name).name == name and get_task(name).main_metric and get_task(name) is get_task(name)
    with pytest.raises(ValueError, match="unknown task 'segmentaton'.*Did you mean 'segmentation'"):
        get_task("segmentaton")


def test_score_is_higher_for_better_models_in_both_directions():
    landmarks, seg = get_task("landmarks"), get_task("segmentation")
    assert landmarks.lower_is_better and not seg.lower_is_better
    assert landmarks.score({"mre": 2.0}) > landmarks.score({"mre": 3.0})
    assert seg.score({"dice": 0.8}) > seg.score({"dice": 0.7})
    assert seg.score({"dice": math.nan}) == -math.inf == seg.score({})


def test_a_job_and_a_dataset_must_declare_the_same_labels():
    job = Declared(classes=("benign", "malignant"), labels=(0, 1), landmarks=2)
    spec = DatasetSpec("x", "segmentation", labels={0: "background", 2: "lesion"})
    assert get_task("segmentation").mismatch(job, spec) == "job mask values [0, 1] but the dataset declares [0, 2]"
    spec = DatasetSpec("x", "classification", classes=("benign", "malignant"))
    assert get_task("classification").mismatch(job, spec) == "" == get_task("detection").mismatch(job, spec)
    spec = DatasetSpec("x", "landmarks", landmark_names=("a", "b", "c"))
    assert get_task("landmarks").mismatch(job, spec) == "job has 2 landmarks but the dataset has 3"
    assert [t for t in map(get_task, TASKS) if t.sample_parts] == [get_task("regression"), get_task("report")]


def test_a_new_task_is_one_module_and_one_registry_entry(tmp_path, monkeypatch):
    """verify -> finetune -> evaluate (with its bootstrap interval) -> predict, for a task the toolkit does not
    have, registered with its manifest column and its class only."""
    import csv

    import numpy as np
    from conftest import TINY_ENCODER
    from PIL import Image

    import echocare_core.tasks as tasks
    from echocare_core.config import load_config
    from echocare_core.data.contract import verify_dataset
    from echocare_core.engine.evaluate import evaluate_checkpoint
    from echocare_core.engine.finetune import run_finetune
    from echocare_core.engine.finetune_config import FinetuneConfig
    from echocare_core.engine.predict import predict_files

    monkeypatch.setitem(tasks.TASKS, "brightness", ("target", "brightness:Brightness"))
    monkeypatch.setattr(tasks, "_made", {})
    data, rng = tmp_path / "data", np.random.default_rng(0)
    (data / "images").mkdir(parents=True)
    (data / "dataset.yaml").write_text("name: bright\ntask: brightness\n")
    rows = []
    for i in range(24):
        level = rng.uniform(0.1, 0.9)
        pixels = np.clip(rng.normal(level * 255, 10, (48, 48)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(data / "images" / f"{i}.png")
        rows.append([f"images/{i}.png", f"p{i}", ["train", "val", "test"][i % 3] if i % 3 else "train", f"{level:.4f}"])
    with (data / "manifest.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["image", "patient", "split", "target"], *rows])
    assert verify_dataset(data).ok

    cfg = {
        "output": str(tmp_path / "run"),
        "device": "cpu",
        "data": {"folder": str(data), "num_workers": 0},
        "model": {"encoder": dict(TINY_ENCODER), "feature_size": 8},
        "epochs": 2,
        "train": {"mode": "full", "lr": 1e-3, "batch_size": 8, "warmup_epochs": 0},
    }
    result = run_finetune(load_config(FinetuneConfig, None, [], base=cfg))
    assert result.status == "finished" and np.isfinite(result.test["mae"])
    evaluated = evaluate_checkpoint(tmp_path / "run" / "best", data, rounds=50)
    assert evaluated["main_metric"] == "mae" and evaluated["samples"] == 8
    lo, hi = evaluated["mae_ci95"]
    assert lo <= evaluated["metrics"]["mae"] <= hi
    written, unreadable = predict_files(tmp_path / "run" / "best", [data / "images" / "1.png"], tmp_path / "p")
    header, row = list(csv.reader(written.open()))
    assert header == ["file", "target"] and unreadable == 0 and 0 <= abs(float(row[1])) < 100
