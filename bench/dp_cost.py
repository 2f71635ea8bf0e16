"""Benchmark: what differential privacy costs at a site: step time and memory, and quality against epsilon.

Step cost: a segmentation model (the `mini` encoder at 128 px, batch 16) in each fine-tuning mode
(full, frozen, LoRA), without DP and with DP-SGD in each of our modes (hooks: every per-sample
gradient; ghost: per-sample norms only with the mixed Linear rule, two backward passes), each in a
fresh process: median time of a training step and the peak resident memory the steps added.

Utility: three synthetic hospitals of realistic size (`--per-site` images each, different scanners)
federate a segmentation (or `--task classification`) model from a pretrained EchoCare-family encoder
(the test member at 64 px, pretrained here as in federated_quality.py; segmentation with the few-parameter
`light` decoder unless `--decoder unetr`) with the default strategy, for each arm MODE:EPSILON (epsilon for
the whole job, delta 1e-5; 0: no DP), Poisson batches of `--batch` expected samples, and are tested on 40
held-out images of every site's scanner. Prints tables, writes JSON and a plot of the task's metric against
epsilon. Not a test.

    python bench/dp_cost.py --skip-utility        # step cost only, a few minutes
    python bench/dp_cost.py --skip-cost           # utility: about 20 minutes per seed on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from federated_quality import TEST_SIZE, held_out_metric  # the same encoder and test as that benchmark
from finetune_quality import pretrain  # the benchmarks' one pretraining recipe
from monai.losses import DiceCELoss

from echocare_core.data.contract import load_spec, read_manifest
from echocare_core.engine.optim import build_optimizer
from echocare_core.engine.training import LocalTraining
from echocare_core.federation.job import Job
from echocare_core.federation.rounds import aggregate, initial_state
from echocare_core.federation.site import site_round
from echocare_core.federation.site_terms import SiteLimits
from echocare_core.federation.strategies import StrategyConfig
from echocare_core.models.lora import apply_finetune_mode
from echocare_core.models.swin import EncoderConfig
from echocare_core.privacy.dp import DPTraining
from echocare_core.privacy.settings import DPSettings, SitePrivacy
from echocare_core.synthetic.dataset import write_dataset
from echocare_core.tasks import get_task
from echocare_core.tasks.model import EchoCareTaskModel

ROOT = Path(__file__).resolve().parents[1]
MODES = ("full", "frozen", "lora")
DP_MODES = ("none", "hooks", "ghost")


def step_cost(mode: str, dp_mode: str, steps: int) -> dict:
    """Median step time and added peak RSS of one configuration (run in its own process)."""
    torch.manual_seed(0)
    model = EchoCareTaskModel(
        EncoderConfig(variant="mini", in_chans=1, img_size=128, window_size=8, drop_path=0.0),
        "segmentation",
        2,
        feature_size=16,
    )
    apply_finetune_mode(model, mode, lora_rank=8)
    optimizer = build_optimizer(model, 1e-4, 0.05, (0.9, 0.999))
    for m in model.modules():  # the same attention path in both arms (DP needs the explicit one)
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    net, dp = model, None
    if dp_mode != "none":
        dp = DPTraining(model, optimizer, DPSettings(epsilon=8.0, mode=dp_mode), sigma=1.0, expected_batch_size=16)
        net, optimizer = dp.module, dp.optimizer
    dice_ce = DiceCELoss(to_onehot_y=True, softmax=True, batch=False)
    x, y = torch.randn(16, 1, 128, 128), torch.randint(0, 2, (16, 1, 128, 128))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        (dice_ce(net(x), y) if dp is None else dp.loss(dice_ce, net(x), y)).backward()
        if dp is not None:
            dp.check(16)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    added = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "mode": mode,
        "dp": dp_mode,
        "step_s": statistics.median(times),
        "added_peak_mb": added,
        "trainable": trainable,
    }


def step_costs(args: argparse.Namespace) -> list[dict]:
    """Every (mode, DP mode) configuration's step cost, each in a fresh process; prints the table."""
    costs = []
    for mode in MODES:
        for dp_mode in DP_MODES:
            done = subprocess.run(
                [sys.executable, __file__, "--one", mode, dp_mode, "--steps", str(args.steps)],
                capture_output=True,
                text=True,
                check=True,
            )
            costs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(
        f"{'mode':<7} {'trainable':>10} "
        + " ".join(f"{f'{d} step s':>14}" for d in DP_MODES)
        + "  "
        + " ".join(f"{f'{d} / none':>13}" for d in DP_MODES[1:])
        + "  "
        + " ".join(f"{f'{d} added MB':>15}" for d in DP_MODES)
    )
    for mode in MODES:
        row = {c["dp"]: c for c in costs if c["mode"] == mode}
        print(
            f"{mode:<7} {row['none']['trainable']:>10,} "
            + " ".join(f"{row[d]['step_s']:>14.3f}" for d in DP_MODES)
            + "  "
            + " ".join(f"{row[d]['step_s'] / row['none']['step_s']:>13.2f}" for d in DP_MODES[1:])
            + "  "
            + " ".join(f"{row[d]['added_peak_mb']:>15.0f}" for d in DP_MODES)
        )
    return costs


