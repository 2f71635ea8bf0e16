"""The task protocol: one object per task, looked up by name; what "better" means; what a job and a dataset
must agree on."""

import math

import pytest

from echocare_core.data.contract import TASK_COLUMNS, DatasetSpec
from echocare_core.tasks import TASKS, get_task
from echocare_core.tasks.base import Declared


def test_every_registered_task_is_its_own_object_with_a_main_metric_and_a_manifest_column():
    for name in TASKS:
        assert get_task(name).name == name and get_task(name).main_metric and get_task(name) is get_task(name)
    assert {n: c for n, c in TASK_COLUMNS.items() if n != "pretrain"} == {n: c for n, (c, _) in TASKS.items()}
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
