"""`echocare-data`: dataset tools for sites and researchers.

Subcommands:
    synth   write synthetic ultrasound dataset folders, one per simulated site.
    verify  check a dataset folder against the contract before anything trains.
    ingest  turn a folder of DICOM files, images and cine loops into a clean, anonymised dataset folder.
    card    counts of a dataset that are safe to share with the coordinator.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from echocare_core.cli.common import console as err_console
from echocare_core.cli.common import fail, setup_logging
from echocare_core.data.contract import VerifyReport, verify_dataset
from echocare_core.files import write_atomic
from echocare_core.synthetic import ultrasound as synthetic
from echocare_core.synthetic.dataset import write_dataset

PROG = "echocare-data"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, except for options without one (required ones)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def _int_at_least(low: int) -> Callable[[str], int]:
    """argparse type: an integer >= `low`, with a one-line error otherwise."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def _size(text: str) -> int:
    value = _int_at_least(synthetic.MIN_SIZE)(text)
    if value > synthetic.MAX_SIZE:
        raise argparse.ArgumentTypeError(f"must be <= {synthetic.MAX_SIZE}, got {value}")
    return value


def _add_synth(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "synth",
        help="write synthetic ultrasound datasets, one folder per site",
        description="Write OUT/site_00, OUT/site_01, ... each a dataset folder (dataset.yaml, "
        "manifest.csv, images/ and masks/ or clips/) imaged with a different device profile.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--out", type=Path, required=True, help="parent folder of the site folders")
    p.add_argument("--sites", type=_int_at_least(1), required=True, help="number of sites")
    p.add_argument("--per-site", type=_int_at_least(1), required=True, help="images (regression: clips) per site")
    p.add_argument("--task", choices=synthetic.TASKS, required=True, help="what the labels are for")
    p.add_argument("--size", type=_size, default=128, help="image height and width in pixels")
    p.add_argument("--seed", type=int, default=0, help="base seed; same seed, same bytes")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace images/, masks/, clips/, manifest.csv and dataset.yaml in non-empty site folders",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.set_defaults(func=_run_synth)


