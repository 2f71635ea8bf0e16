"""Local fine-tuning end to end on synthetic site data: tiny encoder, real files, real checkpoints."""

import csv

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY_ENCODER

from echocare_core.checkpoint import build_from_checkpoint, read_meta
from echocare_core.cli.finetune import main as finetune_main
from echocare_core.config import load_config
from echocare_core.engine.finetune import run_finetune
from echocare_core.engine.finetune_config import FinetuneConfig
from echocare_core.engine.pretrain import run_pretraining
from echocare_core.engine.training import DatasetInvalidError
from echocare_core.models.heads import DenseHead, LightDenseHead
from echocare_core.synthetic.dataset import write_dataset

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    root = tmp_path_factory.mktemp("sites")
    return {
        task: write_dataset(root / task, task, sites=1, per_site=30, size=64, seed=4)[0]
        for task in ("classification", "segmentation")
    }


def _cfg(folder, out, *overrides, train=None, **model):
    train = train or {}
    base = {
        "output": str(out),
        "device": "cpu",
        "data": {"folder": str(folder), "num_workers": 0},
        "model": {"encoder": dict(TINY_ENCODER), "feature_size": 8, **model},
        "epochs": 2,
        "train": {"lr": 1e-3, "batch_size": 8, "warmup_epochs": 0, **train},
    }
    return load_config(FinetuneConfig, None, list(overrides), base=base)


@pytest.mark.parametrize(
    "task,mode,decoder",
    [
        ("classification", "lora", "unetr"),
        ("segmentation", "frozen", "unetr"),
        ("segmentation", "full", "unetr"),
        ("segmentation", "lora", "light"),
    ],
)
def test_finetune_then_rebuild_the_best_model(sites, tmp_path, task, mode, decoder):
    # batches of 8 on a device that holds 3: each step in pieces of 3, 3 and 2
    result = run_finetune(
        _cfg(sites[task], tmp_path / "run", "max_batch_size=3", train={"mode": mode}, decoder=decoder)
    )
    assert result.status == "finished" and [r["epoch"] for r in result.history] == [1, 2]
    main = "auc" if task == "classification" else "dice"
    assert 0.0 <= result.test[main] <= 1.0 and (tmp_path / "run" / "test_metrics.json").is_file()
    model, meta = build_from_checkpoint(tmp_path / "run" / "best")
    assert result.trainable < result.total if mode != "full" else result.trainable == result.total
    assert meta["model_kind"] == "task" and meta["finetune"]["mode"] == mode and meta["head"]["decoder"] == decoder
    if task == "segmentation":
        assert isinstance(model.head, {"unetr": DenseHead, "light": LightDenseHead}[decoder])
    assert model(torch.zeros(1, 1, 64, 64)).shape[:2] == (1, 2)


