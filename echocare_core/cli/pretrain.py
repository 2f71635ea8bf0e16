"""`echocare-pretrain`: MIM + hierarchical anatomy pretraining, alone or under torchrun."""

from __future__ import annotations

import logging
import os

from echocare_core.cli.common import StopFlag, config_parser, console, fail, input_error, setup_logging, step_progress
from echocare_core.config import ConfigError, load_config
from echocare_core.engine.pretrain import NonFiniteLossError, run_pretraining
from echocare_core.engine.pretrain_config import PretrainConfig

PROG = "echocare-pretrain"
log = logging.getLogger(PROG)


def main(argv: list[str] | None = None) -> int:
    parser = config_parser(
        PROG,
        "Pretrain the EchoCare encoder (masked image modelling + hierarchical anatomy "
        "classifier) on folders of ultrasound images. Run the same command again to "
        "resume from the last checkpoint. Multi-GPU: torchrun --nproc_per_node=N "
        "-m echocare_core.cli.pretrain --config ...",
    )
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    setup_logging(args.verbose, rank)
    try:
        cfg = load_config(PretrainConfig, args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as exc:
        return fail(PROG, str(exc))
    stop = StopFlag("saving a checkpoint after this step, then stopping")
    progress, update = step_progress(
        "pretrain",
        {"loss": "loss {:.4f}", "loss_mim": "mim {:.4f}", "loss_hie": "hie {:.4f}", "images_per_s": "{:.1f} img/s"},
    )

    def on_step(step: int, total: int, metrics: dict) -> None:
        update(step, total, metrics)
        if progress.disable and (step % cfg.log_every == 0 or step == total):  # no terminal: log lines instead
            log.info(
                "step %d/%d  loss %.4f  mim %.4f  hie %.4f  %.1f img/s",
                step,
                total,
                metrics["loss"],
                metrics["loss_mim"],
                metrics["loss_hie"],
                metrics.get("images_per_s", float("nan")),
            )

    try:
        with progress:
            result = run_pretraining(cfg, on_step=on_step, stop=stop)
    except NonFiniteLossError as exc:
        return fail(PROG, str(exc), code=1)
    except (ValueError, FileNotFoundError) as exc:
        return input_error(PROG, exc)
    if rank == 0:
        skipped = result.skipped
        resumed = f" (resumed at step {result.resumed_from})" if result.resumed_from else ""
        console.print(
            f"[bold green]{result.status}[/] at step {result.step}{resumed}: "
            f"loss {result.last.get('loss', float('nan')):.4f}; skipped images: "
            f"{skipped.get('unreadable', 0)} unreadable, {skipped.get('near-empty', 0)} near-empty"
        )
        console.print(f"run folder: {result.output}  (checkpoints/, metrics.jsonl, report.md)")
    return 0 if result.status == "finished" else 130


if __name__ == "__main__":
    raise SystemExit(main())
