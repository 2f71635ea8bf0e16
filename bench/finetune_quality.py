"""Benchmark: does pretraining help fine-tuning? Test Dice / AUC per mode and a label-efficiency curve.

On synthetic ultrasound (`echocare-data synth`): pretrain a small encoder with `echocare-pretrain`
on unlabelled images, then fine-tune segmentation and classification from random initialisation and
from that checkpoint in each mode (full, frozen, lora), and fine-tune segmentation on 10/25/50/100% of
the training patients (`--equal-steps`: each fraction for the same number of optimiser steps,
epochs / fraction). Every seed (`--seeds`) draws its own datasets and fine-tuning randomness; tables
give mean and standard deviation over seeds. Prints tables, writes JSON and a PNG plot. Not a test.

    python bench/finetune_quality.py                       # about 20 minutes on 2 CPU cores
    python bench/finetune_quality.py --seeds 0 1 2 --equal-steps   # about 70 minutes
    python bench/finetune_quality.py --epochs 4 --pretrain-steps 100 --fractions 0.25 1.0   # quicker
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
from pathlib import Path

import numpy as np
import yaml

from echocare_core.config import load_config
from echocare_core.engine.finetune import run_finetune
from echocare_core.engine.finetune_config import FinetuneConfig
from echocare_core.engine.pretrain import run_pretraining
from echocare_core.engine.pretrain_config import PretrainConfig
from echocare_core.synthetic.dataset import write_dataset
from echocare_core.tasks import get_task

ROOT = Path(__file__).resolve().parents[1]
ENCODER = {"variant": "mini", "in_chans": 1, "img_size": 128, "window_size": 8, "drop_path": 0.1}


def pretrain(tmp: Path, steps: int, size: int = 128, overrides: tuple[str, ...] = ()) -> Path:
    """An encoder pretrained (MIM + anatomy, the demo's pretrain.yaml with `overrides`) on 600 unlabelled
    synthetic images of three scanners, none of them a benchmark's labelled images."""
    sources = write_dataset(tmp / "unlabelled", "pretrain", sites=3, per_site=200, size=size, seed=11)
    cfg = load_config(
        PretrainConfig,
        ROOT / "hospital_configs" / "pretrain_demo.yaml",
        [
            f"data.sources=[{','.join(map(str, sources))}]",
            f"output={tmp / 'pretrain'}",
            f"optim.steps={steps}",
            f"checkpoint.every_steps={steps}",
            "device=cpu",
            *overrides,
        ],
    )
    run_pretraining(cfg)
    return tmp / "pretrain" / "checkpoints" / f"step_{steps:06d}"


def subset(folder: Path, fraction: float, out: Path) -> Path:
    """A copy of the dataset's description whose train split keeps `fraction` of the patients."""
    rows = list(csv.DictReader((folder / "manifest.csv").open()))
    train_patients = sorted({r["patient"] for r in rows if r["split"] == "train"})
    keep = set(train_patients[: max(1, round(fraction * len(train_patients)))])
    out.mkdir(parents=True, exist_ok=True)
    (out / "dataset.yaml").write_text((folder / "dataset.yaml").read_text())
    with (out / "manifest.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for r in rows:
            if r["split"] != "train" or r["patient"] in keep:
                writer.writerow(
                    {
                        **r,
                        "image": str(folder / r["image"]),
                        **({"mask": str(folder / r["mask"])} if "mask" in r else {}),
                    }
                )
    return out


def finetune(
    folder: Path, out: Path, init: Path | None, mode: str, epochs: int, seed: int = 0, lr: float = 1e-3, **model
) -> dict:
    base = {
        "output": str(out),
        "device": "cpu",
        "seed": seed,
        "data": {"folder": str(folder), "num_workers": 1},
        "model": {"init": str(init) if init else None, "encoder": ENCODER, **model},
        "epochs": epochs,
        "train": {"mode": mode, "lr": lr, "batch_size": 16, "warmup_epochs": 1},
    }
    result = run_finetune(load_config(FinetuneConfig, None, [], base=base))
    task = yaml.safe_load((folder / "dataset.yaml").read_text())["task"]
    return {
        "task": task,
        "mode": mode,
        "init": "pretrained" if init else "random",
        "seed": seed,
        "test": result.test.get(get_task(task).main_metric, float("nan")),
        "trainable": result.trainable,
        "metrics": result.test,
        "seconds": sum(r["seconds"] for r in result.history),
    }


def plot(curve: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    fractions = sorted({r["fraction"] for r in curve})
    for init in ("random", "pretrained"):
        stats = [_mean_sd([r["test"] for r in curve if r["init"] == init and r["fraction"] == f]) for f in fractions]
        ax.errorbar(
            [100 * f for f in fractions],
            [m for m, _ in stats],
            yerr=[s for _, s in stats],
            marker="o",
            capsize=3,
            label=f"{init} init",
        )
    ax.set_xlabel("training patients used (%)")
    ax.set_ylabel("test Dice")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values))


def _cell(values: list[float]) -> str:
    m, s = _mean_sd(values)
    return f"{m:.3f} ± {s:.3f}" if len(values) > 1 else f"{m:.3f}"


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--pretrain-steps", type=int, default=300)
    p.add_argument("--modes", nargs="+", default=["full", "frozen", "lora"])
    p.add_argument("--fractions", nargs="+", type=float, default=[0.1, 0.25, 0.5, 1.0])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--equal-steps", action="store_true", help="train small label fractions for epochs / fraction")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "finetune_quality.json")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="echocare_ftq_") as name:
        tmp = Path(name)
        ckpt = pretrain(tmp, args.pretrain_steps)
        modes, curve = [], []
        for seed in args.seeds:
            data = {
                t: write_dataset(tmp / f"{t}_{seed}", t, sites=1, per_site=240, size=128, seed=21 + seed)[0]
                for t in ("segmentation", "classification")
            }
            modes += [
                finetune(
                    data[t], tmp / f"{t}_{m}_{i}_{seed}", ckpt if i == "pretrained" else None, m, args.epochs, seed
                )
                for t in data
                for m in args.modes
                for i in ("random", "pretrained")
            ]
            curve += [
                {
                    **finetune(
                        subset(data["segmentation"], f, tmp / f"sub{f}_{seed}"),
                        tmp / f"curve_{f}_{i}_{seed}",
                        ckpt if i == "pretrained" else None,
                        "lora",
                        max(args.epochs, round(args.epochs / f)) if args.equal_steps else args.epochs,
                        seed,
                    ),
                    "fraction": f,
                }
                for f in args.fractions
                for i in ("random", "pretrained")
            ]
    print(f"test metric, mean ± sd over seeds {args.seeds}")
    print(f"{'task':<15} {'mode':<7} {'init':<11} {'trainable':>10} {'test':>15}")
    for key in dict.fromkeys((r["task"], r["mode"], r["init"]) for r in modes):
        rs = [r for r in modes if (r["task"], r["mode"], r["init"]) == key]
        print(f"{key[0]:<15} {key[1]:<7} {key[2]:<11} {rs[0]['trainable']:>10,} {_cell([r['test'] for r in rs]):>15}")
    print(
        "\nsegmentation, lora: test Dice by share of training patients"
        + (" (same number of steps)" if args.equal_steps else "")
    )
    print(f"{'fraction':>8} {'random':>15} {'pretrained':>15}")
    for f in args.fractions:
        cells = [
            _cell([r["test"] for r in curve if r["init"] == i and r["fraction"] == f]) for i in ("random", "pretrained")
        ]
        print(f"{f:>8.2f} {cells[0]:>15} {cells[1]:>15}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {"args": {k: str(v) for k, v in vars(args).items()}, "modes": modes, "label_efficiency": curve}, indent=2
        )
    )
    plot(curve, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
