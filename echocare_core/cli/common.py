"""What every `echocare-*` command shares: config arguments, logging, errors, progress bars."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

__all__ = [
    "command_parser",
    "config_parser",
    "input_error",
    "metrics_table",
    "setup_logging",
    "fail",
    "StopFlag",
    "step_progress",
]

console = Console(stderr=True, width=None if sys.stderr.isatty() else 132)  # logs: tables not squeezed to 80


def command_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """A parser whose help shows defaults, with `-v/--verbose`."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def config_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """`command_parser` plus `--config FILE` and repeatable `--set key=value`."""
    parser = command_parser(prog, description)
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.lr=1e-4 (repeatable)",
    )
    return parser


def input_error(prog: str, exc: Exception) -> int:
    """Exit code 2 with the one-line reason; `-v` also logs where it came from."""
    logging.getLogger(prog).debug("details", exc_info=True)
    return fail(prog, str(exc))


def metrics_table(title: str, metrics: dict[str, float], notes: dict[str, str] | None = None) -> Table:
    """A two-column table of metric values, with an optional note after some of them."""
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in metrics.items():
        table.add_row(name, f"{value:.4f}" + (notes or {}).get(name, ""))
    return table


def fail(prog: str, message: str, code: int = 2) -> int:
    """Print a one-line reason and return the exit code (2: usage or input error)."""
    console.print(f"[bold red]{prog}: error:[/] {message}", highlight=False, soft_wrap=True)
    return code


def setup_logging(verbose: bool = False, rank: int = 0) -> None:
    level = logging.DEBUG if verbose else (logging.INFO if rank == 0 else logging.WARNING)
    logging.basicConfig(
        level=level,
        format="%(message)s",
        datefmt="[%X]",
        handlers=[RichHandler(console=console, show_path=False, rich_tracebacks=True)],
        force=True,
    )


class StopFlag:
    """First Ctrl-C / SIGTERM asks for a clean stop at the next step; a second Ctrl-C aborts."""

    def __init__(self, what: str) -> None:
        self.requested = False
        self.what = what
        signal.signal(signal.SIGINT, self._handle)
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        console.print(f"[yellow]{signal.Signals(signum).name}: {self.what} (Ctrl-C again to abort now)[/]")

    def __call__(self) -> bool:
        return self.requested


def step_progress(description: str, fields: dict[str, str]) -> tuple[Progress, Callable[[int, int, dict], None]]:
    """A progress bar over steps that shows chosen metrics; returns it and an update callback.

    Args:
        description: left-hand label.
        fields: metric key -> format, e.g. {"loss": "loss {:.4f}"}.
    """
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[metrics]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        disable=not sys.stderr.isatty(),
    )
    task = progress.add_task(description, total=None, metrics="")

    def update(step: int, total: int, metrics: dict) -> None:
        text = "  ".join(fmt.format(metrics[k]) for k, fmt in fields.items() if k in metrics)
        progress.update(task, completed=step, total=total, metrics=text)

    return progress, update