def test_stop_and_resume_by_epoch_gives_the_uninterrupted_weights(sites, tmp_path):
    from echocare_core.checkpoint import load_weights

    cfg = _cfg(sites["classification"], tmp_path / "run", "epochs=3")
    assert run_finetune(cfg, stop=lambda: True).status == "stopped"
    assert read_meta(tmp_path / "run" / "last")["epoch"] == 1
    result = run_finetune(cfg)
    assert [r["epoch"] for r in result.history] == [1, 2, 3] and result.status == "finished"
    run_finetune(_cfg(sites["classification"], tmp_path / "straight", "epochs=3"))
    resumed, straight = load_weights(tmp_path / "run" / "last"), load_weights(tmp_path / "straight" / "last")
    for name, value in straight.items():
        torch.testing.assert_close(resumed[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_starts_from_a_pretrained_encoder(sites, tmp_path, pretrain_data):
    from conftest import tiny_pretrain_cfg

    run_pretraining(tiny_pretrain_cfg(pretrain_data, tmp_path / "pre", ["optim.steps=2"]))
    ckpt = tmp_path / "pre" / "checkpoints" / "step_000002"
    result = run_finetune(
        _cfg(sites["classification"], tmp_path / "run", "epochs=1", init=str(ckpt), train={"mode": "frozen"})
    )
    model, _ = build_from_checkpoint(tmp_path / "run" / "best")
    pretrained, _ = build_from_checkpoint(ckpt)
    assert torch.equal(model.encoder.patch_embed.proj.weight, pretrained.encoder.patch_embed.proj.weight)
    assert result.status == "finished"


def test_a_missing_init_stops_before_anything_is_written(sites, tmp_path):
    missing = tmp_path / "models" / "echocare_encoder.pth"
    with pytest.raises(FileNotFoundError, match=r"model.init: nothing at .*echocare_encoder.pth .the EchoCare release"):
        run_finetune(_cfg(sites["classification"], tmp_path / "run", init=str(missing)))
    assert not (tmp_path / "run").exists()


def test_a_dataset_that_fails_the_check_is_refused(sites, tmp_path, capsys):
    folder = tmp_path / "bad"
    import shutil

    shutil.copytree(sites["classification"], folder)
    rows = list(csv.DictReader((folder / "manifest.csv").open()))
    rows[3]["label"] = "malignantt"
    with (folder / "manifest.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(DatasetInvalidError, match="row 5 column label: one of the classes"):
        run_finetune(_cfg(folder, tmp_path / "run"))
    (tmp_path / "site.yaml").write_text(f"data:\n  folder: {folder}\n")
    assert finetune_main(["--config", str(tmp_path / "site.yaml")]) == 2
    assert "echocare-data verify" in capsys.readouterr().err.replace("\n", "")
    assert finetune_main(["--config", str(tmp_path / "site.yaml"), "--set", "train.mode=partial"]) == 2
    assert "choose one of ['full', 'frozen', 'lora']" in capsys.readouterr().err.replace("\n", "")


@pytest.fixture(scope="module")
def seg_best(sites, tmp_path_factory):
    out = tmp_path_factory.mktemp("seg")
    run_finetune(_cfg(sites["segmentation"], out, "epochs=1", train={"mode": "lora"}))
    return out / "best"


def test_evaluate_with_interval_and_refuse_the_wrong_dataset(sites, seg_best, tmp_path, capsys):
    from echocare_core.cli.evaluate import main as evaluate_main
    from echocare_core.engine.evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(seg_best, sites["segmentation"], "test", rounds=100)
    lo, hi = result["dice_ci95"]
    assert result["main_metric"] == "dice" and lo <= result["metrics"]["dice"] <= hi
    with pytest.raises(ValueError, match="trained for segmentation, the dataset is classification"):
        evaluate_checkpoint(seg_best, sites["classification"])
    assert (
        evaluate_main(
            [
                "--checkpoint",
                str(seg_best),
                "--data",
                str(sites["segmentation"]),
                "--bootstrap",
                "50",
                "--json",
                str(tmp_path / "e.json"),
            ]
        )
        == 0
    )
    assert "95% CI" in capsys.readouterr().out
    assert evaluate_main(["--checkpoint", str(seg_best), "--data", str(sites["classification"])]) == 2


def test_predict_writes_csv_masks_and_overlays(sites, seg_best, tmp_path):
    from PIL import Image

    from echocare_core.cli.predict import main as predict_main

    images = sites["segmentation"] / "images"
    (tmp_path / "in").mkdir()
    for src in sorted(images.iterdir())[:3]:
        (tmp_path / "in" / src.name).write_bytes(src.read_bytes())
    (tmp_path / "in" / "zz_broken.png").write_bytes(b"nope")
    assert (
        predict_main(["--checkpoint", str(seg_best), "--input", str(tmp_path / "in"), "--out", str(tmp_path / "out")])
        == 0
    )
    rows = list(csv.DictReader((tmp_path / "out" / "predictions.csv").open()))
    assert len(rows) == 4 and rows[-1]["mask"] == "unreadable"
    for row in rows[:3]:
        mask = Image.open(tmp_path / "out" / row["mask"])
        assert mask.size == Image.open(row["file"]).size and set(np.unique(np.asarray(mask)).tolist()) <= {0, 1}
        assert Image.open(tmp_path / "out" / row["overlay"]).mode == "RGB"
    assert (
        predict_main(
            ["--checkpoint", str(seg_best), "--input", str(tmp_path / "nothing"), "--out", str(tmp_path / "o2")]
        )
        == 2
    )


def test_multi_label_classification(sites, tmp_path):
    import shutil

    folder = tmp_path / "multi"
    shutil.copytree(sites["classification"], folder)
    spec = yaml.safe_load((folder / "dataset.yaml").read_text())
    spec.update(classes=["benign", "malignant", "second_look"], multi_label=True)
    (folder / "dataset.yaml").write_text(yaml.safe_dump(spec))
    rows = list(csv.DictReader((folder / "manifest.csv").open()))
    for i, row in enumerate(rows):
        row["label"] += ";second_look" if i % 2 else ""
    with (folder / "manifest.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    result = run_finetune(_cfg(folder, tmp_path / "run", "epochs=1"))
    assert set(result.test) == {"auc", "exact_match", "macro_f1"}
    model, meta = build_from_checkpoint(tmp_path / "run" / "best")
    assert meta["head"]["multi_label"] and model.multi_label
    probs = model.decode(model(torch.zeros(2, 1, 64, 64)))
    assert probs.shape == (2, 3) and not torch.allclose(probs.sum(1), torch.ones(2))


def test_mask_values_like_255_map_to_classes_and_back(sites, tmp_path):
    import shutil

    from PIL import Image

    from echocare_core.engine.predict import predict_files

    folder = tmp_path / "m255"
    shutil.copytree(sites["segmentation"], folder)
    for mask in (folder / "masks").iterdir():
        Image.fromarray((np.asarray(Image.open(mask)) * 255).astype(np.uint8)).save(mask)
    spec = yaml.safe_load((folder / "dataset.yaml").read_text())
    spec["labels"] = {0: "background", 255: "lesion"}
    (folder / "dataset.yaml").write_text(yaml.safe_dump(spec))
    run_finetune(_cfg(folder, tmp_path / "run", "epochs=1"))
    model, meta = build_from_checkpoint(tmp_path / "run" / "best")
    assert meta["head"]["num_classes"] == 2
    csv_path, _ = predict_files(tmp_path / "run" / "best", sorted((folder / "images").iterdir())[:2], tmp_path / "p")
    for row in csv.DictReader(csv_path.open()):
        assert set(np.unique(np.asarray(Image.open(tmp_path / "p" / row["mask"]))).tolist()) <= {0, 255}
