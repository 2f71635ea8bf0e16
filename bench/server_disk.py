"""Benchmark: does the coordinator's disk grow with every round? The SuperLink's database and the checkpoints.

Two synthetic sites federate on 127.0.0.1 over the real runtime for several rounds; after each round the
size of the SuperLink's database (`superlink.db` with its `-wal` and `-shm` files) and of `checkpoints/`
is read. A Swin-B-sized encoder fine-tuned in full (the whole encoder travels every round) shows whether
Flower's stored messages accumulate. Prints a table and writes JSON. A program, not a test.

    python bench/server_disk.py                        # Swin-B size, 4 rounds: about 10 minutes on 2 CPU cores
    python bench/server_disk.py --variant test --rounds 6
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from echocare_core.federation.runtime.testbed import Testbed
from echocare_core.synthetic.dataset import write_dataset

ROOT = Path(__file__).resolve().parents[1]


def _mb(paths: list[Path]) -> float:
    return sum(p.stat().st_size for p in paths if p.is_file()) / 1e6


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--variant", default="echocare")
    p.add_argument("--mode", default="full", choices=["full", "lora", "frozen"])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "server_disk.json")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="echocare_disk_") as name:
        tmp = Path(name)
        sites = write_dataset(tmp / "data", "segmentation", sites=2, per_site=8, size=64, seed=1)
        run = tmp / "run"
        fed = {
            "output": str(run),
            "rounds": {"rounds": args.rounds, "min_sites": 2, "deadline": 3600},
            "job": {
                "task": "segmentation",
                "labels": [0, 1],
                "feature_size": 8,
                "local_steps": 1,
                "train": {"batch_size": 8, "mode": args.mode},
                "encoder": {"variant": args.variant, "img_size": 64, "window_size": 4},
            },
        }
        with Testbed(tmp, {s.name: s for s in sites}, fed, show_server=False) as bed:
            bed.start_server()
            for site in sites:
                bed.start_site(site.name)
            for rnd in range(1, args.rounds + 1):
                end = bed.wait_for("round_end", timeout=3600, round=rnd)
                time.sleep(2)  # let the SuperLink settle what the round left
                db = [run / f"superlink.db{suffix}" for suffix in ("", "-wal", "-shm")]
                rows.append(
                    {
                        "round": rnd,
                        "db_mb": _mb(db),
                        "checkpoints_mb": _mb(list(run.glob("checkpoints/**/*"))),
                        "mb_to_site": end["sites"][0]["bytes_sent"] / 1e6,
                        "mb_from_site": end["sites"][0]["bytes_received"] / 1e6,
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
            code = bed.wait_server(timeout=3600)
    print(f"\n{'round':>5} {'MB to site':>10} {'MB from site':>12} {'superlink.db MB':>16} {'checkpoints MB':>15}")
    for r in rows:
        print(
            f"{r['round']:>5} {r['mb_to_site']:>10.1f} {r['mb_from_site']:>12.1f} {r['db_mb']:>16.1f} "
            f"{r['checkpoints_mb']:>15.1f}"
        )
    print(f"({args.variant} encoder, {args.mode} mode, two sites; server exit code {code})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
