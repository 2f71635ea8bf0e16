"""Benchmark: what differential privacy costs at a site: step time and memory, and Dice at epsilon 1, 3, 8.

Step cost: a segmentation model (the `mini` encoder at 128 px, batch 16) in each fine-tuning mode
(full, frozen, LoRA), without DP and with DP-SGD in each of our modes (hooks: every per-sample
gradient; ghost: per-sample norms only with the mixed Linear rule, two backward passes), each in a
fresh process: median time of a training step and the peak resident memory the steps added. Utility: three synthetic hospitals federate a segmentation model (the test encoder at
64 px, full fine-tuning from random initialisation) with FedAvg, without DP and with DP at each
epsilon for the whole job, tested on held-out images of every site's scanner. Prints tables, writes
JSON. Not a test.

    python bench/dp_cost.py                       # about 20 minutes on 2 CPU cores
    python bench/dp_cost.py --skip-utility        # step cost only, a few minutes
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
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MODES = ("full", "frozen", "lora")
DP_MODES = ("none", "hooks", "ghost")


def step_cost(mode: str, dp_mode: str, steps: int) -> dict:
    """Median step time and added peak RSS of one configuration (run in its own process)."""
    from monai.losses import DiceCELoss

    from echocare_core.engine.optim import build_optimizer
    from echocare_core.models.lora import apply_finetune_mode
    from echocare_core.models.swin import EncoderConfig
    from echocare_core.privacy.dp import DPTraining
    from echocare_core.privacy.settings import DPSettings
    from echocare_core.tasks.model import EchoCareTaskModel

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


def utility(args: argparse.Namespace, tmp: Path) -> list[dict]:
    """Mean held-out Dice over the three sites after a federated run, per epsilon (0: no DP)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from federated_quality import SHARES, held_out_metric  # noqa: E402 - the same sites and test as that benchmark

    from echocare_core.data.contract import load_spec
    from echocare_core.engine.training import LocalTraining
    from echocare_core.federation.job import Job
    from echocare_core.federation.rounds import aggregate, initial_state
    from echocare_core.federation.site import site_round
    from echocare_core.federation.strategies import StrategyConfig
    from echocare_core.models.swin import EncoderConfig
    from echocare_core.privacy.settings import DPSettings, SitePrivacy
    from echocare_core.synthetic.dataset import keep_patients, write_dataset

    sites = write_dataset(tmp / "sites", "segmentation", len(SHARES), args.per_site, size=64, seed=0)
    for site, share in zip(sites, SHARES):
        keep_patients(site, share)
    held_out = write_dataset(tmp / "test", "segmentation", len(SHARES), 40, size=64, seed=1000)
    spec = load_spec(sites[0])
    job = Job(
        task="segmentation",
        labels=tuple(sorted(spec.labels)),
        feature_size=8,
        encoder=EncoderConfig(variant="test", in_chans=1, img_size=64, window_size=4),
        train=LocalTraining(mode="full", lr=1e-3, batch_size=16),
    )
    out = []
    for eps in [0.0, *args.epsilons]:
        run = replace(job, train=replace(job.train, privacy=DPSettings(epsilon=eps, max_grad_norm=args.clip)))
        state, t0, spent = initial_state(run, None), time.perf_counter(), []
        for rnd in range(1, args.rounds + 1):
            results = [
                site_round(
                    run,
                    state,
                    site,
                    rnd,
                    privacy=SitePrivacy(),
                    ledger_dir=tmp / f"ledger_{eps}_{i}",
                    rounds=args.rounds,
                )
                for i, site in enumerate(sites)
            ]
            state, _ = aggregate(
                state, [(r.shared, r.samples) for r in results], run, StrategyConfig("fedavg")
            )  # as measured in docs
            spent = [r.metrics.get("epsilon", 0.0) for r in results]
        dice = [held_out_metric(run, state, test) for test in held_out]
        out.append(
            {
                "epsilon": eps,
                "dice": dice,
                "mean_dice": sum(dice) / len(dice),
                "spent": spent,
                "seconds": time.perf_counter() - t0,
            }
        )
        print(
            f"epsilon {eps or 'no DP'}: mean Dice {out[-1]['mean_dice']:.3f} ({out[-1]['seconds']:.0f} s)", flush=True
        )
    return out


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--steps", type=int, default=8, help="timed steps per configuration (after 2 warm-up steps)")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--per-site", type=int, default=200, help="images at the largest site")
    p.add_argument("--epsilons", nargs="+", type=float, default=[1.0, 3.0, 8.0])
    p.add_argument("--clip", type=float, default=1.0, help="per-sample max_grad_norm")
    p.add_argument("--skip-utility", action="store_true")
    p.add_argument("--one", nargs=2, metavar=("MODE", "DP"), help=argparse.SUPPRESS)  # a child process
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "dp_cost.json")
    args = p.parse_args()
    torch.set_num_threads(2)
    if args.one:
        print(json.dumps(step_cost(args.one[0], args.one[1], args.steps)))
        return
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
    results = {"args": {k: str(v) for k, v in vars(args).items()}, "step_cost": costs}
    if not args.skip_utility:
        with tempfile.TemporaryDirectory(prefix="echocare_dp_") as name:
            results["utility"] = utility(args, Path(name))
        print(f"{'epsilon':>8} {'mean Dice':>10}  per site  (epsilon spent per site)")
        for u in results["utility"]:
            print(
                f"{u['epsilon'] or 'no DP':>8} {u['mean_dice']:>10.3f}  "
                f"{' / '.join(f'{d:.3f}' for d in u['dice'])}  ({' / '.join(f'{e:.2f}' for e in u['spent'])})"
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
