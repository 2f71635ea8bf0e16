"""`echocare-export`: a checkpoint's encoder in the EchoCare release layout, back to MONAI and EchoCare's users."""

from __future__ import annotations

from pathlib import Path

from echocare_core.cli.common import command_parser, console, input_error, setup_logging
from echocare_core.weights import export_release

PROG = "echocare-export"


def main(argv: list[str] | None = None) -> int:
    parser = command_parser(
        PROG,
        "Write the encoder of any toolkit checkpoint (pretraining, fine-tuning, a "
        "federation's round) as a .pth state dict in the EchoCare release layout: "
        "MONAI's SwinTransformer(spatial_dims=2, use_v2=True) keys plus mask_token, "
        "LoRA adapters merged. Load it as the authors load the release: "
        "sd = torch.load(file); sd.pop('mask_token'); model.load_state_dict(sd, "
        "strict=True).",
    )
    parser.add_argument("checkpoint", help="checkpoint folder (e.g. runs/x/best, runs/p/checkpoints/step_001000)")
    parser.add_argument("--out", required=True, type=Path, help="the .pth file to write")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        path = export_release(args.checkpoint, args.out)
    except (ValueError, FileNotFoundError) as exc:
        return input_error(PROG, exc)
    console.print(f"wrote {path} (release layout: MONAI SwinTransformer v2 state dict + mask_token)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
