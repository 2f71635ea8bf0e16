"""Benchmark: what a federated round costs beyond the sites' own compute, for a tiny and the released EchoCare model
(the latter fine-tuned in full, with LoRA adapters + head, or the head only).

For each model, two synthetic sites federate for a few rounds on 127.0.0.1 over the real runtime
(`echocare-server`, two `echocare-client`s; Flower's SuperLink, SuperNodes and app processes). Per
round: wall time, the slowest site's compute (the round inside the site worker of `echocare-client`:
check the job, build the model, evaluate, train, evaluate), the slowest ClientApp call (compute plus
handing the weights to the worker and back), the overhead (wall minus slowest compute: process starts,
polling, transfers), megabytes to and from each site, and the peak resident memory of each kind of
process (sampled every 0.2 s). Prints a table and writes JSON. A program, not a test.

    python bench/federation_overhead.py                 # about 20 minutes on 2 CPU cores
    python bench/federation_overhead.py --models tiny --rounds 2
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from echocare_core.engine.run_report import read_metrics
from echocare_core.federation.runtime.testbed import run_on_this_machine
from echocare_core.synthetic.dataset import write_dataset

ROOT = Path(__file__).resolve().parents[1]
MODELS = {  # 'echocare' is the released encoder (120 M parameters); 64 px keeps its local compute short
    "tiny": {"encoder": {"variant": "test", "img_size": 64, "window_size": 4}, "train": {"mode": "lora"}},
    "echocare": {"encoder": {"variant": "echocare", "img_size": 64, "window_size": 4}, "train": {"mode": "full"}},
    "echocare-lora": {"encoder": {"variant": "echocare", "img_size": 64, "window_size": 4}, "train": {"mode": "lora"}},
    "echocare-head": {
        "encoder": {"variant": "echocare", "img_size": 64, "window_size": 4},
        "train": {"mode": "frozen"},
    },
}
KINDS = (
    "flower-superlink",
    "flwr-serverapp",
    "flower-supernode",
    "flwr-clientapp",
    "flower-superexec",
    "echocare_client.cli",
)  # the last: echocare-client with its site worker


class PeakMemory(threading.Thread):
    """Peak resident memory (MB) of each kind of Flower process on this machine, sampled every 0.2 s."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = dict.fromkeys(KINDS, 0.0)
        self.running = True

    def run(self) -> None:
        while self.running:
            for proc in Path("/proc").glob("[0-9]*"):
                try:
                    cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    kind = next((k for k in KINDS if k in cmd), None)
                    if kind:
                        rss = next(
                            int(line.split()[1])
                            for line in (proc / "status").read_text().splitlines()
                            if line.startswith("VmRSS:")
                        )
                        self.peak[kind] = max(self.peak[kind], rss / 1024)
                except (OSError, StopIteration, ValueError):
                    continue
            time.sleep(0.2)


def measure(name: str, rounds: int, tmp: Path) -> dict:
    sites = write_dataset(tmp / name / "data", "segmentation", sites=2, per_site=10, size=64, seed=1)
    job = {"task": "segmentation", "labels": [0, 1], "feature_size": 8, **MODELS[name]}
    job["train"] = {**job["train"], "batch_size": 8}
    fed = {
        "output": str(tmp / name / "run"),
        "rounds": {"rounds": rounds, "min_sites": 2, "deadline": 3600},
        "job": job,
    }
    memory = PeakMemory()
    memory.start()
    t0 = time.perf_counter()
    code = run_on_this_machine(tmp / name, {s.name: s for s in sites}, fed, show_server=False)
    total = time.perf_counter() - t0
    memory.running = False
    memory.join()
    if code != 0:
        raise SystemExit(f"{name}: the federated run failed (exit {code}); see {tmp / name / 'run'}")
    history = read_metrics(tmp / name / "run" / "metrics.jsonl")
    per_round = [
        {
            "round": r["round"],
            "wall_s": r["seconds"],
            "slowest_compute_s": max(s["compute_s"] for s in r["sites"]),
            "slowest_clientapp_s": max(s["clientapp_s"] for s in r["sites"]),
            "mb_to_site": r["sites"][0]["bytes_sent"] / 1e6,
            "mb_from_site": r["sites"][0]["bytes_received"] / 1e6,
        }
        for r in history
    ]
    for r in per_round:
        r["overhead_s"] = r["wall_s"] - r["slowest_compute_s"]
    return {"model": name, "rounds": per_round, "total_s": total, "peak_rss_mb": memory.peak}


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "federation_overhead.json")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="echocare_fo_") as name:
        results = [measure(m, args.rounds, Path(name)) for m in args.models]
    print(
        f"{'model':<9} {'MB to site r1/later, from':>26} {'round s':>8} {'compute s':>10} {'clientapp s':>12} "
        f"{'overhead s':>11} {'run s':>6}  peak RSS MB: superlink / serverapp / supernode / clientapp / superexec / "
        f"echocare-client"
    )
    for r in results:
        rounds = r["rounds"]
        med = {
            k: float(np.median([x[k] for x in rounds]))
            for k in ("wall_s", "slowest_compute_s", "slowest_clientapp_s", "overhead_s")
        }
        mem = " / ".join(f"{r['peak_rss_mb'][k]:.0f}" for k in KINDS)
        print(
            f"{r['model']:<9} {rounds[0]['mb_to_site']:>8.1f} / {rounds[-1]['mb_to_site']:<7.1f}, "
            f"{rounds[-1]['mb_from_site']:<7.1f} "
            f"{med['wall_s']:>8.1f} {med['slowest_compute_s']:>10.1f} {med['slowest_clientapp_s']:>12.1f} "
            f"{med['overhead_s']:>11.1f} "
            f"{r['total_s']:>6.0f}  {mem}"
        )
    print("(round, compute and overhead: medians over rounds)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
