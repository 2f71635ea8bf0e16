"""Benchmark: what to share in a federation. Sharing modes, and multi-task vs single-task federations.

On synthetic ultrasound, from a small encoder pretrained with `echocare-pretrain` on unlabelled images,
every arm runs the federation's own code (`site_round` at each site, `aggregate` at the server) in-process
for the same rounds of one local epoch; each site's final model is tested on fresh images from its own
scanner (`--test-per-site`). Flower's transport changes the cost of a round, not its arithmetic.

- modes: three segmentation sites (100%, 60% and 25% of `--per-site` images) federate with the whole model
  shared (mode full), the whole model with its norm layers site-local (FedBN), LoRA adapters + head, and
  the head only (frozen encoder). Test Dice per site.
- multitask: two segmentation and two classification sites (one large, one small each). Each site alone;
  single-task federations (each task's sites together) sharing LoRA adapters and head, or the adapters
  only (heads local); one multi-task federation of all four, adapters shared by all, each task's head
  shared by its sites (the default, `heads: shared`) or kept at each site (`heads: local`). Test Dice /
  AUC per site.

Prints tables, writes JSON. Not a test.

    python bench/sharing_quality.py                    # both parts, 3 seeds: about 12 minutes on 2 CPU cores
    python bench/sharing_quality.py --parts modes --seeds 0 --rounds 5   # quicker
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from finetune_quality import pretrain  # the benchmarks' one pretraining recipe
from safetensors.torch import load_file

from echocare_core.data.contract import load_spec, read_manifest
from echocare_core.engine.training import LocalTraining, evaluate
from echocare_core.federation.job import MULTITASK_LOCAL, Job, TaskSpec, job_hash, task_for, task_view
from echocare_core.federation.rounds import aggregate, initial_state
from echocare_core.federation.site import build_job_model, local_layers_file, site_round
from echocare_core.federation.strategies import StrategyConfig
from echocare_core.models.swin import EncoderConfig
from echocare_core.synthetic.dataset import keep_patients, write_dataset
from echocare_core.tasks import get_task
from echocare_core.tasks.dataset import TaskDataset

FEDAVG = StrategyConfig("fedavg")  # as measured in docs/benchmarks.md (the default fednova: federated_quality.py)
ROOT = Path(__file__).resolve().parents[1]
TEST_SIZE = ("model.variant=test", "model.img_size=64", "model.window_size=4", "mim.mask_patch_size=16")
ENCODER = EncoderConfig(variant="test", in_chans=1, img_size=64, window_size=4)
MODES = {  # arm: (train.mode, the job's site-local layers)
    "whole": ("full", ()),
    "whole, norms local": ("full", ("*norm*",)),
    "lora + head": ("lora", ()),
    "head only": ("frozen", ()),
}
SHARES = (1.0, 0.6, 0.25)


def federate(job: Job, init: Path, folders: list[Path], rounds: int, state_dir: Path) -> list[dict]:
    """Each site's final weights (the global model, with the layers it kept) after `rounds` rounds."""
    state = initial_state(job, str(init))
    local = [local_layers_file(state_dir / f"site_{i}", job_hash(job)) for i in range(len(folders))]
    for rnd in range(1, rounds + 1):
        results = [site_round(job, state, f, rnd, local_file=file, rounds=rounds) for f, file in zip(folders, local)]
        state, _ = aggregate(state, [(r.shared, r.samples) for r in results], job, FEDAVG)
    return [{**state, **(load_file(str(file)) if file.is_file() else {})} for file in local]


def test_metric(job: Job, weights: dict, folder: Path) -> float:
    """The main metric of the site's model on all images of `folder` (fresh images of the site's scanner)."""
    spec = load_spec(folder)
    index, job = task_for(job, spec)
    model = build_job_model(job)
    model.load_state_dict(task_view(weights, index))  # a multi-task job's shared head of the site's task
    ds = TaskDataset(folder, spec, read_manifest(folder)[1], ENCODER.img_size, ENCODER.in_chans, False, ENCODER.scale)
    return evaluate(model, ds, torch.device("cpu"), job.num_outputs, 16)[get_task(job.task).main_metric]


def sites(tmp: Path, task: str, shares: tuple[float, ...], args: argparse.Namespace, seed: int) -> tuple[list, list]:
    train = write_dataset(tmp / task / "train", task, len(shares), args.per_site, size=64, seed=seed)
    for folder, share in zip(train, shares):
        keep_patients(folder, share)
    test = write_dataset(tmp / task / "test", task, len(shares), args.test_per_site, size=64, seed=seed + 1000)
    return train, test


def modes(tmp: Path, init: Path, args: argparse.Namespace, seed: int) -> dict:
    train, test = sites(tmp, "segmentation", SHARES, args, seed)
    base = Job(
        task="segmentation",
        labels=(0, 1),
        encoder=ENCODER,
        feature_size=8,
        seed=seed,
        train=LocalTraining(lora_rank=args.lora_rank, lr=args.lr, batch_size=8),
    )
    scores = {}
    for arm, (mode, local) in MODES.items():
        job = replace(base, train=replace(base.train, mode=mode), local=local)
        final = federate(job, init, train, args.rounds, tmp / "state" / arm)
        scores[arm] = [test_metric(job, w, folder) for w, folder in zip(final, test)]
    return {"part": "modes", "seed": seed, "sites": [f"segmentation ({_n(f)} train)" for f in train], "scores": scores}


