"""Pretraining throughput: optimizer-step speed, model FLOP utilisation and loop overhead.

Three measurements, each printed as a table and written to one JSON file with the machine:

1. steps: images/s, ms per optimizer step and peak memory of `EchoCarePretrainModel` (AdamW from
   `build_optimizer`, drop_path 0.1, random images, 50% token mask, random anatomy labels), per
   variant and input size; forward + backward + grad clipping + step, as the engine does (bf16
   autocast on CUDA, fp32 on CPU). An entry `echocare:p4:b16` means variant echocare, patch 4, batch 16.
2. mfu (CUDA by default): FLOPs of one forward+backward counted with `FlopCounterMode`, with fused
   and explicit attention (to see whether fused SDPA is counted), over step time and the card's
   dense bf16 peak, for several batch sizes; optionally `torch.compile` and a kernel-time profile.
3. loop (CPU): the real `run_pretraining` loop on the demo config and synthetic demo data; median
   `outside_share` and `images_per_s` from its metrics.jsonl, first window dropped as warm-up.

    python bench/pretrain_throughput.py                      # CPU defaults, a few minutes
    python bench/pretrain_throughput.py --device cuda --skip-loop --compile --profile
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from echocare_core.data.ontology import load_ontology
from echocare_core.engine.optim import build_optimizer
from echocare_core.models.pretrain import EchoCarePretrainModel
from echocare_core.models.swin import EncoderConfig, RelPosBias

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "hospital_configs" / "pretrain_demo.yaml"
# Dense bf16 tensor-core peaks (no sparsity), from NVIDIA's datasheets; first match wins.
PEAK_BF16_TFLOPS = [
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
]


def machine_info(device: torch.device) -> dict[str, Any]:
    """CPU model, GPU name, torch version and thread count of this process."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "loadavg_at_start": os.getloadavg(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=torch.cuda.get_device_name(device),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            sm_count=props.multi_processor_count,
        )
    return info


def peak_bf16(gpu_name: str, override: float | None) -> tuple[float | None, str]:
    """Dense bf16 peak in FLOP/s for the card, and where the number came from."""
    if override:
        return override * 1e12, f"--peak-tflops {override:g}"
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in gpu_name.lower():
            return tflops * 1e12, f"{key} datasheet dense bf16 {tflops:g} TFLOPS"
    return None, f"unknown card '{gpu_name}': pass --peak-tflops"


def parse_entry(entry: str, default_batch: int) -> tuple[str, int, int]:
    """`variant[:pN][:bN]` -> (variant, patch_size, batch).

    Raises:
        ValueError: the entry has another form or names an unknown variant.
    """
    name, *opts = entry.split(":")
    patch, batch = 2, default_batch
    for opt in opts:
        if opt[:1] in ("p", "b") and opt[1:].isdigit():
            patch, batch = (int(opt[1:]), batch) if opt[0] == "p" else (patch, int(opt[1:]))
        else:
            raise ValueError(f"bad entry '{entry}': use variant[:pN][:bN], e.g. echocare:b16")
    EncoderConfig(variant=name, img_size=256, patch_size=patch)  # unknown variant -> ValueError with a hint
    return name, patch, batch


def build(
    variant: str, size: int, patch: int, device: torch.device, fused: bool = True, freeze_bias: bool = False
) -> tuple[EchoCarePretrainModel, torch.optim.Optimizer]:
    """Model and AdamW; `freeze_bias` (a diagnostic) stops gradients into the rel-pos tables."""
    cfg = EncoderConfig(variant=variant, img_size=size, patch_size=patch, drop_path=0.1, fused_attn=fused)
    model = EchoCarePretrainModel(cfg, load_ontology()).to(device).train()
    for m in model.modules():
        if isinstance(m, RelPosBias):
            m.relative_position_bias_table.requires_grad_(not freeze_bias)
    return model, build_optimizer(model, 1e-4, 0.05, (0.9, 0.999))