def _add_verify(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "verify",
        help="check a dataset folder (dataset.yaml + manifest.csv) before training",
        description="Check every row of a dataset folder against the contract: required columns for the "
        "task, files that exist and decode, masks of the image's size with declared values, "
        "declared classes, constant landmark counts, boxes inside the image, numbers that parse, "
        "no patient in two splits. Reads only; exit code 1 when anything is wrong.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("folder", type=Path, help="the dataset folder")
    p.add_argument("--max-problems", type=_int_at_least(1), default=50, help="problems to list in the table")
    p.add_argument("--json", type=Path, help="also write the full report as JSON to this file")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.set_defaults(func=_run_verify)


def _run_verify(args: argparse.Namespace, console: Console) -> int:
    if not args.folder.is_dir():
        return fail(f"{PROG} verify", f"{args.folder} is not a folder")
    report = verify_dataset(args.folder)
    columns = Table(title=f"{args.folder}: task {report.task or '?'}, {report.rows} rows")
    for name in ("column", "required", "present", "missing", "wrong"):
        columns.add_column(name, justify="left" if name == "column" else "right")
    for col, c in report.columns.items():
        columns.add_row(
            col,
            "yes" if c["required"] else "",
            "yes" if c["present"] else "[red]no[/]",
            str(c["missing"]),
            f"[red]{c['wrong']}[/]" if c["wrong"] else "0",
        )
    console.print(columns)
    if report.problems:
        problems = Table(title=f"{len(report.problems)} problem(s)")
        for name in ("file", "row", "column", "value", "what is allowed"):
            problems.add_column(name, overflow="fold")
        for p in report.problems[: args.max_problems]:
            value = p.value if len(p.value) <= 60 else p.value[:57] + "..."
            problems.add_row(p.file, "" if p.row is None else str(p.row), p.column or "", value, p.allowed)
        console.print(problems)
        if len(report.problems) > args.max_problems:
            console.print(f"... and {len(report.problems) - args.max_problems} more (--max-problems, --json)")
    if args.json:
        _write_json(args.json, report)
    splits = ", ".join(f"{k} {v}" for k, v in sorted(report.splits.items()))
    console.print(
        f"[bold red]{len(report.problems)} problem(s)[/]"
        if report.problems
        else f"[bold green]ok[/]: {report.rows} rows; splits {splits}"
    )
    return 0 if report.ok else 1


def _write_json(path: Path, report: VerifyReport) -> None:
    _write_json_file(
        path,
        {
            "folder": str(report.folder),
            "task": report.task,
            "rows": report.rows,
            "ok": report.ok,
            "columns": report.columns,
            "splits": report.splits,
            "problems": [asdict(p) for p in report.problems],
        },
    )


def _write_json_file(path: Path, data: dict) -> None:
    write_atomic(path, json.dumps(data, indent=2))


def build_parser() -> argparse.ArgumentParser:
    """Return the `echocare-data` argument parser (one subparser per subcommand)."""
    parser = argparse.ArgumentParser(prog=PROG, description="EchoCare dataset tools.", formatter_class=_HelpFormatter)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_synth(subparsers)
    _add_verify(subparsers)
    _add_ingest(subparsers)
    _add_card(subparsers)
    _add_niqe_model(subparsers)
    return parser


def _add_niqe_model(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "niqe-model",
        help="fit NIQE's pristine model to a folder of high-quality images",
        description="Fit the model NIQE scores images against (mean and covariance of the sharp blocks' "
        "features) to the site's own high-quality images, and write it as .npz for "
        "echocare-evaluate --niqe-params. The published model was fitted to natural photographs.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("folder", type=Path, help="folder of high-quality images (searched recursively)")
    p.add_argument("--out", type=Path, required=True, help="the model file to write (.npz)")
    p.add_argument(
        "--block-size",
        type=_int_at_least(16),
        default=96,
        help="block side in pixels, even; images to score need two whole blocks",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.set_defaults(func=_run_niqe_model)


def _run_niqe_model(args: argparse.Namespace, console: Console) -> int:
    from echocare_core.engine.nr_quality import fit_niqe_params, save_niqe_params

    if args.out.suffix != ".npz":
        return fail(f"{PROG} niqe-model", f"--out {args.out}: name a .npz file")
    try:
        params = fit_niqe_params(args.folder, args.block_size)
    except (ValueError, FileNotFoundError) as exc:
        return fail(f"{PROG} niqe-model", str(exc))
    save_niqe_params(args.out, params)
    console.print(f"wrote {args.out} (blocks of {args.block_size} px)")
    return 0


def _add_ingest(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "ingest",
        help="DICOM files, images and cine loops in; a clean anonymised dataset folder out",
        description="Read every file under SRC (DICOM single- and multi-frame, PNG/JPG/BMP/TIFF, videos with "
        "PyAV), sample cine loops, cut out the ultrasound scan region (text, logos, rulers and colour "
        "bars outside it go), drop near-empty and near-duplicate frames, and write OUT: PNG images "
        "under fresh names, a manifest with a pseudonymous patient id (keyed by the site secret) and "
        "device fields only. What became of each file: OUT.ingest.csv beside OUT (mode 0600: it maps "
        "the dataset back to source files; keep it with the site). Then: echocare-data verify OUT",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("src", type=Path, help="the folder to read (searched recursively)")
    p.add_argument("--out", type=Path, required=True, help="the dataset folder to write (must not exist)")
    p.add_argument(
        "--task",
        choices=("pretrain", "classification"),
        default="pretrain",
        help="pretrain: unlabelled images; classification: the class is the first folder under SRC",
    )
    p.add_argument(
        "--classes",
        nargs="+",
        default=[],
        metavar="CLASS",
        help="classification: the class folders under SRC to read (others are left out)",
    )
    p.add_argument(
        "--secret",
        type=Path,
        required=True,
        help="the site's pseudonymisation secret, mode 0600 (made when missing; keep it: the same "
        "secret gives the same patient ids; it never leaves the site)",
    )
    p.add_argument("--log", type=Path, help="where to write what became of each file (default: OUT.ingest.csv)")
    p.add_argument("--frame-step", type=_int_at_least(1), default=10, help="cine loops: keep every k-th frame")
    p.add_argument(
        "--min-nonzero",
        type=_int_at_least(0),
        default=1000,
        help="drop frames with fewer non-zero pixels in the scan region",
    )
    p.add_argument(
        "--dedup-bits",
        type=_int_at_least(-1),
        default=4,
        help="drop a frame whose 64-bit perceptual hash is within this many bits of one kept for the "
        "same patient (-1: keep all)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.set_defaults(func=_run_ingest)


def _run_ingest(args: argparse.Namespace, console: Console) -> int:
    from echocare_core.data.ingest import IngestSettings, ingest, load_secret

    prog = f"{PROG} ingest"
    if not args.src.is_dir():
        return fail(prog, f"{args.src} is not a folder")
    if args.out.exists():
        return fail(prog, f"{args.out} exists: choose a new output folder (nothing is overwritten)")
    try:
        settings = IngestSettings(args.frame_step, args.min_nonzero, args.dedup_bits, args.task, tuple(args.classes))
        secret, made = load_secret(args.secret)
    except (ValueError, OSError) as exc:
        return fail(prog, str(exc))
    if made:
        console.print(f"made a new site secret in {args.secret} (mode 0600): keep it; it never leaves the site")
    with Progress(
        TextColumn("[bold]ingest"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
        disable=not err_console.is_terminal,
    ) as progress:
        bar = progress.add_task("files", total=None)
        try:
            result = ingest(
                args.src,
                args.out,
                secret,
                settings,
                args.log,
                on_file=lambda done, total: progress.update(bar, completed=done, total=total),
            )
        except (ValueError, OSError) as exc:  # nothing usable, the output appeared meanwhile, a full disk
            return fail(prog, str(exc))
    dropped = ", ".join(f"{reason} {n}" for reason, n in result.dropped.most_common()) or "nothing"
    console.print(
        f"{result.out}: {result.images} images of {result.patients} patients from {result.files} files; "
        f"dropped: {dropped} (why, per file: {result.log}). Next: echocare-data verify {result.out}",
        highlight=False,
        soft_wrap=True,
    )
    return 0


def _add_card(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "card",
        help="counts of a dataset that are safe to share with the coordinator",
        description="Samples and patients per split, class, device and modality, and image sizes: counts only, "
        "no id, file name or value of any sample.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("folder", type=Path, help="the dataset folder")
    p.add_argument("--json", type=Path, help="also write the card as JSON to this file")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.set_defaults(func=_run_card)


def _run_card(args: argparse.Namespace, console: Console) -> int:
    from echocare_core.data.ingest import data_card
    from echocare_core.data.io import ImageReadError

    try:
        card = data_card(args.folder)
    except (ValueError, OSError, ImageReadError) as exc:
        return fail(f"{PROG} card", str(exc))
    table = Table(
        title=f"data card: {card['name']} ({card['task']}), {card['samples']} samples, "
        f"{card['patients'] if card['patients'] is not None else '?'} patients"
    )
    table.add_column("what")
    table.add_column("counts", overflow="fold")
    for key in ("splits", "classes", "devices", "modalities", "image_sizes"):
        if card[key]:
            table.add_row(key.replace("_", " "), ", ".join(f"{k} {v}" for k, v in card[key].items()))
    console.print(table)
    if args.json:
        _write_json_file(args.json, card)
    return 0


def _site_summary(folder: Path) -> str:
    """One line per written site, read back from its manifest and dataset.yaml."""
    meta = yaml.safe_load((folder / "dataset.yaml").read_text(encoding="utf-8"))
    with open(folder / "manifest.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    splits = Counter(r["split"] for r in rows)
    patients = len({r["patient"] for r in rows})
    samples = {"regression": "clips", "report": "studies"}.get(meta["task"], "images")
    line = (
        f"{folder}: {len(rows)} {samples}, {patients} patients, train/val/test "
        f"{splits['train']}/{splits['val']}/{splits['test']}, profile {meta['device_profile']}"
    )
    if meta["task"] == "classification":
        labels = Counter(r["label"] for r in rows)
        line += ", " + ", ".join(f"{c} {labels[c]}" for c in meta["classes"])
    return line


def _run_synth(args: argparse.Namespace, console: Console) -> int:
    folders = [args.out / f"site_{i:02d}" for i in range(args.sites)]
    busy = [f for f in folders if f.exists() and (not f.is_dir() or any(f.iterdir()))]
    if busy and not args.overwrite:
        return fail(f"{PROG} synth", f"{busy[0]} is not empty; pass --overwrite to replace it or choose another --out")
    with Progress(
        TextColumn("[bold]synth {task.fields[what]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
        disable=not err_console.is_terminal,
    ) as progress:
        bar = progress.add_task("images", total=args.sites * args.per_site, what=args.task)
        try:
            written = write_dataset(
                args.out,
                args.task,
                args.sites,
                args.per_site,
                size=args.size,
                seed=args.seed,
                overwrite=args.overwrite,
                on_image=lambda: progress.advance(bar),
            )
        except FileExistsError as err:  # a site folder appeared or is a file
            return fail(f"{PROG} synth", str(err))
    for folder in written:
        console.print(_site_summary(folder), highlight=False, soft_wrap=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run `echocare-data` with `argv` (default: sys.argv[1:]) and return the exit code.

    Raises:
        SystemExit: code 2 with a one-line reason on bad arguments (argparse), 0 after --help.
    """
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    return args.func(args, Console())


if __name__ == "__main__":
    raise SystemExit(main())