def multitask(tmp: Path, init: Path, args: argparse.Namespace, seed: int) -> dict:
    seg, seg_test = sites(tmp, "segmentation", (1.0, 0.25), args, seed)
    cls, cls_test = sites(tmp, "classification", (1.0, 0.25), args, seed)
    common = dict(
        encoder=ENCODER,
        feature_size=8,
        seed=seed,
        train=LocalTraining(mode="lora", lora_rank=args.lora_rank, lr=args.lr, batch_size=8),
    )
    jobs = {
        "segmentation": Job(task="segmentation", labels=(0, 1), **common),
        "classification": Job(task="classification", classes=tuple(load_spec(cls[0]).classes), **common),
    }
    multi = Job(
        task="multitask",
        tasks=(
            TaskSpec("segmentation", labels=(0, 1)),
            TaskSpec("classification", classes=jobs["classification"].classes),
        ),
        **common,
    )
    folders, tests = seg + cls, seg_test + cls_test
    per_task = {"segmentation": seg, "classification": cls}
    single = [
        w
        for task, job in jobs.items()
        for w in federate(job, init, per_task[task], args.rounds, tmp / "state" / f"single_{task}")
    ]
    heads_local = [
        w
        for task, job in jobs.items()
        for w in federate(
            replace(job, local=MULTITASK_LOCAL), init, per_task[task], args.rounds, tmp / "state" / f"local_{task}"
        )
    ]
    alone = [
        federate(jobs[load_spec(f).task], init, [f], args.rounds, tmp / "state" / f"alone_{i}")[0]
        for i, f in enumerate(folders)
    ]
    together = federate(multi, init, folders, args.rounds, tmp / "state" / "multi")
    apart = federate(replace(multi, heads="local"), init, folders, args.rounds, tmp / "state" / "multi_local")
    scores = {
        "site alone": [test_metric(multi, w, f) for w, f in zip(alone, tests)],
        "single-task federation": [test_metric(multi, w, f) for w, f in zip(single, tests)],
        "single-task, heads local": [test_metric(multi, w, f) for w, f in zip(heads_local, tests)],
        "multi-task, heads local": [test_metric(multi, w, f) for w, f in zip(apart, tests)],
        "multi-task, heads shared": [test_metric(multi, w, f) for w, f in zip(together, tests)],
    }
    return {
        "part": "multitask",
        "seed": seed,
        "scores": scores,
        "sites": [f"{load_spec(f).task} ({_n(f)} train)" for f in folders],
    }


def _n(folder: Path) -> int:
    return sum(r.get("split") == "train" for r in read_manifest(folder)[1])


def summary(results: list[dict]) -> None:
    for part in dict.fromkeys(r["part"] for r in results):
        runs = [r for r in results if r["part"] == part]
        arms = list(runs[0]["scores"])
        print(
            f"\n{part}: test metric per site (Dice for segmentation, AUC for classification), mean ± sd over "
            f"{len(runs)} seed(s)"
        )
        print(f"{'site':<28}" + "".join(f"{arm:>26}" for arm in arms))
        for i, site in enumerate(runs[0]["sites"]):
            cells = [
                f"{np.mean([r['scores'][a][i] for r in runs]):.3f} ± {np.std([r['scores'][a][i] for r in runs]):.3f}"
                for a in arms
            ]
            print(f"{site:<28}" + "".join(f"{c:>26}" for c in cells))


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--parts", nargs="+", default=["modes", "multitask"], choices=["modes", "multitask"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=10, help="rounds of one local epoch")
    p.add_argument("--per-site", type=int, default=100, help="images at the largest site")
    p.add_argument("--test-per-site", type=int, default=40, help="held-out images per site")
    p.add_argument("--pretrain-steps", type=int, default=300)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "sharing_quality.json")
    args = p.parse_args()
    torch.set_num_threads(2)
    logging.getLogger("echocare_core.federation.rounds").setLevel(logging.ERROR)  # "LoRA keys missing" each arm
    results = []
    with tempfile.TemporaryDirectory(prefix="echocare_sq_") as name:
        t0 = time.perf_counter()
        init = pretrain(Path(name), args.pretrain_steps, 64, TEST_SIZE)
        print(f"pretrained in {time.perf_counter() - t0:.0f} s", flush=True)
        for seed in args.seeds:
            for part in args.parts:
                t0 = time.perf_counter()
                run = {"modes": modes, "multitask": multitask}[part]
                results.append(
                    {**run(Path(name) / f"{part}_{seed}", init, args, seed), "seconds": time.perf_counter() - t0}
                )
                print(f"{part} seed {seed}: {results[-1]['seconds']:.0f} s", flush=True)
    summary(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
