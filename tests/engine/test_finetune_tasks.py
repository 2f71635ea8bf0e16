"""Landmarks, detection, clip regression, enhancement and report generation end to end: synth -> finetune ->
evaluate -> predict, real files."""

import csv
import json
import shutil

import pytest
from conftest import TINY_ENCODER
from PIL import Image

from echocare_core.checkpoint import build_from_checkpoint
from echocare_core.cli.evaluate import main as evaluate_main
from echocare_core.cli.predict import main as predict_main
from echocare_core.config import load_config
from echocare_core.engine.evaluate import evaluate_checkpoint
from echocare_core.engine.finetune import run_finetune
from echocare_core.engine.finetune_config import FinetuneConfig
from echocare_core.synthetic.dataset import REPORT_FINDINGS, write_dataset

pytestmark = pytest.mark.slow

MAIN = {"landmarks": "mre", "detection": "map50", "regression": "mae", "enhancement": "ssim", "report": "bleu4"}
REPORT = {"width": 32, "depth": 1, "heads": 4, "max_tokens": 160, "views": 2}


@pytest.fixture(scope="module", params=["landmarks", "detection", "regression", "enhancement", "report"])
def trained(request, tmp_path_factory):
    task = request.param
    root = tmp_path_factory.mktemp(task)
    folder = write_dataset(root / "data", task, sites=1, per_site=16 if task == "regression" else 30, size=64, seed=3)[
        0
    ]
    base = {
        "output": str(root / "run"),
        "device": "cpu",
        "data": {"folder": str(folder), "num_workers": 0},
        "model": {"encoder": dict(TINY_ENCODER), "feature_size": 8, "frames": 4, "report": REPORT, "beam": 2},
        "epochs": 2,
        "train": {"mode": "full", "lr": 1e-3, "batch_size": 8, "warmup_epochs": 0},
    }
    result = run_finetune(load_config(FinetuneConfig, None, [], base=base))
    return task, folder, root, result


def test_finetune_keeps_the_best_epoch_by_the_tasks_main_metric(trained):
    task, _, root, result = trained
    main = MAIN[task]
    assert result.status == "finished" and len(result.history) == 2
    values = [r[f"val_{main}"] for r in result.history]
    best = min(values) if task not in ("detection", "enhancement", "report") else max(values)
    assert result.best[main] == pytest.approx(best)
    assert json.loads((root / "run" / "test_metrics.json").read_text())[main] == pytest.approx(result.test[main])
    if task == "landmarks":
        assert {"sdr_2px", "sdr_4px", "sdr_10px", "mre_point4"} <= set(result.test) and result.test["mre"] > 0
    if task == "detection":
        assert {"ap50_class0", "ap50_class1"} <= set(result.test)
    if task == "regression":
        assert result.test["mae"] > 0 and set(result.test) == {"mae", "rmse", "bias", "pearson_r"}
    if task == "enhancement":
        assert set(result.test) == {"ssim", "psnr", "l1"} and 0 < result.test["ssim"] < 1 and result.test["psnr"] > 5
    if task == "report":
        assert {"bleu1", "bleu4", "meteor", "rouge_l", "finding_accuracy", "finding_f1"} <= set(result.test)
        assert 0 <= result.test["bleu1"] <= 1 and 0 <= result.test["finding_accuracy"] <= 1
        assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
        model, meta = build_from_checkpoint(root / "run" / "best")  # its classifier learnt the declared findings
        assert meta["head"]["report"]["findings"] == list(REPORT_FINDINGS) == meta["head"]["findings"]
        assert model.head.findings.out_features == len(REPORT_FINDINGS)


def test_evaluate_gives_the_main_metric_with_an_interval(trained, tmp_path, capsys):
    task, folder, root, result = trained
    main = MAIN[task]
    ev = evaluate_checkpoint(root / "run" / "best", folder, "test", rounds=50)
    assert ev["main_metric"] == main and ev["metrics"][main] == pytest.approx(result.test[main], rel=1e-5)
    lo, hi = ev[f"{main}_ci95"]
    assert lo <= hi
    assert evaluate_main(["--checkpoint", str(root / "run" / "best"), "--data", str(folder), "--bootstrap", "20"]) == 0
    assert "95% CI" in capsys.readouterr().out
    if task == "enhancement":  # the quality metrics' weights are local files; an absent one is named
        assert (
            evaluate_main(
                [
                    "--checkpoint",
                    str(root / "run" / "best"),
                    "--data",
                    str(folder),
                    "--fid-weights",
                    str(tmp_path / "inception.pth"),
                ]
            )
            == 2
        )
        assert "quality weights fid" in capsys.readouterr().err