def make_batch(model: EchoCarePretrainModel, batch: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    cfg = model.encoder.cfg
    g = cfg.img_size // cfg.patch_size
    images = torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size, device=device)  # [B, C, H, W]
    token_mask = (torch.rand(batch, g, g, device=device) < 0.5).float()  # [B, H/p, W/p]
    n = model.hierarchy.targets.shape[0]
    anatomy = torch.randint(-1, n - 1, (batch,), device=device)  # [B], -1 = unlabelled
    return images, token_mask, anatomy


def train_step(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    batch: tuple[torch.Tensor, ...],
    bf16: bool,
    params: list[torch.Tensor],
) -> None:
    """One optimizer step as the engine takes it (autocast forward, backward, clip, step)."""
    with torch.autocast(batch[0].device.type, dtype=torch.bfloat16, enabled=bf16):
        loss, _, _ = model(*batch, 1.0)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 5.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    batch: tuple[torch.Tensor, ...],
    steps: int,
    warmup: int,
    bf16: bool,
) -> dict[str, float]:
    """Warm up, then time `steps` optimizer steps; synchronised around the timed region."""
    device, params = batch[0].device, [p for p in model.parameters() if p.requires_grad]
    t0 = time.perf_counter()
    for _ in range(warmup):
        train_step(model, opt, batch, bf16, params)
    sync(device)
    t1, c1 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        train_step(model, opt, batch, bf16, params)
    sync(device)
    wall = time.perf_counter() - t1
    row = {"ms_per_step": wall / steps * 1e3, "images_per_s": batch[0].shape[0] * steps / wall, "warmup_s": t1 - t0}
    if device.type == "cpu":  # under 1.0: other processes took cores from us (shared machine)
        row["cpu_share"] = (time.process_time() - c1) / (wall * torch.get_num_threads())
    return row


