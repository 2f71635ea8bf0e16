"""Benchmark: forward + backward of the released EchoCare encoder, ours against MONAI's own class.

What a site can expect per image at the release's input (3 x 256 x 256): the toolkit's encoder with fused
(scaled-dot-product) and explicit attention (what DP training uses), against MONAI's
`SwinTransformer(spatial_dims=2, use_v2=True)` on the same weights; a loss on all five outputs, so every
stage runs backward. On a CPU in fp32; on a GPU in bf16 autocast, eager and `torch.compile`d, with images/s
and model FLOP utilisation (FLOPs counted by `torch.utils.flop_counter` for one step, against the card's
dense bf16 peak given with `--peak-tflops`). Prints a table and writes JSON. A program, not a test; run it
alone (anything beside it on 2 cores slows it by up to 25x).

    python bench/encoder_speed.py                        # CPU: a few minutes on 2 cores (needs einops: .[test])
    python bench/encoder_speed.py --batch 32 --steps 20 --peak-tflops 989   # H100 (SXM) bf16 dense peak
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import time
from pathlib import Path

import torch
from monai.networks.nets.swin_unetr import SwinTransformer
from torch.utils.flop_counter import FlopCounterMode

from echocare_core.models.swin import EncoderConfig, SwinEncoder

ROOT = Path(__file__).resolve().parents[1]


def monai_encoder(cfg: EncoderConfig) -> torch.nn.Module:
    a = cfg.arch
    return SwinTransformer(
        in_chans=cfg.in_chans,
        embed_dim=a["embed_dim"],
        window_size=(cfg.window_size,) * 2,
        patch_size=(cfg.patch_size,) * 2,
        depths=a["depths"],
        num_heads=a["num_heads"],
        qkv_bias=True,
        spatial_dims=2,
        use_v2=True,
    )


class Ours(torch.nn.Module):
    """The toolkit's encoder with MONAI's call: the five normed outputs."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.encoder = SwinEncoder(cfg)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.encoder.forward_intermediates(x, intermediates_only=True)


def step_fn(model: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype | None):
    def step() -> None:
        with torch.autocast(x.device.type, dtype=dtype) if dtype else contextlib.nullcontext():
            loss = sum(o.float().square().mean() for o in model(x))
        loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def measure(
    name: str, model: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype | None, steps: int, warmup: int
) -> dict:
    step = step_fn(model, x, dtype)
    for _ in range(warmup):
        step()
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    sync()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    median = times[len(times) // 2]
    return {
        "model": name,
        "batch": x.shape[0],
        "median_s": median,
        "min_s": times[0],
        "max_s": times[-1],
        "s_per_image": median / x.shape[0],
        "images_per_s": x.shape[0] / median,
    }


def flops_per_step(model: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype | None) -> float:
    counter = FlopCounterMode(display=False)
    with counter:
        step_fn(model, x, dtype)()
    return float(counter.get_total_flops())


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="timed steps per row (the median is reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--compile", action="store_true", help="also torch.compile each model (GPU rows)")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="the card's dense bf16 peak, for MFU")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "encoder_speed.json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else None
    cfg = EncoderConfig(drop_path=0.0)
    torch.manual_seed(0)
    reference = monai_encoder(cfg)
    models = {"monai": reference}
    for fused in (True, False):
        ours = Ours(EncoderConfig(drop_path=0.0, fused_attn=fused))
        ours.encoder.load_state_dict(reference.state_dict(), strict=True)
        models[f"echocare ({'fused' if fused else 'explicit'} attention)"] = ours
    x = torch.randn(args.batch, 3, cfg.img_size, cfg.img_size, device=device)
    flops = flops_per_step(models["monai"].to(device), x, dtype)
    rows = []
    for name, model in models.items():
        model.to(device).train()
        variants = [(name, model)] + ([(f"{name}, compiled", torch.compile(model))] if args.compile else [])
        for label, m in variants:
            row = measure(label, m, x, dtype, args.steps, args.warmup)
            row["tflops_per_s"] = flops / row["median_s"] / 1e12
            row["mfu"] = row["tflops_per_s"] / args.peak_tflops if args.peak_tflops else None
            rows.append(row)
            print(
                f"{label:<44} batch {row['batch']:>3}  {row['s_per_image'] * 1e3:>9.1f} ms/image  "
                f"{row['images_per_s']:>8.2f} images/s  {row['tflops_per_s']:>7.3f} TFLOP/s"
                + (f"  MFU {row['mfu']:.1%}" if row["mfu"] is not None else "")
            )
        model.cpu()
    machine = (
        torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"{platform.processor() or 'CPU'}, {torch.get_num_threads()} threads"
    )
    print(
        f"({machine}; {'bf16 autocast' if dtype else 'fp32'}; one step = forward + backward of a loss on all five "
        f"outputs, {flops / args.batch / 1e9:.1f} GFLOP per image by torch's counter)"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "args": {k: str(v) for k, v in vars(args).items()},
                "machine": machine,
                "gflop_per_image": flops / args.batch / 1e9,
                "rows": rows,
            },
            indent=2,
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