def utility(args: argparse.Namespace, tmp: Path, seed: int, init: str | None) -> list[dict]:
    """The task's held-out metric at each site after a federated run, per arm (mode, epsilon; 0: no DP)."""
    sites = write_dataset(tmp / f"sites_{seed}", args.task, args.sites, args.per_site, size=64, seed=seed)
    held_out = write_dataset(tmp / f"test_{seed}", args.task, args.sites, 40, size=64, seed=seed + 1000)
    spec = load_spec(sites[0])
    train = [sum(r["split"] == "train" for r in read_manifest(site)[1]) for site in sites]
    out = []
    for arm in args.arms:
        mode, eps = arm.split(":")
        job = Job(
            task=args.task,
            labels=tuple(sorted(spec.labels)),
            classes=spec.classes,
            feature_size=args.width,
            decoder=args.decoder,
            seed=seed,
            encoder=EncoderConfig(variant="test", in_chans=1, img_size=64, window_size=4),
            train=LocalTraining(
                mode=mode,  # type: ignore[arg-type]
                lora_rank=4,
                lr=args.lr,
                batch_size=args.batch,
                privacy=DPSettings(epsilon=float(eps), max_grad_norm=args.clip),
            ),
        )
        state, server_state, t0, spent = initial_state(job, init), {}, time.perf_counter(), []
        for rnd in range(1, args.rounds + 1):
            results = [
                site_round(
                    job,
                    state,
                    site,
                    rnd,
                    SiteLimits(max_batch_size=args.site_max_batch),  # larger batches: in pieces
                    privacy=SitePrivacy(),
                    ledger_dir=tmp / f"ledger_{seed}_{arm}_{i}",
                    rounds=args.rounds,
                )
                for i, site in enumerate(sites)
            ]
            state, server_state = aggregate(
                state,
                [(r.shared, r.samples) for r in results],
                job,
                StrategyConfig(server_lr=args.server_lr),
                server_state,
            )
            spent = [r.metrics.get("epsilon", 0.0) for r in results]
        scores = [held_out_metric(job, state, test) for test in held_out]
        out.append(
            {
                "seed": seed,
                "mode": mode,
                "epsilon": float(eps),
                "train_images": train,
                "scores": scores,
                "mean": sum(scores) / len(scores),
                "spent": spent,
                "seconds": time.perf_counter() - t0,
            }
        )
        print(
            f"seed {seed} {mode} epsilon {eps}: mean {args.task} score {out[-1]['mean']:.3f} ({out[-1]['seconds']:.0f} s)",
            flush=True,
        )
    return out


