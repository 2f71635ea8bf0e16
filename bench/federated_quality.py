"""Benchmark: federated vs local-only vs centralised, per site, with the same local compute.

Three synthetic hospitals with different scanners and sizes (100%, 60% and 25% of `--per-site`
images; the smallest has a handful of training patients). Every arm starts from the same EchoCare-family
encoder (the test member, pretrained here with `echocare-pretrain` on unlabelled images of the three
scanners; `--init random` for random weights) and runs the code the real federation runs at a site and at
the server (`site_round`, `aggregate`) for `--rounds` rounds of one local epoch, so only who sees which
data and how the server aggregates differ:
- fedavg: the sample-weighted mean of the sites' models;
- fednova: the toolkit's default strategy (each site's update per local step, a server step of 2);
- fednova+personal: that global model fine-tuned at each site for `--personalise` epochs
  (`echocare-client model --personalise`), each site scored on its own model;
- local-only: each site alone (a federation of one);
- centralised: all sites' training images pooled at one place (what hospitals cannot do).
Each model is tested on every site's held-out images (`--test-per-site` fresh images from that site's
scanner, so that small sites are not judged on three test images). Prints a table per task, writes JSON.
The round loop is run in-process: Flower's transport changes the cost (see federation_overhead.py), not the
arithmetic. Not a test.

    python bench/federated_quality.py --tasks segmentation     # 12 minutes on 2 CPU cores (both tasks: twice that)
    python bench/federated_quality.py --seeds 0 --rounds 4     # quicker
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from finetune_quality import pretrain  # the benchmarks' one pretraining recipe

from echocare_core.checkpoint import load_task_model
from echocare_core.data.contract import load_spec, read_manifest
from echocare_core.engine.training import LocalTraining, evaluate
from echocare_core.federation.job import Job
from echocare_core.federation.rounds import aggregate, initial_state, save_round, site_model
from echocare_core.federation.site import build_job_model, site_round
from echocare_core.federation.strategies import StrategyConfig
from echocare_core.models.swin import EncoderConfig
from echocare_core.synthetic.dataset import keep_patients, pool_sites, write_dataset
from echocare_core.tasks import get_task
from echocare_core.tasks.dataset import TaskDataset

ROOT = Path(__file__).resolve().parents[1]
ENCODER = EncoderConfig(variant="test", in_chans=1, img_size=64, window_size=4)
SHARES = (1.0, 0.6, 0.25)  # of --per-site: one large, one middle, one small hospital
TEST_SIZE = tuple(
    f"model.{k}={v}" for k, v in (("variant", "test"), ("img_size", 64), ("in_chans", 1), ("window_size", 4))
) + ("mim.mask_patch_size=8", "data.num_workers=0")  # the pretrained test member the arms start from
ALONE = StrategyConfig("fedavg")  # a federation of one is plain training: the server takes the site's model
ARMS = ("fedavg", "fednova", "fednova+personal", "local-only", "centralised")


def federate(
    job: Job, init: str | None, folders: list[Path], rounds: int, strategy: StrategyConfig
) -> dict[str, torch.Tensor]:
    """The global model after `rounds` rounds over `folders` (one folder: training alone)."""
    state, server_state = initial_state(job, init), {}
    for rnd in range(1, rounds + 1):
        results = [site_round(job, state, folder, rnd, rounds=rounds) for folder in folders]
        state, server_state = aggregate(state, [(r.shared, r.samples) for r in results], job, strategy, server_state)
    return state


def personalised(job: Job, state: dict[str, torch.Tensor], site: Path, epochs: int, tmp: Path) -> dict:
    """The site's own model: the global checkpoint fine-tuned at the site as `echocare-client model` does."""
    shutil.rmtree(tmp, ignore_errors=True)
    path, _ = site_model(save_round(tmp / "run", job, state, 1, {}, []), site, tmp / "state", tmp / "own", epochs)
    model, _ = load_task_model(path)
    return model.state_dict()


def held_out_metric(job: Job, state: dict[str, torch.Tensor], folder: Path) -> float:
    """The task's main metric of `state` over all images of `folder`."""
    model = build_job_model(job)
    model.load_state_dict(state)
    spec, rows = load_spec(folder), read_manifest(folder)[1]
    ds = TaskDataset(folder, spec, rows, ENCODER.img_size, ENCODER.in_chans, False, ENCODER.scale)
    return evaluate(model, ds, torch.device("cpu"), job.num_outputs, 16)[get_task(job.task).main_metric]


def run(task: str, seed: int, args: argparse.Namespace, init: str | None, tmp: Path) -> dict:
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
    fednova = federate(job, init, sites, args.rounds, StrategyConfig())
    own = tmp / f"{task}_{seed}" / "own"
    models = {
        "fedavg": [federate(job, init, sites, args.rounds, StrategyConfig("fedavg"))] * len(sites),
        "fednova": [fednova] * len(sites),
        "fednova+personal": [personalised(job, fednova, site, args.personalise, own) for site in sites],
        "local-only": [federate(job, init, [site], args.rounds, ALONE) for site in sites],
        "centralised": [federate(job, init, [pooled], args.rounds, ALONE)] * len(sites),
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
        print(f"{'site (train images)':<22}" + "".join(f"{arm:>18}" for arm in ARMS))
        for i, n in enumerate(train):
            cells = []
            for arm in ARMS:
                v = [r["scores"][arm][i] for r in runs]
                cells.append(f"{np.mean(v):.3f} ± {np.std(v):.3f}")
            print(f"{f'site_{i:02d} ({n})':<22}" + "".join(f"{c:>18}" for c in cells))
        means = {arm: np.mean([np.mean(r["scores"][arm]) for r in runs]) for arm in ARMS}
        print(f"{'mean over sites':<22}" + "".join(f"{means[arm]:>18.3f}" for arm in ARMS))
        print("/ centralised: " + "; ".join(f"{arm} {means[arm] / means['centralised']:.3f}" for arm in ARMS[:-1]))


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
    p.add_argument("--init", choices=("pretrained", "random"), default="pretrained")
    p.add_argument("--pretrain-steps", type=int, default=300, help="echocare-pretrain steps for --init pretrained")
    p.add_argument("--personalise", type=int, default=2, help="epochs of fednova+personal at each site")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "federated_quality.json")
    args = p.parse_args()
    torch.set_num_threads(2)
    results = []
    with tempfile.TemporaryDirectory(prefix="echocare_fq_") as name:
        init = str(pretrain(Path(name), args.pretrain_steps, 64, TEST_SIZE)) if args.init == "pretrained" else None
        for task in args.tasks:
            for seed in args.seeds:
                results.append(run(task, seed, args, init, Path(name)))
                print(f"{task} seed {seed}: {results[-1]['seconds']:.0f} s", flush=True)
    summary(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