def measure(
    variant: str,
    size: int,
    patch: int,
    batch: int,
    args: argparse.Namespace,
    device: torch.device,
    fused: bool = True,
    compile_model: bool = False,
    freeze_bias: bool = False,
    profile: bool = False,
) -> dict[str, Any]:
    """Build, time and free one configuration; an out-of-memory error becomes a row, not a crash."""
    row: dict[str, Any] = {
        "variant": variant,
        "size": size,
        "patch": patch,
        "batch": batch,
        "fused_attn": fused,
        "compiled": compile_model,
        "bias_frozen": freeze_bias,
        "precision": "bf16" if device.type == "cuda" else "fp32",
    }
    gc.collect()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        model, opt = build(variant, size, patch, device, fused, freeze_bias)
        row["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
        run = torch.compile(model) if compile_model else model
        data = make_batch(model, batch, device)
        row.update(time_steps(run, opt, data, args.steps, args.warmup, device.type == "cuda"))
        if profile and device.type == "cuda":
            row["profile"] = profile_steps(run, opt, data)
    except torch.OutOfMemoryError:
        row["status"] = "OOM"
    else:
        row["status"] = "ok"
    finally:
        model = opt = run = data = None  # noqa: F841 - free before the next configuration
        gc.collect()
    if device.type == "cuda":
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.empty_cache()
    else:  # ru_maxrss is KiB on Linux and only grows: 0 means it fit in memory already touched
        row["peak_rss_growth_gib"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 2**20
    return row


def count_flops(
    variant: str, size: int, patch: int, batch: int, device: torch.device, fused: bool
) -> tuple[float, dict[str, float]]:
    """FLOPs of one forward+backward (what `FlopCounterMode` counts) and the per-op breakdown."""
    from torch.utils.flop_counter import FlopCounterMode

    model, _ = build(variant, size, patch, device, fused)
    data = make_batch(model, batch, device)
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss, _, _ = model(*data, 1.0)
        loss.backward()
    per_op = {str(k): float(v) for k, v in counter.get_flop_counts().get("Global", {}).items()}
    return float(counter.get_total_flops()), per_op


KERNEL_CLASSES = {
    "matmul": ("gemm", "nvjet", "xmma", "cutlass_80", "sm90_", "cublas"),
    "attention": ("fmha", "attention", "flash"),
    "layernorm": ("layer_norm",),
    "optimizer": ("multi_tensor", "adam", "foreach"),
    "compiled (triton)": ("triton_",),
    "roll": ("roll",),
    "copy/cast": ("copy",),
    "reduce": ("reduce",),
    "other elementwise": ("elementwise",),
}


def _attribute(evt: Any) -> str:
    """Where a host op came from: model line + the aten op it called, autograd node, or the bench."""
    op, e = evt.name, evt
    while e is not None:
        frames = [f for f in (getattr(e, "stack", None) or []) if "echocare_core/" in f]  # innermost first
        for name in frames[:1] + [e.name]:
            if "echocare_core/" in name:
                return f"{name.split('echocare_core/')[-1]}: {op}"
        if e.name.startswith("autograd::engine::evaluate_function: "):
            return f"backward: {e.name.split(': ', 1)[1]}"
        if "pretrain_throughput.py" in e.name:
            return f"bench {e.name.split(': ')[-1]}: {op}"
        if e.name.startswith("aten::"):
            op = e.name  # keep the outermost aten op below the Python frame (e.g. aten::roll, not aten::copy_)
        e = e.cpu_parent
    return f"untraced: {op}"


def _is_op(e: Any) -> bool:
    """A host-side op (not a Python frame or a user annotation such as `Optimizer.step#AdamW.step`)."""
    return (
        e.device_type == torch.autograd.DeviceType.CPU
        and not getattr(e, "is_user_annotation", False)
        and "#" not in e.key
        and ".py(" not in e.key
    )


def _self_us(e: Any) -> float:
    return float(e.self_device_time_total if hasattr(e, "self_device_time_total") else e.self_cuda_time_total)


def profile_steps(
    model: torch.nn.Module, opt: torch.optim.Optimizer, batch: tuple[torch.Tensor, ...], steps: int = 3, top: int = 10
) -> dict[str, Any]:
    """GPU time of `steps` steps: by kernel class, kernel, aten op, and model function or autograd node."""
    from torch.profiler import ProfilerActivity, profile

    params = [p for p in model.parameters() if p.requires_grad]
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as prof:
        for _ in range(steps):
            train_step(model, opt, batch, True, params)
        sync(batch[0].device)
    # device kernels, without GPU-side copies of annotations (`Optimizer.step#AdamW.step`) that would count
    # twice; kernel names may hold '#' too (`{lambda()#3}`) but never appear as host events
    host = {e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CPU and "#" in e.name}
    kernels: dict[str, float] = {}
    for e in prof.events():
        if (
            e.device_type == torch.autograd.DeviceType.CUDA
            and not getattr(e, "is_user_annotation", False)
            and e.name not in host
        ):
            kernels[e.name] = kernels.get(e.name, 0.0) + e.time_range.elapsed_us()
    total = sum(kernels.values()) or 1.0
    classes: dict[str, float] = {}
    for name, us in kernels.items():
        cls = next((c for c, keys in KERNEL_CLASSES.items() if any(k in name.lower() for k in keys)), "other")
        classes[cls] = classes.get(cls, 0.0) + us / total
    ops = {e.key: _self_us(e) / total for e in prof.key_averages() if _is_op(e) and _self_us(e) > 0}
    sources: dict[str, float] = {}
    for e in prof.events():
        if _is_op(e) and _self_us(e) > 0:
            key = _attribute(e)
            sources[key] = sources.get(key, 0.0) + _self_us(e) / total

    def ranked(d: dict[str, float], n: int) -> dict[str, float]:
        return dict(sorted(d.items(), key=lambda kv: -kv[1])[:n])

    return {
        "gpu_ms_per_step": total / steps / 1e3,
        "class_share": ranked(classes, 99),
        "top_kernels": {k[:100]: v / total for k, v in ranked(kernels, top).items()},
        "top_ops": ranked(ops, top),
        "top_sources": ranked(sources, top),
    }


def mfu_sweep(
    args: argparse.Namespace, device: torch.device, peak: float | None, out: dict[str, Any], save: Callable[[], None]
) -> None:
    """Step time over batch sizes for one configuration and MFU against the card's bf16 peak, into `out`.

    At the fastest batch it also times explicit attention, fused attention with the rel-pos tables
    frozen (how much the bias gradient costs), and `torch.compile` when asked.
    """
    v, size, patch = args.mfu_variant, args.mfu_size, args.mfu_patch
    b0 = min(args.mfu_batches)
    flops_fused, ops_fused = count_flops(v, size, patch, b0, device, fused=True)
    flops_explicit, ops_explicit = count_flops(v, size, patch, b0, device, fused=False)
    # model FLOPs: the explicit count (the fused count adds the recomputation inside the SDPA backward);
    # every counted op is linear in the batch, so one count serves all batch sizes
    per_image = flops_explicit / b0
    out.update(
        variant=v,
        size=size,
        patch=patch,
        flops_counted_at_batch=b0,
        gflops_per_image_fused_count=flops_fused / b0 / 1e9,
        gflops_per_image_explicit_count=flops_explicit / b0 / 1e9,
        sdpa_ops_counted=sorted(k for k in ops_fused if "attention" in k),
        flops_by_op_fused=ops_fused,
        flops_by_op_explicit=ops_explicit,
        rows=[],
    )

    def add(b: int, **kw: bool) -> None:
        row = measure(v, size, patch, b, args, device, **kw)
        if row["status"] == "ok":
            row["tflops_per_s"] = per_image * b / (row["ms_per_step"] / 1e3) / 1e12
            row["mfu"] = row["tflops_per_s"] * 1e12 / peak if peak else None
        out["rows"].append(row)
        print(f"  mfu {b} {kw}: {row.get('mfu', row['status'])}", file=sys.stderr)
        save()

    for b in args.mfu_batches:
        add(b)
    ok = [r for r in out["rows"] if r["status"] == "ok"]
    if not ok:
        return
    best = max(ok, key=lambda r: r["images_per_s"])["batch"]
    add(best, profile=args.profile)  # the same configuration again: shows the run-to-run spread
    add(best, fused=False)
    add(best, freeze_bias=True)
    if args.compile:  # last: compiling can take minutes
        add(best, compile_model=True, profile=args.profile)


def run_loop(args: argparse.Namespace) -> dict[str, Any]:
    """The real `run_pretraining` on the demo config (or `--loop-set` changes of it) and fresh synthetic data."""
    from echocare_core.config import load_config
    from echocare_core.engine.pretrain import run_pretraining
    from echocare_core.engine.pretrain_config import PretrainConfig
    from echocare_core.synthetic.dataset import write_dataset

    with tempfile.TemporaryDirectory(prefix="echocare_bench_") as tmp:
        sites = write_dataset(Path(tmp) / "data", "pretrain", 2, args.loop_per_site, size=args.loop_size, seed=0)
        overrides = [
            f"data.sources=[{', '.join(str(s) for s in sites)}]",
            f"output={Path(tmp) / 'run'}",
            "device=cpu",
            *args.loop_set,
        ]
        cfg = load_config(PretrainConfig, DEMO_CONFIG, overrides)
        t0 = time.perf_counter()
        result = run_pretraining(cfg)
        wall = time.perf_counter() - t0
        lines = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines() if x]
    windows = [
        {"step": m["step"], "images_per_s": m["images_per_s"], "outside_share": m["outside_share"]} for m in lines
    ]
    kept = windows[1:] if len(windows) > 1 else windows  # the first window holds start-up
    return {
        "config": str(DEMO_CONFIG.relative_to(ROOT)),
        "overrides": overrides[2:],
        "status": result.status,
        "steps": result.step,
        "wall_s": wall,
        "windows": windows,
        "median_outside_share": statistics.median(w["outside_share"] for w in kept),
        "median_images_per_s": statistics.median(w["images_per_s"] for w in kept),
    }


def fmt(v: Any, spec: str = ".1f") -> str:
    if v is None:
        return "-"
    return format(v, spec) if isinstance(v, float) else str(v)


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(f"\n{title}\n" + "\n".join(" | ".join(r) for r in [header, *rows]))
        return
    table = Table(title=title)
    for h in header:
        table.add_column(h, justify="left" if h in ("variant", "kernel", "class") else "right")
    for r in rows:
        table.add_row(*r)
    Console(width=160).print(table)


def step_rows(rows: list[dict[str, Any]], cuda: bool, mfu: bool = False) -> list[list[str]]:
    out = []
    for r in rows:
        mem = r.get("peak_mem_gib") if cuda else r.get("peak_rss_growth_gib")
        cells = [
            r["variant"],
            str(r["size"]),
            str(r["patch"]),
            str(r["batch"]),
            r["precision"],
            ("fused" if r["fused_attn"] else "explicit") + (", bias frozen" if r.get("bias_frozen") else ""),
            "yes" if r["compiled"] else "no",
            fmt(r.get("params_m")),
            fmt(r.get("images_per_s")),
            fmt(r.get("ms_per_step")),
            fmt(mem, ".2f"),
            r["status"],
        ]
        if not cuda:
            cells[-1:-1] = [fmt(r.get("cpu_share"), ".2f")]
        if mfu:
            cells[-1:-1] = [fmt(r.get("tflops_per_s"), ".3g"), fmt(r["mfu"] * 100 if r.get("mfu") else None)]
        out.append(cells)
    return out


def print_profile(row: dict[str, Any]) -> None:
    p = row["profile"]
    what = f"{row['variant']} batch {row['batch']} {'compiled' if row['compiled'] else 'eager'}"
    print(
        f"\nProfile of 3 steps, {what}: GPU kernel time {p['gpu_ms_per_step']:.1f} ms/step "
        f"(step time {row['ms_per_step']:.1f} ms)"
    )
    for key, title, col in (
        ("class_share", "kernel class", "class"),
        ("top_kernels", "top kernels", "kernel"),
        ("top_ops", "top aten ops (self GPU time)", "kernel"),
        ("top_sources", "GPU time by model function / autograd node", "kernel"),
    ):
        print_table(f"{what}: {title}", [col, "share %"], [[k, f"{v * 100:.1f}"] for k, v in p[key].items()])


def report(results: dict[str, Any], cuda: bool) -> None:
    m = results["machine"]
    print(
        f"machine: {m.get('gpu', m['cpu'])}; cpu {m['cpu']} x{m['cpu_count']}; torch {m['torch']}; "
        f"threads {m['torch_threads']}; load average (1/5/15 min) at start {m['loadavg_at_start']}, "
        f"at end {m['loadavg_at_end']}"
    )
    head = [
        "variant",
        "size",
        "patch",
        "batch",
        "prec",
        "attn",
        "compiled",
        "params M",
        "img/s",
        "ms/step",
        "peak GiB" if cuda else "RSS growth GiB",
        "status",
    ]
    if not cuda:
        head[-1:-1] = ["CPU share"]
    if results.get("steps"):
        print_table("Optimizer-step throughput", head, step_rows(results["steps"], cuda))
    if results.get("mfu"):
        f = results["mfu"]
        print(
            f"MFU: {f['variant']} {f['size']}x{f['size']} patch {f['patch']}: "
            f"{f['gflops_per_image_explicit_count']:.2f} GFLOP/image fwd+bwd counted with explicit attention, "
            f"{f['gflops_per_image_fused_count']:.2f} with fused SDPA (SDPA ops counted: "
            f"{', '.join(f['sdpa_ops_counted']) or 'none'}); peak used: {f['peak_source']}"
        )
        print_table(
            "Model FLOP utilisation", head[:-1] + ["TFLOP/s", "MFU %", "status"], step_rows(f["rows"], cuda, mfu=True)
        )
        for r in f["rows"]:
            if "profile" in r:
                print_profile(r)
    if results.get("loop"):
        lp = results["loop"]
        print(
            f"Real loop: {lp['config']} with {', '.join(lp['overrides'])}: {lp['steps']} steps in {lp['wall_s']:.0f} s"
        )
        print_table(
            "run_pretraining metrics.jsonl",
            ["step", "img/s", "outside share %"],
            [[str(w["step"]), f"{w['images_per_s']:.1f}", f"{w['outside_share'] * 100:.1f}"] for w in lp["windows"]],
        )
        print(
            f"median over windows after the first: outside_share {lp['median_outside_share'] * 100:.1f}%, "
            f"{lp['median_images_per_s']:.1f} img/s"
        )


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, torch.device]:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--variants",
        nargs="+",
        help="entries variant[:pN][:bN]; default CPU: test mini tiny, CUDA: tiny small base large base:p2:b32",
    )
    p.add_argument("--sizes", nargs="+", type=int, help="input sizes; default CPU: 128 256, CUDA: 256")
    p.add_argument(
        "--batch",
        type=int,
        help="images per step; default CPU: 8, CUDA: 128 (at 64 "
        "eager Swin steps are bound by the host's kernel launches)",
    )
    p.add_argument("--steps", type=int, help="timed optimizer steps; default CPU: 5, CUDA: 10")
    p.add_argument("--warmup", type=int, help="untimed steps first; default CPU: 2, CUDA: 3")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: CUDA if available")
    p.add_argument(
        "--out",
        type=Path,
        default=ROOT / "bench" / "results" / "pretrain_throughput.json",
        help="JSON file for the results and the machine description",
    )
    p.add_argument("--skip-steps", action="store_true", help="skip the per-variant step table")
    p.add_argument("--skip-loop", action="store_true", help="skip the real-loop measurement")
    p.add_argument(
        "--loop-set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="extra overrides for the demo loop, e.g. data.num_workers=0",
    )
    p.add_argument("--loop-size", type=int, default=128, help="synthetic image size for the real loop")
    p.add_argument("--loop-per-site", type=int, default=160, help="synthetic images per site (2 sites) for the loop")
    p.add_argument("--mfu-variant", default="echocare", help="variant for the MFU sweep")
    p.add_argument("--mfu-size", type=int, default=256, help="input size for the MFU sweep")
    p.add_argument("--mfu-patch", type=int, default=2, help="patch size for the MFU sweep")
    p.add_argument(
        "--mfu-batches", nargs="*", type=int, help="batch sizes for MFU; default CUDA: 64 128 256, CPU: none (skipped)"
    )
    p.add_argument("--peak-tflops", type=float, help="dense bf16 peak of the card, overrides detection")
    p.add_argument("--compile", action="store_true", help="also time torch.compile(model) at the best MFU batch")
    p.add_argument("--profile", action="store_true", help="profile GPU kernel time at the best MFU batch")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.exit(2, f"{p.prog}: error: --device cuda but torch {torch.__version__} sees no CUDA GPU\n")
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    defaults = {
        "variants": ["small", "echocare", "echocare:b32"] if cuda else ["test", "mini", "small"],
        "sizes": [256] if cuda else [128, 256],
        "batch": 128 if cuda else 8,
        "steps": 10 if cuda else 5,
        "warmup": 3 if cuda else 2,
        "mfu_batches": [64, 128, 256] if cuda else [],
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        for entry in args.variants:
            parse_entry(entry, args.batch)
    except ValueError as exc:
        p.error(str(exc))
    return args, torch.device("cuda" if cuda else "cpu")


def main(argv: list[str] | None = None) -> int:
    args, device = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    results: dict[str, Any] = {
        "machine": machine_info(device),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every section, so a crash or timeout keeps what was measured
        args.out.write_text(json.dumps(results, indent=1), encoding="utf-8")

    if not args.skip_steps:
        results["steps"] = []
        for entry in args.variants:
            variant, patch, batch = parse_entry(entry, args.batch)
            for size in args.sizes:
                results["steps"].append(measure(variant, size, patch, batch, args, device))
                print(f"  {entry} @ {size}: {results['steps'][-1].get('images_per_s', 'OOM')}", file=sys.stderr)
                save()
    if args.mfu_batches:
        peak, source = peak_bf16(results["machine"].get("gpu", "cpu"), args.peak_tflops)
        results["mfu"] = {"peak_flops": peak, "peak_source": source}
        mfu_sweep(args, device, peak, results["mfu"], save)
    if not args.skip_loop:
        results["loop"] = run_loop(args)
        save()
    results["machine"]["loadavg_at_end"] = os.getloadavg()
    save()
    report(results, device.type == "cuda")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
