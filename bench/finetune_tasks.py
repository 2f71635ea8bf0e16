"""Benchmark: do the landmark, detection, clip-regression, enhancement and report heads learn? Test metrics
against trivial baselines.

On synthetic data from `echocare-data synth` (nodule calipers, cysts and solid nodules, echo clips
with an ejection fraction, low-end/high-end image pairs of one phantom, templated reports of a nodule),
fine-tune each head from random initialisation (full) and from an encoder pretrained with `echocare-pretrain`
(LoRA), and compare the test metric with what a model that learned nothing would score: the mean training
landmark positions (MRE), the mean training ejection fraction (MAE), no boxes (mAP 0), the low-end input
itself (SSIM), the most common training report for every study (BLEU-4). Prints a table and writes JSON. A
program, not a test.

    python bench/finetune_tasks.py                 # about 25 minutes on 2 CPU cores
    python bench/finetune_tasks.py --epochs 3 --pretrain-steps 50 --tasks landmarks    # quicker
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from finetune_quality import ROOT, finetune, pretrain

from echocare_core.data.io import read_image
from echocare_core.synthetic.dataset import write_dataset
from echocare_core.tasks import get_task
from echocare_core.tasks.enhancement import enhancement_metrics
from echocare_core.tasks.text_metrics import bleu, finding_metrics

PER_SITE = {"landmarks": 240, "detection": 240, "regression": 240, "enhancement": 240, "report": 400}
# regression collapses to the mean at 1e-3
LR = {"landmarks": 1e-3, "detection": 1e-3, "regression": 1e-4, "enhancement": 1e-3, "report": 1e-3}
REPORT = {"width": 128, "depth": 2, "heads": 4, "max_tokens": 160, "views": 2}  # synthetic reports: 100-150 bytes
SIZE = 128


def common_report_f1(folder: Path) -> float:
    """Finding F1 of the commonest training report written for every test study."""
    rows = list(csv.DictReader((folder / "manifest.csv").open()))
    common = Counter(r["report"] for r in rows if r["split"] == "train").most_common(1)[0][0]
    refs = [r["report"] for r in rows if r["split"] == "test"]
    findings = tuple(yaml.safe_load((folder / "dataset.yaml").read_text())["findings"])
    return finding_metrics([common] * len(refs), refs, findings)["finding_f1"]


def trivial_baseline(folder: Path, task: str) -> float:
    """The test metric of a constant prediction: the training mean (landmarks, regression), or no boxes."""
    rows = list(csv.DictReader((folder / "manifest.csv").open()))
    train = [r for r in rows if r["split"] == "train"]
    test = [r for r in rows if r["split"] == "test"]
    if task == "detection":
        return 0.0
    if task == "report":  # the commonest training report for every study
        common = Counter(r["report"] for r in train).most_common(1)[0][0]
        return bleu([common] * len(test), [r["report"] for r in test])
    if task == "regression":
        mean = np.mean([float(r["target"]) for r in train])
        return float(np.mean([abs(float(r["target"]) - mean) for r in test]))
    if task == "enhancement":  # the input as its own enhancement, at the model's size

        def load(name: str) -> torch.Tensor:
            return F.interpolate(
                torch.from_numpy(read_image(folder / name)).float()[None] / 255,
                size=(SIZE, SIZE),
                mode="bilinear",
                antialias=True,
                align_corners=False,
            )

        pairs = [(load(r["image"]), load(r["target_image"])) for r in test]
        return enhancement_metrics(torch.cat([a for a, _ in pairs]), torch.cat([b for _, b in pairs]))["ssim"]
    mean = np.mean([json.loads(r["landmarks"]) for r in train], axis=0)  # [K, 2]
    return float(np.mean([np.linalg.norm(np.asarray(json.loads(r["landmarks"])) - mean, axis=-1) for r in test]))


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--pretrain-steps", type=int, default=300)
    p.add_argument("--tasks", nargs="+", default=list(PER_SITE), choices=list(PER_SITE))
    p.add_argument("--frames", type=int, default=8, help="frames per clip the regression model sees")
    p.add_argument(
        "--findings-weight",
        type=float,
        default=1.0,
        help="report: weight of the findings classifier's loss (0: without the classifier)",
    )
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "finetune_tasks.json")
    args = p.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="echocare_ftt_") as name:
        tmp = Path(name)
        ckpt = pretrain(tmp, args.pretrain_steps)
        for task in args.tasks:
            folder = write_dataset(tmp / task, task, sites=1, per_site=PER_SITE[task], size=SIZE, seed=21)[0]
            baseline = trivial_baseline(folder, task)
            for init, mode in ((None, "full"), (ckpt, "lora")):
                extra = (
                    {"report": {**REPORT, "findings_weight": args.findings_weight}, "beam": 1}
                    if task == "report"
                    else {"frames": args.frames}
                )
                r = finetune(folder, tmp / f"{task}_{mode}", init, mode, args.epochs, lr=LR[task], **extra)
                results.append({**r, "baseline": baseline, "metric": get_task(task).main_metric})
                if task == "report":
                    results[-1]["baseline_finding_f1"] = common_report_f1(folder)
    print(f"{'task':<11} {'mode':<5} {'init':<11} {'metric':<6} {'test':>7} {'baseline':>9} {'train s':>8}")
    for r in results:
        print(
            f"{r['task']:<11} {r['mode']:<5} {r['init']:<11} {r['metric']:<6} {r['test']:>7.3f} "
            f"{r['baseline']:>9.3f} {r['seconds']:>8.0f}"
        )
    for r in results:
        if r["task"] == "report":
            print(
                f"report {r['mode']}/{r['init']}: finding F1 {r['metrics']['finding_f1']:.3f}, accuracy "
                f"{r['metrics']['finding_accuracy']:.3f} (commonest report: F1 {r['baseline_finding_f1']:.3f})"
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
