"""`echocare-evaluate`: metrics of a fine-tuned checkpoint on a site's dataset split."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from echocare_core.cli.common import command_parser, input_error, metrics_table, setup_logging


def main(argv: list[str] | None = None) -> int:
    prog = "echocare-evaluate"
    parser = command_parser(
        prog,
        "Metrics of a fine-tuned checkpoint on a dataset split, per class, with a "
        "95%% bootstrap interval for the main metric.",
    )
    parser.add_argument("--checkpoint", required=True, help="fine-tuned checkpoint folder (e.g. runs/x/best)")
    parser.add_argument("--data", required=True, help="dataset folder (dataset.yaml + manifest.csv)")
    parser.add_argument("--split", default="test", choices=["train", "val", "test"])
    parser.add_argument(
        "--split-seed",
        type=int,
        help="seed of the patient split when the manifest has no split "
        "column (default: the one the checkpoint was trained with)",
    )
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap rounds for the interval")
    parser.add_argument("--json", type=Path, help="also write the result as JSON")
    parser.add_argument(
        "--fid-weights",
        default="",
        help="enhancement: FID against the targets, with "
        "torch-fidelity's Inception-v3 weights from this file (weights-inception-2015-12-05-6726825d.pth)",
    )
    parser.add_argument(
        "--brisque-weights",
        default="",
        help="enhancement: BRISQUE of the enhanced images, with "
        "piq's SVM weights from this file (brisque_svm_weights.pt)",
    )
    parser.add_argument(
        "--niqe-params",
        default="",
        help="enhancement: NIQE of the enhanced images against the "
        "pristine model in this file: .npz with mu_pris_param and cov_pris_param (BasicSR's "
        "niqe_pris_params.npz, or one fitted to your own high-quality images) or .mat from the NIQE "
        "authors' release (PIQE needs no file and "
        "is always reported; echocare-data niqe-model fits one)",
    )
    parser.add_argument(
        "--beam",
        type=int,
        default=None,
        help="report generation: beam width, 1 = greedy (default: the one the checkpoint was trained with)",
    )
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    from echocare_core.engine.evaluate import evaluate_checkpoint
    from echocare_core.engine.quality import QualityWeights

    try:
        result = evaluate_checkpoint(
            args.checkpoint,
            args.data,
            args.split,
            args.split_seed,
            rounds=args.bootstrap,
            quality=QualityWeights(args.fid_weights, args.brisque_weights, args.niqe_params),
            beam=args.beam,
        )
    except (ValueError, FileNotFoundError) as exc:
        return input_error(prog, exc)
    main = result["main_metric"]
    lo, hi = result[f"{main}_ci95"]
    Console().print(
        metrics_table(
            f"{result['dataset']}, {result['split']} split, {result['samples']} samples",
            result["metrics"],
            {main: f"  (95% CI {lo:.4f}-{hi:.4f})"},
        )
    )  # results on stdout, messages on stderr
    if args.json:
        from echocare_core.engine.finetune import write_json

        write_json(args.json, result)
    return 0
