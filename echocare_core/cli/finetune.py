"""`echocare-finetune`: fine-tune the encoder and a task head on this site's dataset (no federation)."""

from __future__ import annotations

from echocare_core.cli.common import (
    StopFlag,
    config_parser,
    console,
    fail,
    input_error,
    metrics_table,
    setup_logging,
    step_progress,
)
from echocare_core.config import ConfigError, load_config
from echocare_core.engine.finetune import run_finetune
from echocare_core.engine.finetune_config import FinetuneConfig
from echocare_core.engine.pretrain import NonFiniteLossError

PROG = "echocare-finetune"


def main(argv: list[str] | None = None) -> int:
    parser = config_parser(
        PROG,
        "Fine-tune the EchoCare encoder with a task head (classification, segmentation, "
        "landmarks, detection or regression over clips) on the site's dataset: full, "
        "frozen or LoRA. Checks the dataset first, keeps the best epoch, resumes when run "
        "again, tests at the end.",
    )
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        cfg = load_config(FinetuneConfig, args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as exc:
        return fail(PROG, str(exc))
    stop = StopFlag("saving after this epoch, then stopping")
    progress, update = step_progress(
        "epochs",
        {
            "train_loss": "loss {:.4f}",
            "val_auc": "val AUC {:.3f}",
            "val_dice": "val Dice {:.3f}",
            "val_mre": "val MRE {:.2f} px",
            "val_map50": "val mAP50 {:.3f}",
            "val_mae": "val MAE {:.2f}",
        },
    )
    try:
        with progress:
            result = run_finetune(cfg, on_epoch=update, stop=stop)
    except NonFiniteLossError as exc:
        return fail(PROG, str(exc), code=1)
    except (ValueError, FileNotFoundError) as exc:
        return input_error(PROG, exc)
    console.print(
        f"{result.status} after epoch {result.epoch}; {result.trainable:,} of {result.total:,} "
        f"parameters trained; {result.skipped} unreadable samples skipped"
    )
    if result.test:
        console.print(
            metrics_table(f"test metrics of the best epoch ({result.output / 'test_metrics.json'})", result.test)
        )
    return 130 if result.status == "stopped" else 0


if __name__ == "__main__":
    raise SystemExit(main())
