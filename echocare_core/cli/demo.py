"""`echocare-demo`: the project's main job on an embedded default, end to end on this machine.

Until the federation exists this is the pretraining demo: synthetic ultrasound from two simulated
hospitals, then MIM + hierarchical pretraining of a small Swin with the shipped
`pretrain_demo.yaml`. Running it again resumes (or reports the finished run).
"""

from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path

from echocare_core.cli import pretrain
from echocare_core.cli.common import console, fail, setup_logging
from echocare_core.data.synthetic_dataset import write_dataset

PROG = "echocare-demo"
SITES, PER_SITE = 2, 160


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("echocare_demo"), help="folder for data and run")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the demo's pretrain.yaml, e.g. --set optim.steps=10")
    args = parser.parse_args(argv)
    setup_logging()
    data = args.out / "data"
    sites = [data / f"site_{i:02d}" for i in range(SITES)]
    if not all((site / "dataset.yaml").is_file() for site in sites):  # none yet, or cut short by Ctrl-C
        if data.exists() and any(p not in sites for p in data.iterdir()):
            return fail(PROG, f"{data} holds something other than the demo data; choose another --out")
        console.print(f"writing synthetic ultrasound for {SITES} sites x {PER_SITE} images to {data}")
        write_dataset(data, "pretrain", SITES, PER_SITE, size=128, seed=0, overwrite=True)
    sources = ",".join(map(str, sites))
    with resources.as_file(resources.files("echocare_core.resources") / "pretrain_demo.yaml") as config:
        return pretrain.main(["--config", str(config), "--set", f"data.sources=[{sources}]",
                              "--set", f"output={args.out / 'run'}", *sum((["--set", o] for o in args.overrides), [])])


if __name__ == "__main__":
    raise SystemExit(main())
