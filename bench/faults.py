"""Benchmark: faults a federation survives, on the real runtime with real processes and a real network.

Each scenario runs a fresh federation (`echocare-server` and three `echocare-client`s over HTTPS with site
keys, three synthetic segmentation sites, a tiny Swin with LoRA, four rounds, min_sites 2) and injects
one fault a few seconds into round 2:

- site killed: SIGKILL of one site's echocare-client (SuperNode, ClientApp, worker); restarted after round 2;
- server killed: SIGKILL of echocare-server (SuperLink, proxy, ServerApp); started again on the same output;
- link cut 30 s / 75 s: one site's network link taken down (Flower marks a node offline after about 60 s
  without heartbeats), then brought back.

With root and iproute2 every party has its own network namespace (`Testbed(isolated=True)`); otherwise
everything runs on 127.0.0.1 and the link cuts are skipped. Prints a table (who took part in each round,
rounds completed, run time, data lost: rounds missing from the records, checkpoints that do not load,
audit lines that do not parse, site copies missing) and writes JSON. A program, not a test.

    python bench/faults.py                         # about 15 minutes on 2 CPU cores
    python bench/faults.py --faults "link cut 30 s"
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from echocare_core.cli.keys import make_keys
from echocare_core.federation.runtime.testbed import COORDINATOR_ADDRESS, Testbed, can_isolate
from echocare_core.synthetic.dataset import write_dataset

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = 4
SITES = ("site_a", "site_b", "site_c")


def _site_killed(bed: Testbed) -> None:
    bed.kill_site("site_b")
    bed.wait_for("round_end", round=2)
    bed.start_site("site_b")


def _server_killed(bed: Testbed) -> None:
    bed.kill_server()
    time.sleep(5)
    bed.start_server()


def _cut(seconds: float) -> Callable[[Testbed], None]:
    def fault(bed: Testbed) -> None:
        bed.cut("site_c")
        time.sleep(seconds)
        bed.cut("site_c", down=False)

    return fault


FAULTS: dict[str, tuple[Callable[[Testbed], None], bool]] = {  # name: (fault, needs network namespaces)
    "site killed": (_site_killed, False),
    "server killed": (_server_killed, False),
    "link cut 30 s": (_cut(30), True),
    "link cut 75 s": (_cut(75), True),
}


def run(name: str, tmp: Path, data: dict[str, Path], keys: Path, isolated: bool) -> dict:
    fault, _ = FAULTS[name]
    out = tmp / name.replace(" ", "_")
    fed = {
        "output": str(out / "run"),
        "rounds": {"rounds": ROUNDS, "min_sites": 2, "expected_sites": 3, "wait_for_sites": 300, "deadline": 120},
        "job": {
            "task": "segmentation",
            "labels": [0, 1],
            "feature_size": 8,
            "train": {"batch_size": 8, "mode": "lora", "lora_rank": 2},
            "encoder": {"variant": "test", "img_size": 64, "window_size": 4},
        },
    }
    t0 = time.perf_counter()
    with Testbed(out, data, fed, keys=keys, isolated=isolated, show_server=False) as bed:
        bed.start_server()
        for site in data:
            bed.start_site(site)
        bed.wait_for("round_start", round=2)
        time.sleep(3)
        fault(bed)
        code = bed.wait_server(timeout=1800)
        events, lost = bed.events(), bed.lost(ROUNDS) if code == 0 else ["the run failed"]
    rounds = {e["round"]: sorted(s["site"] for s in e["sites"]) for e in events if e["event"] == "round_end"}
    return {
        "fault": name,
        "exit_code": code,
        "rounds": rounds,
        "run_s": round(time.perf_counter() - t0, 1),
        "round_s": {e["round"]: e["seconds"] for e in events if e["event"] == "round_end"},
        "refused": [e["reason"] for e in events if e["event"] == "refused"],
        "lost": lost,
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--faults", nargs="+", default=list(FAULTS), choices=list(FAULTS))
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "faults.json")
    args = p.parse_args()
    isolated = can_isolate()
    results = []
    with tempfile.TemporaryDirectory(prefix="echocare_faults_") as name:
        tmp = Path(name)
        folders = write_dataset(tmp / "data", "segmentation", sites=len(SITES), per_site=10, size=64, seed=3)
        data = dict(zip(SITES, folders))
        make_keys(tmp / "keys", [COORDINATOR_ADDRESS], list(SITES))
        for fault in args.faults:
            if FAULTS[fault][1] and not isolated:
                print(f"{fault}: skipped (network namespaces need root and iproute2)")
                continue
            results.append(run(fault, tmp, data, tmp / "keys", isolated))
            print(json.dumps(results[-1]), flush=True)
    short = {s: s[-1] for s in SITES}
    print(
        f"\n{'fault':<15} {'sites in rounds 1 / 2 / 3 / 4':<32} {'completed':>9} {'round 2 s':>9} {'run s':>6}  "
        f"data lost"
    )
    for r in results:
        who = " / ".join("".join(short[s] for s in r["rounds"].get(i, [])) or "-" for i in range(1, ROUNDS + 1))
        print(
            f"{r['fault']:<15} {who:<32} {len(r['rounds']):>5} of {ROUNDS} {r['round_s'].get(2, float('nan')):>9.1f} "
            f"{r['run_s']:>6.0f}  {'; '.join(r['lost']) or 'none'}"
        )
    print(f"(network: {'one namespace per party' if isolated else '127.0.0.1'}; sites a, b, c)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"isolated": isolated, "results": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
