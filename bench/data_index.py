"""Benchmark: indexing a pretraining manifest of N rows, and random access into the index.

Prints a table and writes JSON. The question it answers: does a 4.5-million-image manifest (the
size of EchoCareData) load in seconds, stay small in memory, and keep per-sample lookups flat as N grows?

    python bench/data_index.py --rows 10000 100000 1000000 4500000
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from echocare_core.data.ontology import load_ontology
from echocare_core.data.pretrain import ShardedSampler, build_index

LABELS = ["Thorax/Heart/Apical four-chamber", "Neck/Thyroid", "Abdomen", ""]


def _manifest(folder: Path, rows: int) -> None:
    with (folder / "manifest.csv").open("w") as f:
        f.write("image,anatomy\n")
        f.writelines(f"images/{i // 10000:04d}/{i:08d}.png,{LABELS[i % 4]}\n" for i in range(rows))


def measure(rows: int, lookups: int = 200_000) -> dict:
    ontology = load_ontology()
    with tempfile.TemporaryDirectory() as tmp:
        _manifest(Path(tmp), rows)
        t0 = time.perf_counter()
        index = build_index([tmp], ontology)
        load_s = time.perf_counter() - t0
    order = iter(ShardedSampler(rows, rank=0, world=1, seed=0))
    t0 = time.perf_counter()
    for _ in range(min(lookups, rows)):
        _, i = next(order)
        file = index.file[i]
        index.paths[file], index.anatomy[file]
    lookup_us = (time.perf_counter() - t0) / min(lookups, rows) * 1e6
    arrays = (index.paths.data, index.paths.offsets, index.anatomy, index.file, index.pick)
    return {
        "rows": rows,
        "load_s": load_s,
        "index_mb": sum(a.nbytes for a in arrays) / 2**20,
        "lookup_us": lookup_us,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000, 4_500_000])
    parser.add_argument("--out", type=Path, default=Path("bench/results/data_index.json"))
    args = parser.parse_args()
    results = [measure(n) for n in args.rows]
    print(f"{'rows':>10} {'load s':>8} {'index MiB':>10} {'lookup us':>10} {'max RSS MiB':>12}")
    for r in results:
        print(
            f"{r['rows']:>10} {r['load_s']:>8.2f} {r['index_mb']:>10.1f} {r['lookup_us']:>10.2f} "
            f"{r['peak_rss_mb']:>12.0f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": _cpu(), "numpy": np.__version__, "results": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
