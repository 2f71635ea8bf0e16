"""`echocare-demo`: federated fine-tuning on this machine, compared with what each site could do alone.

Synthetic ultrasound for three hospitals (different device profiles and sizes, one small); a small encoder
of the EchoCare family pretrained on unlabelled images of their scanners (`echocare-pretrain`, standing in
for the EchoCare release a real federation starts from); then a coordinator (`echocare-server`) and one
`echocare-client` per hospital as separate processes on 127.0.0.1, a few rounds of federated fine-tuning
from that encoder, and the comparison users care about on each site's test split: federated vs local-only
(each site alone, same epochs) vs centralised (all data pooled, which real hospitals cannot do). Everything
it starts, it stops, also on Ctrl-C. `--pretrain` runs the pretraining demo instead.
"""

from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path

from rich.table import Table

from echocare_core.cli import pretrain
from echocare_core.cli.common import console, fail, setup_logging
from echocare_core.config import load_config
from echocare_core.data.contract import load_spec
from echocare_core.engine.evaluate import evaluate_checkpoint
from echocare_core.engine.finetune import run_finetune
from echocare_core.engine.finetune_config import FinetuneConfig
from echocare_core.federation.runtime.testbed import run_on_this_machine
from echocare_core.synthetic.dataset import keep_patients, pool_sites, write_dataset
from echocare_core.tasks import get_task

PROG = "echocare-demo"
ENCODER = {"variant": "test", "img_size": 64, "window_size": 4}  # the smallest of the EchoCare family
SHARES = (1.0, 0.6, 0.25)  # of the largest site's images: one small hospital


def _pretrain(out: Path, sources: list[Path], overrides: list[str]) -> int:
    """`echocare-pretrain` with the demo's pretrain.yaml on `sources` into `out` (resumes a run cut short)."""
    with resources.as_file(resources.files("echocare_core.resources") / "pretrain_demo.yaml") as config:
        return pretrain.main(
            [
                "--config",
                str(config),
                "--set",
                f"data.sources=[{','.join(map(str, sources))}]",
                "--set",
                f"output={out}",
                *sum((["--set", o] for o in overrides), []),
            ]
        )


def _pretrain_demo(out: Path, overrides: list[str]) -> int:
    data = out / "data"
    sites = [data / f"site_{i:02d}" for i in range(2)]
    if not all((site / "dataset.yaml").is_file() for site in sites):  # none yet, or cut short by Ctrl-C
        if data.exists() and any(p not in sites for p in data.iterdir()):
            return fail(PROG, f"{data} holds something other than the demo data; choose another --out")
        console.print(f"writing synthetic ultrasound for 2 sites x 160 images to {data}")
        write_dataset(data, "pretrain", 2, 160, size=128, seed=0, overwrite=True)
    return _pretrain(out / "run", sites, overrides)


def _pretrained_encoder(out: Path, args: argparse.Namespace) -> Path | None:
    """The demo's encoder pretrained on unlabelled images of the hospitals' scanners (none of the labelled
    ones), `--pretrain-steps` steps; None with 0 steps (random weights)."""
    if not args.pretrain_steps:
        return None
    unlabelled = out / "data" / "unlabelled"
    sources = [unlabelled / f"site_{i:02d}" for i in range(args.sites)]
    if not (sources[-1] / "dataset.yaml").is_file():
        write_dataset(unlabelled, "pretrain", args.sites, 100, size=args.size, seed=11, overwrite=True)
    size = [f"model.{k}={v}" for k, v in ENCODER.items()]
    steps = [f"optim.steps={args.pretrain_steps}", f"checkpoint.every_steps={args.pretrain_steps}"]
    if _pretrain(out / "pretrained", sources, [*size, "mim.mask_patch_size=8", "data.num_workers=0", *steps]) != 0:
        raise RuntimeError(f"pretraining the demo's encoder failed; see {out / 'pretrained'}")
    return out / "pretrained" / "checkpoints" / f"step_{args.pretrain_steps:06d}"


TRAIN = {"mode": "full", "lr": 1e-3, "batch_size": 8, "warmup_epochs": 0}  # one recipe for all three arms
FEATURE_SIZE = 8


def _job(folder: Path, args: argparse.Namespace) -> dict:
    spec = load_spec(folder)
    return {
        "task": spec.task,
        "classes": list(spec.classes),
        "labels": sorted(spec.labels),
        "encoder": ENCODER,
        "feature_size": FEATURE_SIZE,
        "local_epochs": args.local_epochs,
        "train": TRAIN,
    }


