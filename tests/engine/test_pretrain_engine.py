"""The pretraining loop for real: tiny Swin, synthetic images, files on disk, real processes."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml
from conftest import tiny_pretrain_cfg, tiny_pretrain_dict
from PIL import Image

from echocare_core.checkpoint import build_from_checkpoint, latest_checkpoint, read_meta
from echocare_core.cli.pretrain import main as pretrain_main
from echocare_core.config import load_config
from echocare_core.engine.pretrain import NonFiniteLossError, run_pretraining
from echocare_core.engine.pretrain_config import PretrainConfig

pytestmark = pytest.mark.slow


def _losses(run_dir):
    return [(r["step"], r["loss"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


def _assert_same_curve(got, want):
    assert [s for s, _ in got] == [s for s, _ in want]
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)


def _write_cfg(path, sources, output, **overrides):
    cfg = tiny_pretrain_dict(sources, output)
    for key, value in overrides.items():
        section, _, name = key.partition("__")
        (cfg[section] if name else cfg)[name or section] = value
    path.write_text(yaml.safe_dump(cfg))
    return path


def _cli_env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_run_writes_checkpoints_metrics_report(pretrain_data, tmp_path):
    result = run_pretraining(tiny_pretrain_cfg(pretrain_data, tmp_path / "run"))
    assert result.status == "finished" and result.step == 6 and result.resumed_from == 0
    run = tmp_path / "run"
    assert [s for s, _ in _losses(run)] == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(loss) for _, loss in _losses(run))
    assert (run / "config.yaml").is_file() and (run / "report.md").is_file() and (run / "loss.png").is_file()
    ckpt = latest_checkpoint(run / "checkpoints")
    assert ckpt.name == "step_000006"
    meta = read_meta(ckpt)
    assert meta["input"] == {"channels": 1, "size": 64, "mean": 0.5, "std": 0.5}
    assert meta["metrics"]["loss"] == pytest.approx(_losses(run)[-1][1])
    model, _ = build_from_checkpoint(ckpt)  # rebuilt from the checkpoint alone
    assert model.encoder.cfg.variant == "test"
    # the pretrained encoder is what the next run (or fine-tuning) starts from
    again = run_pretraining(
        tiny_pretrain_cfg(pretrain_data, tmp_path / "run2", ["optim.steps=1"], init_weights=str(ckpt))
    )
    assert again.step == 1


def test_stop_and_resume_continue_the_same_loss_curve(pretrain_data, tmp_path):
    run_pretraining(tiny_pretrain_cfg(pretrain_data, tmp_path / "straight"))
    polls = iter(range(100))
    stopped = run_pretraining(tiny_pretrain_cfg(pretrain_data, tmp_path / "split"), stop=lambda: next(polls) >= 3)
    assert stopped.status == "stopped" and stopped.step == 4  # stop asked after step 4: checkpoint, then out
    resumed = run_pretraining(tiny_pretrain_cfg(pretrain_data, tmp_path / "split"))
    assert resumed.resumed_from == 4 and resumed.step == 6
    _assert_same_curve(_losses(tmp_path / "split"), _losses(tmp_path / "straight"))


def test_killed_run_resumes_from_last_checkpoint(pretrain_data, tmp_path):
    """SIGKILL mid-run (no chance to save), rerun the same command: the curve equals an uninterrupted one."""
    steps = [
        "--set",
        "optim.steps=12",
        "--set",
        "checkpoint.every_steps=3",
        "--set",
        "log_every=2",
        "--set",
        "data.num_workers=1",
    ]  # a persistent worker, and metric lines averaging 2 steps
    cfg = _write_cfg(tmp_path / "pretrain.yaml", pretrain_data, tmp_path / "killed")
    cmd = [sys.executable, "-m", "echocare_core.cli.pretrain", "--config", str(cfg), *steps]
    proc = subprocess.Popen(cmd, env=_cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = tmp_path / "killed" / "checkpoints"
    while proc.poll() is None and not (ckpts / "step_000003" / "meta.json").exists():
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    done = subprocess.run(cmd, env=_cli_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "resumed at step" in done.stderr
    ref = _write_cfg(tmp_path / "ref.yaml", pretrain_data, tmp_path / "ref")
    subprocess.run(
        [sys.executable, "-m", "echocare_core.cli.pretrain", "--config", str(ref), *steps],
        env=_cli_env(),
        check=True,
        capture_output=True,
    )
    assert [s for s, _ in _losses(tmp_path / "killed")] == list(range(2, 13, 2))
    _assert_same_curve(_losses(tmp_path / "killed"), _losses(tmp_path / "ref"))


def test_ctrl_c_saves_and_exits_cleanly(pretrain_data, tmp_path):
    cfg = _write_cfg(tmp_path / "pretrain.yaml", pretrain_data, tmp_path / "run", optim__steps=200)
    proc = subprocess.Popen(
        [sys.executable, "-m", "echocare_core.cli.pretrain", "--config", str(cfg)],
        env=_cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = tmp_path / "run" / "metrics.jsonl"
    while proc.poll() is None and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate()
    assert proc.returncode == 130, err
    step = read_meta(latest_checkpoint(tmp_path / "run" / "checkpoints"))["step"]
    assert 2 <= step < 200 and f"stopped at step {step}" in " ".join(err.split())


def test_unreadable_files_are_reported_and_skipped(pretrain_data, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for src in sorted((pretrain_data[0] / "images").iterdir())[:14]:
        shutil.copy(src, folder / src.name)
    (folder / "zz_broken.png").write_bytes(b"not a png at all")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(folder / "zz_black.png")
    result = run_pretraining(tiny_pretrain_cfg([folder], tmp_path / "run", ["optim.steps=4", "optim.batch_size=8"]))
    assert result.status == "finished"
    assert result.skipped == {"unreadable": 1, "near-empty": 1}  # files, each counted once over 2 epochs
    log = (tmp_path / "run" / "skipped_files.csv").read_text().splitlines()
    assert len(log) == 3 and "zz_broken.png" in log[1] + log[2] and "zz_black.png" in log[1] + log[2]
    assert "1 unreadable, 1 near-empty" in (tmp_path / "run" / "report.md").read_text()


def test_a_micro_batch_with_nothing_readable_still_steps(pretrain_data, tmp_path):
    folder = tmp_path / "mostly_broken"
    folder.mkdir()
    shutil.copy(sorted((pretrain_data[0] / "images").iterdir())[0], folder / "good.png")
    for i in range(3):
        (folder / f"broken{i}.png").write_bytes(b"nope")
    result = run_pretraining(
        tiny_pretrain_cfg([folder], tmp_path / "run", ["optim.steps=4", "optim.batch_size=1", "optim.micro_batch=1"])
    )
    assert result.status == "finished" and result.skipped["unreadable"] == 3
    assert all(np.isfinite(loss) for _, loss in _losses(tmp_path / "run"))


def test_non_finite_loss_stops_with_a_clear_message(pretrain_data, tmp_path):
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step 1"):
        run_pretraining(tiny_pretrain_cfg(pretrain_data, tmp_path / "run", hie_weight=float("nan")))
    assert latest_checkpoint(tmp_path / "run" / "checkpoints") is None


def test_resume_refuses_another_model(pretrain_data, tmp_path):
    run_pretraining(tiny_pretrain_cfg(pretrain_data, tmp_path / "run", ["optim.steps=3"]))
    with pytest.raises(ValueError, match="another model config"):
        run_pretraining(tiny_pretrain_cfg(pretrain_data, tmp_path / "run", ["model.variant=mini"]))


def test_cli_bad_input_exits_2_naming_the_problem(pretrain_data, tmp_path, capsys):
    cfg = _write_cfg(tmp_path / "p.yaml", pretrain_data, tmp_path / "run")
    assert pretrain_main(["--config", str(cfg), "--set", "optim.lrr=1"]) == 2
    assert "unknown key 'optim.lrr'" in capsys.readouterr().err.replace("\n", "")
    assert pretrain_main(["--config", str(cfg), "--set", f"data.sources=[{tmp_path / 'nope'}]"]) == 2
    assert "nope" in capsys.readouterr().err
    assert pretrain_main(["--config", str(tmp_path / "absent.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_on_gloo(pretrain_data, tmp_path):
    # 2 processes x micro-batch 8 x accumulation 2 = 32 images per step: the no_sync path runs too
    cfg = _write_cfg(tmp_path / "p.yaml", pretrain_data, tmp_path / "ddp", optim__steps=4, optim__batch_size=32)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        "-m",
        "echocare_core.cli.pretrain",
        "--config",
        str(cfg),
    ]
    done = subprocess.run(cmd, env=_cli_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    meta = read_meta(latest_checkpoint(tmp_path / "ddp" / "checkpoints"))
    assert meta["step"] == 4 and len(meta["rank_fingerprints"]) == 2
    assert meta["rank_fingerprints"][0] == pytest.approx(meta["rank_fingerprints"][1], rel=1e-12)
    assert [s for s, _ in _losses(tmp_path / "ddp")] == [1, 2, 3, 4]
    # resuming that run in one process would change which images each step sees: refused
    with pytest.raises(ValueError, match="made by 2 process"):
        run_pretraining(load_config(PretrainConfig, cfg, ["optim.steps=6"]))


def test_unreadable_latest_checkpoint_falls_back_to_the_one_before(pretrain_data, tmp_path, caplog):
    run_pretraining(tiny_pretrain_cfg(pretrain_data, tmp_path / "run"))  # checkpoints at steps 3 and 6
    (tmp_path / "run" / "checkpoints" / "step_000006" / "model.safetensors").write_bytes(b"")  # power loss
    result = run_pretraining(tiny_pretrain_cfg(pretrain_data, tmp_path / "run", ["optim.steps=7"]))
    assert result.resumed_from == 3 and result.step == 7
    assert "step_000006 is unreadable" in caplog.text
