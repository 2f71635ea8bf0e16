"""Benchmark: federated (FedAvg, FedProx) vs local-only vs centralised, per site, with the same total epochs.

Three synthetic hospitals with different scanners and sizes (100%, 60% and 25% of `--per-site`
images; the smallest has a handful of training patients). Every arm runs the same code the real
federation runs at a site and at the server (`site_round`, `aggregate`), from the same initial model,
for `--rounds` rounds of one local epoch, so only who sees which data differs:
- fedavg / fedprox: the three sites federate (FedProx adds mu/2 |w - w_global|^2 at the sites);
- local-only: each site alone (a federation of one);
- centralised: all sites' training images pooled at one place (what hospitals cannot do).
Each final model is tested on every site's held-out images (`--test-per-site` fresh images from that
site's scanner, so that small sites are not judged on three test images). Prints a table per task,
writes JSON. The round loop is run in-process: Flower's transport changes the cost (see
federation_overhead.py), not the arithmetic. Not a test.

    python bench/federated_quality.py                          # about 25 minutes on 2 CPU cores
    python bench/federated_quality.py --tasks segmentation --seeds 0 --rounds 4   # quicker
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from echocare_core.data.contract import load_spec, read_manifest
from echocare_core.engine.training import LocalTraining, evaluate
from echocare_core.federation.job import Job
from echocare_core.federation.rounds import aggregate, initial_state
from echocare_core.federation.site import build_job_model, site_round
from echocare_core.federation.strategies import StrategyConfig
from echocare_core.models.swin import EncoderConfig
from echocare_core.synthetic.dataset import keep_patients, pool_sites, write_dataset
from echocare_core.tasks import get_task
from echocare_core.tasks.dataset import TaskDataset

ROOT = Path(__file__).resolve().parents[1]
ENCODER = EncoderConfig(variant="test", in_chans=1, img_size=64, window_size=4)
SHARES = (1.0, 0.6, 0.25)  # of --per-site: one large, one middle, one small hospital
ARMS = ("fedavg", "fedprox", "local-only", "centralised")


def federate(job: Job, folders: list[Path], rounds: int, strategy: StrategyConfig) -> dict[str, torch.Tensor]:
    """The global model after `rounds` rounds over `folders` (one folder: training alone)."""
    state, server_state = initial_state(job, None), {}
    for rnd in range(1, rounds + 1):
        results = [site_round(job, state, folder, rnd, rounds=rounds) for folder in folders]
        state, server_state = aggregate(state, [(r.shared, r.samples) for r in results], strategy, server_state)
    return state


def held_out_metric(job: Job, state: dict[str, torch.Tensor], folder: Path) -> float:
    """The task's main metric of `state` over all images of `folder`."""
    model = build_job_model(job)
    model.load_state_dict(state)
    spec, rows = load_spec(folder), read_manifest(folder)[1]
    ds = TaskDataset(folder, spec, rows, ENCODER.img_size, ENCODER.in_chans, False, ENCODER.scale)
    return evaluate(model, ds, torch.device("cpu"), job.num_outputs, 16)[get_task(job.task).main_metric]


def run(task: str, seed: int, args: argparse.Namespace, tmp: Path) -> dict:
    sites = write_dataset(tmp / f"{task}_{seed}" / "sites", task, len(SHARES), args.per_site, size=64, seed=seed)
    for site, share in zip(sites, SHARES):
        keep_patients(site, share)
    held_out = write_dataset(
        tmp / f"{task}_{seed}" / "test", task, len(SHARES), args.test_per_site, size=64, seed=seed + 1000
    )
    spec = load_spec(sites[0])
    job = Job(
        task=task,
        classes=spec.classes,
        labels=tuple(sorted(spec.labels)),
        encoder=ENCODER,
        feature_size=8,
        seed=seed,
        train=LocalTraining(mode="full", lr=args.lr, batch_size=8),
    )
    t0 = time.perf_counter()
    pooled = pool_sites(sites, tmp / f"{task}_{seed}" / "pooled")
    models = {
        "fedavg": [federate(job, sites, args.rounds, StrategyConfig())] * len(sites),
        "fedprox": [federate(replace(job, proximal_mu=args.mu), sites, args.rounds, StrategyConfig("fedprox"))]
        * len(sites),
        "local-only": [federate(job, [site], args.rounds, StrategyConfig()) for site in sites],
        "centralised": [federate(job, [pooled], args.rounds, StrategyConfig())] * len(sites),
    }
    train = [sum(r.get("split") == "train" for r in read_manifest(site)[1]) for site in sites]
    scores = {
        arm: [held_out_metric(job, state, test) for state, test in zip(states, held_out)]
        for arm, states in models.items()
    }
    return {
        "task": task,
        "seed": seed,
        "train_images": train,
        "test_images": args.test_per_site,
        "metric": get_task(task).main_metric,
        "scores": scores,
        "seconds": time.perf_counter() - t0,
    }


def summary(results: list[dict]) -> None:
    for task in dict.fromkeys(r["task"] for r in results):
        runs = [r for r in results if r["task"] == task]
        metric, train = runs[0]["metric"], runs[0]["train_images"]
        print(
            f"\n{task}: test {metric} per site (mean ± sd over {len(runs)} seed(s); "
            f"{runs[0]['test_images']} held-out images per site)"
        )
        print(f"{'site (train images)':<22}" + "".join(f"{arm:>16}" for arm in ARMS))
        for i, n in enumerate(train):
            cells = []
            for arm in ARMS:
                v = [r["scores"][arm][i] for r in runs]
                cells.append(f"{np.mean(v):.3f} ± {np.std(v):.3f}")
            print(f"{f'site_{i:02d} ({n})':<22}" + "".join(f"{c:>16}" for c in cells))
        means = {arm: np.mean([np.mean(r["scores"][arm]) for r in runs]) for arm in ARMS}
        print(f"{'mean over sites':<22}" + "".join(f"{means[arm]:>16.3f}" for arm in ARMS))
        print(
            f"fedavg / centralised: {means['fedavg'] / means['centralised']:.3f}; "
            f"fedprox / centralised: {means['fedprox'] / means['centralised']:.3f}"
        )


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--tasks", nargs="+", default=["segmentation", "classification"], choices=["segmentation", "classification"]
    )
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=15, help="rounds of one local epoch (= epochs of every arm)")
    p.add_argument("--per-site", type=int, default=120, help="images at the largest site")
    p.add_argument("--test-per-site", type=int, default=40, help="held-out images per site")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--mu", type=float, default=0.01, help="FedProx proximal_mu")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "federated_quality.json")
    args = p.parse_args()
    torch.set_num_threads(2)
    results = []
    with tempfile.TemporaryDirectory(prefix="echocare_fq_") as name:
        for task in args.tasks:
            for seed in args.seeds:
                results.append(run(task, seed, args, Path(name)))
                print(f"{task} seed {seed}: {results[-1]['seconds']:.0f} s", flush=True)
    summary(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