def _federate(out: Path, sites: list[Path], init: Path | None, args: argparse.Namespace) -> Path:
    """Run server and clients as processes; returns the final global checkpoint."""
    fed = {
        "output": str(out / "federated"),
        "init": str(init) if init else None,
        "rounds": {"rounds": args.rounds, "min_sites": len(sites), "wait_for_sites": 300, "deadline": 1800},
        "job": _job(sites[0], args),
    }
    if run_on_this_machine(out, {site.name: site for site in sites}, fed) != 0:
        raise RuntimeError(f"the federated run failed; see {out / 'federated'}")
    return out / "federated" / "checkpoints" / f"round_{args.rounds:04d}"


def _train(folder: Path, out: Path, init: Path | None, args: argparse.Namespace) -> Path:
    """Local fine-tuning with the federation's recipe and budget (rounds x local epochs, one schedule over
    them) from the same encoder; returns the best checkpoint."""
    base = {
        "output": str(out),
        "device": "cpu",
        "epochs": args.rounds * args.local_epochs,
        "train": TRAIN,
        "data": {"folder": str(folder), "num_workers": 0},
        "model": {
            "init": str(init) if init else None,
            "encoder": ENCODER,
            "feature_size": FEATURE_SIZE,
        },
    }
    run_finetune(load_config(FinetuneConfig, None, [], base=base))
    return out / "best"


def _federated_demo(args: argparse.Namespace) -> int:
    out = args.out.resolve()
    data = out / "data"
    if not (data / f"site_{args.sites - 1:02d}" / "dataset.yaml").is_file():
        console.print(f"writing synthetic {args.task} data for {args.sites} hospitals to {data}")
        sites = write_dataset(data, args.task, args.sites, args.per_site, size=args.size, seed=0, overwrite=True)
        for site, share in zip(sites, [*SHARES, *[1.0] * len(sites)]):
            keep_patients(site, share)
    sites = [data / f"site_{i:02d}" for i in range(args.sites)]
    if args.pretrain_steps:
        console.print(
            f"[bold]pretraining[/] the encoder on unlabelled images of the {len(sites)} scanners "
            f"({args.pretrain_steps} steps; a real federation starts from the EchoCare release)"
        )
    init = _pretrained_encoder(out, args)
    console.print(f"[bold]federated:[/] {args.rounds} rounds x {args.local_epochs} local epoch(s), {len(sites)} sites")
    models = {"federated": _federate(out, sites, init, args)}
    console.print(
        "[bold]centralised[/] (all data pooled) and [bold]local-only[/] (each site alone), same epochs and recipe"
    )
    models["centralised"] = _train(pool_sites(sites, out / "pooled"), out / "centralised", init, args)
    local = {site: _train(site, out / "local" / site.name, init, args) for site in sites}
    main = get_task(args.task).main_metric
    table = Table(title=f"test {main} at each site ({out})")
    for col in ("site", "test images", "federated", "local-only", "centralised"):
        table.add_column(col, justify="left" if col == "site" else "right")
    for site in sites:
        scores = [
            evaluate_checkpoint(m, site, "test", rounds=200)
            for m in (models["federated"], local[site], models["centralised"])
        ]
        table.add_row(site.name, str(scores[0]["samples"]), *[f"{s['metrics'][main]:.3f}" for s in scores])
    console.print(table)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("echocare_demo"), help="folder for data, runs and logs")
    parser.add_argument("--task", choices=("segmentation", "classification"), default="segmentation")
    parser.add_argument("--sites", type=int, default=3, help="hospitals (2-12)")
    parser.add_argument("--per-site", type=int, default=60, help="images at the largest hospital")
    parser.add_argument("--size", type=int, default=64, help="image size in pixels")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument(
        "--pretrain-steps",
        type=int,
        default=200,
        help="pretraining steps of the encoder every arm starts from (0: random weights)",
    )
    parser.add_argument("--pretrain", action="store_true", help="run the pretraining demo instead")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="--pretrain: override a key of the demo's pretrain.yaml, e.g. --set optim.steps=10",
    )
    args = parser.parse_args(argv)
    setup_logging()
    if args.pretrain:
        return _pretrain_demo(args.out, args.overrides)
    if (
        not 2 <= args.sites <= 12
        or args.rounds < 1
        or args.local_epochs < 1
        or args.per_site < 20
        or args.pretrain_steps < 0
    ):
        return fail(
            PROG,
            "need 2-12 sites, rounds >= 1, local epochs >= 1, at least 20 images per site and pretrain steps >= 0",
        )
    try:
        return _federated_demo(args)
    except KeyboardInterrupt:
        return 130
    except (RuntimeError, ValueError) as exc:
        return fail(PROG, str(exc), code=1)


if __name__ == "__main__":
    raise SystemExit(main())
