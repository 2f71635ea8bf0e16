"""`echocare-predict`: predictions of a fine-tuned checkpoint as a CSV, with mask and overlay PNGs."""

from __future__ import annotations

from pathlib import Path

from echocare_core.cli.common import command_parser, console, input_error, setup_logging


def main(argv: list[str] | None = None) -> int:
    prog = "echocare-predict"
    parser = command_parser(
        prog,
        "Predict with a fine-tuned checkpoint: predictions.csv (class probabilities, "
        "landmark coordinates, boxes or values) and mask / overlay PNGs to look at.",
    )
    parser.add_argument("--checkpoint", required=True, help="fine-tuned checkpoint folder (e.g. runs/x/best)")
    parser.add_argument(
        "--input",
        required=True,
        help="an image file or a folder of images (report generation "
        "with two views per report: a folder of study folders, each with its one or two images)",
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--min-score", type=float, default=0.3, help="detection: leave out boxes scoring lower")
    parser.add_argument(
        "--beam",
        type=int,
        default=None,
        help="report generation: beam width, 1 = greedy (default: the one the checkpoint was trained with)",
    )
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    from echocare_core.engine.predict import list_inputs, predict_files

    try:
        target, unreadable = predict_files(
            args.checkpoint, list_inputs(args.input), args.out, args.min_score, args.beam
        )
    except (ValueError, FileNotFoundError) as exc:
        return input_error(prog, exc)
    console.print(
        f"wrote {target}" + (f"; {unreadable} file(s) could not be read (marked in the CSV)" if unreadable else "")
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