def plot(rows: list[dict], metric: str, path: Path) -> None:
    """The mean metric against epsilon per mode (no DP drawn as a dashed line), mean over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by: dict[tuple[str, float], list[float]] = {}  # (mode, epsilon): the mean of each seed
    for r in rows:
        by.setdefault((r["mode"], r["epsilon"]), []).append(r["mean"])
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for i, mode in enumerate(dict.fromkeys(m for m, _ in by)):
        eps = sorted(e for m, e in by if m == mode and e)
        ax.plot(eps, [np.mean(by[mode, e]) for e in eps], "o-", color=f"C{i}", label=f"{mode}, DP")
        if (mode, 0.0) in by:
            ax.axhline(np.mean(by[mode, 0.0]), color=f"C{i}", ls="--", label=f"{mode}, no DP")
    ax.set_xscale("log")
    ax.set_xlabel("epsilon for the whole job (delta 1e-5)")
    ax.set_ylabel(f"mean held-out {metric}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--steps", type=int, default=8, help="timed steps per configuration (after 2 warm-up steps)")
    p.add_argument("--task", choices=("segmentation", "classification"), default="segmentation")
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--per-site", type=int, default=1000, help="images per site (about 70%% of them train)")
    p.add_argument("--rounds", type=int, default=10, help="rounds of one local epoch")
    p.add_argument("--batch", type=int, default=64, help="expected (Poisson) batch size")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument(
        "--site-max-batch", type=int, default=64, help="the sites' max_batch_size (a larger --batch is accumulated)"
    )
    p.add_argument("--clip", type=float, default=1.0, help="per-sample max_grad_norm")
    p.add_argument(
        "--server-lr", type=float, default=None, help="fednova's server step (default: 2 without DP, 1 under DP)"
    )
    p.add_argument("--decoder", choices=("unetr", "light"), default="light", help="segmentation: the dense decoder")
    p.add_argument("--width", type=int, default=16, help="segmentation: the decoder's feature_size")
    p.add_argument(
        "--arms",
        nargs="+",
        default=["lora:0", "lora:8", "lora:3", "lora:1"],
        help="MODE:EPSILON (0: no DP)",
    )
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--init", choices=("pretrained", "random"), default="pretrained")
    p.add_argument("--pretrain-steps", type=int, default=300, help="echocare-pretrain steps for --init pretrained")
    p.add_argument("--skip-utility", action="store_true")
    p.add_argument("--skip-cost", action="store_true")
    p.add_argument("--one", nargs=2, metavar=("MODE", "DP"), help=argparse.SUPPRESS)  # a child process
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "dp_cost.json")
    args = p.parse_args()
    torch.set_num_threads(2)
    if args.one:
        print(json.dumps(step_cost(args.one[0], args.one[1], args.steps)))
        return
    results: dict = {"args": {k: str(v) for k, v in vars(args).items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if not args.skip_cost:
        results["step_cost"] = step_costs(args)
    if not args.skip_utility:
        with tempfile.TemporaryDirectory(prefix="echocare_dp_") as name:
            init = str(pretrain(Path(name), args.pretrain_steps, 64, TEST_SIZE)) if args.init == "pretrained" else None
            results["utility"] = [u for seed in args.seeds for u in utility(args, Path(name), seed, init)]
        rows, metric = results["utility"], get_task(args.task).main_metric
        print(
            f"\nmean held-out {metric} over {args.sites} sites ({rows[0]['train_images']} training images), "
            f"mean ± sd over {len(args.seeds)} seed(s); per site; epsilon spent per site (PRV, delta 1e-5)"
        )
        print(f"{'mode':<6} {'epsilon':>8} {'mean ' + metric:>14}  per site")
        for arm in args.arms:
            mode, eps = arm.split(":")
            runs = [r for r in rows if r["mode"] == mode and r["epsilon"] == float(eps)]
            means = [r["mean"] for r in runs]
            per_site = np.mean([r["scores"] for r in runs], 0)
            spent = np.mean([r["spent"] for r in runs], 0)
            print(
                f"{mode:<6} {float(eps) or 'no DP':>8} {np.mean(means):>8.3f} ± {np.std(means):.3f}  "
                f"{' / '.join(f'{d:.3f}' for d in per_site)}  ({' / '.join(f'{e:.2f}' for e in spent)})"
            )
        plot(rows, metric, args.out.with_suffix(".png"))
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
