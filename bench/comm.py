"""Benchmark: bytes each site receives and sends per round, per encoder size, sharing mode and transport.

For each encoder of the EchoCare family (`echocare` is the released encoder, 120 M parameters, at its
256 px input), task head and sharing mode (full: encoder + head; lora: adapters + head; frozen: head
only), the job's model is built and
its real payloads are encoded as a round would: down, the shared parameters in fp32 every round, plus
the frozen rest once (round 1, or when a site lost it); up, what `transport.encode` makes of the trained
shared parameters (fp32 weights, or bf16 / fp16 deltas). "Before" is what the toolkit sent until the
compact transport: the whole model state down every round and the shared weights up in fp32. Tensor
bytes; Flower's framing adds well under 1%. Prints a table and writes JSON. A program, not a test.

    python bench/comm.py                      # a few minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from echocare_core.engine.training import LocalTraining
from echocare_core.federation.job import Job, shared_names
from echocare_core.federation.site import build_job_model
from echocare_core.federation.transport import encode
from echocare_core.models.swin import EncoderConfig

ROOT = Path(__file__).resolve().parents[1]
MODES = ("full", "lora", "frozen")
TASKS = ("classification", "segmentation", "landmarks", "detection", "regression", "enhancement", "report")
LABELS = {
    "segmentation": {"labels": (0, 1)},
    "classification": {"classes": ("benign", "malignant")},
    "detection": {"classes": ("cyst", "solid")},
    "landmarks": {"landmarks": 4},
}


def _nbytes(tensors: dict) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def measure(variant: str, task: str, mode: str, rank: int) -> dict:
    job = Job(
        task=task,
        feature_size=16,
        **LABELS.get(task, {}),
        encoder=EncoderConfig(variant=variant),
        train=LocalTraining(mode=mode, lora_rank=rank),
    )
    torch.manual_seed(0)
    model = build_job_model(job)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    shared = {n: state[n] for n in shared_names(model, job)}
    trained = {k: v + 1e-3 * torch.randn_like(v) for k, v in shared.items()}
    row = {
        "variant": variant,
        "task": task,
        "mode": mode,
        "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "shared_m": sum(v.numel() for v in shared.values()) / 1e6,
        "model_mb": _nbytes(state) / 1e6,
        "down_first_mb": _nbytes(state) / 1e6,
        "down_mb": _nbytes(shared) / 1e6,
        "before_mb": (_nbytes(state) + _nbytes(shared)) / 1e6,
    }
    for transport in ("fp32", "bf16", "fp16"):
        row[f"up_{transport}_mb"] = _nbytes(encode(trained, shared, transport)) / 1e6
    return row


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--variants", nargs="+", default=["echocare", "small"])
    p.add_argument("--tasks", nargs="+", default=list(TASKS))
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "comm.json")
    args = p.parse_args()
    rows = [measure(v, t, m, args.lora_rank) for v in args.variants for t in args.tasks for m in MODES]
    print(
        f"{'variant':<8} {'task':<14} {'mode':<6} {'params M':>8} {'shared M':>8} {'down r1 MB':>10} {'down MB':>8} "
        f"{'up fp32':>8} {'up bf16':>8} {'up fp16':>8} {'before MB':>9} {'per round vs before':>20}"
    )
    for r in rows:
        now = r["down_mb"] + r["up_bf16_mb"]
        print(
            f"{r['variant']:<8} {r['task']:<14} {r['mode']:<6} {r['parameters_m']:>8.1f} {r['shared_m']:>8.2f} "
            f"{r['down_first_mb']:>10.1f} {r['down_mb']:>8.2f} {r['up_fp32_mb']:>8.2f} {r['up_bf16_mb']:>8.2f} "
            f"{r['up_fp16_mb']:>8.2f} {r['before_mb']:>9.1f} {r['before_mb'] / now:>19.0f}x"
        )
    whole = {r["task"]: 2 * r["model_mb"] for r in rows if r["variant"] == "echocare" and r["mode"] == "full"}
    for r in rows:  # against the whole release model in fp32 both ways, each round
        if r["variant"] == "echocare" and r["mode"] == "lora":
            now = r["down_mb"] + r["up_bf16_mb"]
            print(
                f"EchoCare {r['task']}: LoRA (rank {args.lora_rank}) + head with bf16 deltas moves {now:.2f} MB per "
                f"site per round after round 1; the whole model in fp32 both ways {whole[r['task']]:.0f} MB: "
                f"{whole[r['task']] / now:.0f}x fewer"
            )
    print(
        "(down r1: round 1, or a site that lost its copy, also gets the frozen rest; up: the trained shared "
        "parameters; before: whole state down + shared fp32 up each round)"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