def test_predict_writes_the_tasks_columns_in_image_pixels(trained, tmp_path):
    task, folder, root, _ = trained
    rows = list(csv.DictReader((folder / "manifest.csv").open()))[:3]
    if task == "report":
        _predict_reports(root, rows, folder, tmp_path)
        return
    files = [folder / r["image"] for r in rows]
    assert (
        predict_main(
            [
                "--checkpoint",
                str(root / "run" / "best"),
                "--input",
                str(files[0].parent),
                "--out",
                str(tmp_path / "out"),
                "--min-score",
                "0",
            ]
        )
        == 0
    )
    out = list(csv.DictReader((tmp_path / "out" / "predictions.csv").open()))
    assert len(out) == len(list(files[0].parent.iterdir()))
    meta = build_from_checkpoint(root / "run" / "best")[1]
    if task == "regression":
        name = meta["head"]["target_name"]
        assert name == "ejection_fraction" and all(0 < float(r[name]) < 100 for r in out)
        return
    if task == "enhancement":
        width, height = Image.open(files[0]).size
        enhanced, pair = (Image.open(tmp_path / "out" / out[0][k]) for k in ("enhanced", "side_by_side"))
        assert enhanced.size == (width, height) and pair.size == (2 * width, height)
        return
    width, height = Image.open(files[0]).size
    overlay = Image.open(tmp_path / "out" / out[0]["overlay"])
    assert overlay.size == (width, height) and overlay.mode == "RGB"
    if task == "landmarks":
        names = meta["head"]["landmark_names"]
        assert len(names) == 4 and all(f"{n}_x" in out[0] for n in names)
        assert all(-1 <= float(r[f"{n}_{a}"]) <= width for r in out for n in names for a in "xy")
    else:
        boxes = json.loads(out[0]["boxes"])
        assert int(out[0]["count"]) == len(boxes) > 0
        assert all(0 <= b[0] < b[2] <= width and b[4] in ("cyst", "solid") and 0 <= b[5] <= 1 for b in boxes)


def test_a_checkpoint_for_another_task_is_refused(trained):
    task, folder, root, _ = trained
    other = {
        "landmarks": "detection",
        "detection": "regression",
        "regression": "enhancement",
        "enhancement": "report",
        "report": "landmarks",
    }[task]
    with pytest.raises(ValueError, match=f"trained for {task}, the dataset is"):
        evaluate_checkpoint(root / "run" / "best", _other_site(folder.parent.parent, other))


def _other_site(root, task):
    folder = root / f"other_{task}"
    if not folder.exists():
        write_dataset(folder, task, sites=1, per_site=6, size=64, seed=1)
    return folder / "site_00"


def _predict_reports(root, rows, folder, tmp_path):
    """One study per folder: two views, one view, and one whose image does not decode."""
    studies = {"two_views": [rows[0]["image"], rows[0]["image2"]], "one_view": [rows[1]["image"]]}
    for name, files in studies.items():
        (tmp_path / "in" / name).mkdir(parents=True)
        for f in files:
            shutil.copy(folder / f, tmp_path / "in" / name)
    (tmp_path / "in" / "broken").mkdir()
    (tmp_path / "in" / "broken" / "x.png").write_bytes(b"not a png")
    assert (
        predict_main(
            [
                "--checkpoint",
                str(root / "run" / "best"),
                "--input",
                str(tmp_path / "in"),
                "--out",
                str(tmp_path / "out"),
                "--beam",
                "1",
            ]
        )
        == 0
    )
    out = {r["study"].rsplit("/", 1)[-1]: r for r in csv.DictReader((tmp_path / "out" / "predictions.csv").open())}
    assert set(out) == {"two_views", "one_view", "broken"} and out["broken"]["report_file"] == "unreadable"
    assert len(out["two_views"]["images"].split(";")) == 2
    assert len(out["one_view"]["images"].split(";")) == 2  # a two-view model reads a single image twice
    for name in ("two_views", "one_view"):
        text = (tmp_path / "out" / out[name]["report_file"]).read_text(encoding="utf-8")
        assert text.strip() == out[name]["report"]
        assert all(0 < float(out[name][f"p_{f}"]) < 1 for f in REPORT_FINDINGS)  # the findings classifier's
    assert out["broken"][f"p_{REPORT_FINDINGS[0]}"] == ""
    shutil.copy(folder / rows[2]["image"], tmp_path / "in" / "two_views")  # three images in one study folder
    assert (
        predict_main(
            [
                "--checkpoint",
                str(root / "run" / "best"),
                "--input",
                str(tmp_path / "in"),
                "--out",
                str(tmp_path / "out2"),
            ]
        )
        == 2
    )
    assert not (tmp_path / "out2" / "predictions.csv").exists()


def test_a_report_run_resumes_when_only_the_findings_loss_weight_changes(tmp_path):
    folder = write_dataset(tmp_path / "data", "report", sites=1, per_site=12, size=64, seed=5)[0]

    def run(epochs, **report):
        base = {
            "output": str(tmp_path / "run"),
            "device": "cpu",
            "data": {"folder": str(folder), "num_workers": 0},
            "model": {"encoder": dict(TINY_ENCODER), "report": {**REPORT, **report}, "beam": 1},
            "epochs": epochs,
            "train": {"mode": "lora", "lr": 1e-3, "batch_size": 4, "warmup_epochs": 0},
        }
        return run_finetune(load_config(FinetuneConfig, None, [], base=base))

    first = run(1)
    resumed = run(2, findings_weight=0.5)
    assert len(resumed.history) == 2 and resumed.history[0]["train_loss"] == first.history[0]["train_loss"]
    with pytest.raises(ValueError, match="another task, mode, head"):  # another classifier: other weights
        run(3, findings=["anechoic"])
