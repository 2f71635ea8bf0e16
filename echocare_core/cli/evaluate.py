"""`echocare-evaluate`: metrics of a fine-tuned checkpoint on a site's dataset split."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from rich.console import Console
from rich.table import Table

from echocare_core.cli.common import fail, setup_logging

log = logging.getLogger("echocare")


def evaluate_main(argv: list[str] | None = None) -> int:
    prog = "echocare-evaluate"
    parser = argparse.ArgumentParser(prog=prog, description="Metrics of a fine-tuned checkpoint on a dataset "
                                     "split, per class, with a 95%% bootstrap interval for the main metric.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="fine-tuned checkpoint folder (e.g. runs/x/best)")
    parser.add_argument("--data", required=True, help="dataset folder (dataset.yaml + manifest.csv)")
    parser.add_argument("--split", default="test", choices=["train", "val", "test"])
    parser.add_argument("--split-seed", type=int, help="seed of the patient split when the manifest has no split "
                        "column (default: the one the checkpoint was trained with)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap rounds for the interval")
    parser.add_argument("--json", type=Path, help="also write the result as JSON")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    from echocare_core.engine.evaluate import evaluate_checkpoint

    try:
        result = evaluate_checkpoint(args.checkpoint, args.data, args.split, args.split_seed, rounds=args.bootstrap)
    except (ValueError, FileNotFoundError) as exc:
        log.debug("details", exc_info=True)
        return fail(prog, str(exc))
    main = result["main_metric"]
    lo, hi = result[f"{main}_ci95"]
    table = Table(title=f"{result['dataset']}, {result['split']} split, {result['samples']} samples")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in result["metrics"].items():
        table.add_row(name, f"{value:.4f}" + (f"  (95% CI {lo:.4f}-{hi:.4f})" if name == main else ""))
    Console().print(table)  # results on stdout, messages on stderr
    if args.json:
        from echocare_core.engine.finetune import write_json

        write_json(args.json, result)
    return 0
