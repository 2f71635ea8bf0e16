"""`echocare-client --config site.yaml`: check the site's dataset, then keep a Flower SuperNode connected.

The SuperNode connects out to the coordinator and runs `echocare_client.client_app` for each round,
which hands the round to this process's site worker (torch and the model code stay loaded). The
SuperNode is restarted (with back-off) when it exits on its own, e.g. after the server restarted
without its database. Ctrl-C or SIGTERM stops it cleanly. The site refuses to start when its privacy
ledger was edited or deleted; `echocare-client privacy --config site.yaml` prints the ledger.
`echocare-client model --config site.yaml --checkpoint ROUND --out DIR` makes the site's own model from a
global checkpoint of the federation and the layers the site kept (its head in a multi-task job).
"""

from __future__ import annotations

import ssl
import time
import urllib.request
from dataclasses import replace
from email.utils import parsedate_to_datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table

from echocare_client.config import SiteConfig
from echocare_client.worker import SiteWorker
from echocare_core.cli.common import StopFlag, config_parser, console, fail, setup_logging
from echocare_core.config import ConfigError, load_config, save_config
from echocare_core.data.contract import verify_dataset
from echocare_core.federation.runtime.processes import FlowerError, free_port, start, stop, toml_value
from echocare_core.files import write_atomic
from echocare_core.privacy.ledger import LedgerError, PrivacyLedger, dataset_fingerprint

PROG = "echocare-client"
STABLE_S = 300  # a SuperNode that ran this long was connected: its exit starts a new count of restarts
MAX_BEHIND_S, MAX_AHEAD_S = 240.0, 3.0  # Flower allows 305 s behind and 5 s ahead; margins for the Date
# header's one-second resolution and drift


def clock_offset(cfg: SiteConfig) -> float | None:
    """Seconds the coordinator's clock is ahead of this machine's, from the `Date` of its `/health` answer
    (about a second of resolution); None when it cannot be reached now."""
    context = None if cfg.insecure else ssl.create_default_context(cafile=cfg.root_certificates or None)
    t0 = time.time()
    try:
        with urllib.request.urlopen(
            f"{'http' if cfg.insecure else 'https'}://{cfg.server}/health", timeout=10, context=context
        ) as reply:
            server_time = parsedate_to_datetime(reply.headers["Date"]).timestamp()
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return server_time - (t0 + time.time()) / 2


def check_clock(cfg: SiteConfig) -> str:
    """Why this site cannot sign its requests ("" when it can): Flower's node authentication accepts a request
    signed at most 5 s later and 305 s earlier than the server's clock says."""
    offset = None if cfg.insecure else clock_offset(cfg)
    if offset is None or -MAX_AHEAD_S <= offset <= MAX_BEHIND_S:
        return ""
    size = f"{abs(offset):.0f}" if abs(offset) < 60 else f"about {round(abs(offset), -1):.0f}"
    return (
        f"this machine's clock is {size} s {'behind' if offset > 0 else 'ahead of'} the coordinator's "
        f"({cfg.server}); the coordinator refuses requests signed more than 5 s ahead of or 300 s behind its "
        f"clock. Synchronise the clock (NTP, e.g. timedatectl set-ntp true) and start again"
    )


def resolved(cfg: SiteConfig) -> SiteConfig:
    """The site's config with absolute paths: what the site worker and the ClientApp (another process, started
    elsewhere) read."""
    absolute = {
        k: str(Path(getattr(cfg, k)).resolve())
        for k in ("data", "state_dir", "root_certificates", "private_key", "base_weights")
        if getattr(cfg, k)
    }
    return replace(cfg, **absolute)


def write_node_config(cfg: SiteConfig, worker_socket: str) -> Path:
    """The SuperNode's `--node-config` file (what the ClientApp reads from `context.node_config`): the path of the
    resolved site.yaml, written beside it in the state folder, and the site worker's socket."""
    state = Path(cfg.state_dir)
    state.mkdir(parents=True, exist_ok=True)
    save_config(cfg, state / "site.yaml")
    values = {"site-config": str(state / "site.yaml"), "worker-socket": worker_socket}
    return write_atomic(state / "node.toml", "".join(f"{k} = {toml_value(v)}\n" for k, v in values.items()))


def show_ledger(cfg: SiteConfig, state: Path) -> int:
    """Print the site's privacy ledger: every DP round per dataset and the epsilon spent against the budget."""
    folder = state / "privacy"
    if not (folder / "ledger.json").exists() and not (folder / "ledger.key").exists():
        console.print(f"site {cfg.name}: no privacy ledger yet (no DP round has run with state_dir {state})")
        return 0
    ledger = PrivacyLedger(folder, cfg.privacy.epsilon_budget, cfg.privacy.delta)
    current = dataset_fingerprint(cfg.data)
    budget = f"{cfg.privacy.epsilon_budget:g}" if cfg.privacy.epsilon_budget else "no cap"
    for dataset in sorted(ledger.datasets, key=lambda d: d != current):
        mine = " (the dataset of this site.yaml)" if dataset == current else ""
        table = Table(
            title=f"dataset {dataset[:12]}{mine}: epsilon {ledger.spent(dataset):.3f} spent at delta "
            f"{cfg.privacy.delta:g}; budget {budget}"
        )
        for col in ("job", "round", "noise multiplier", "sample rate", "steps", "epsilon after", "when (UTC)"):
            table.add_column(col, justify="left" if col in ("job", "when (UTC)") else "right")
        for s in ledger.spends(dataset):
            table.add_row(
                s.job[:12],
                str(s.round),
                f"{s.noise_multiplier:.3f}",
                f"{s.sample_rate:.4f}",
                str(s.steps),
                f"{s.epsilon:.3f}",
                time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(s.time)),
            )
        Console().print(table)
    if current not in ledger.datasets:
        console.print(f"this site.yaml's dataset ({current[:12]}) has spent nothing yet")
    return 0


def _site_model(cfg: SiteConfig, state: Path, checkpoint: Path, out: Path, personalise: int) -> int:
    from safetensors import SafetensorError

    from echocare_core.federation.rounds import site_model

    try:
        path, scores = site_model(checkpoint, Path(cfg.data), state, out, personalise, cfg.split_seed, cfg.limits)
    except (ValueError, OSError, RuntimeError, SafetensorError) as exc:  # RuntimeError: the layers do not fit
        return fail(PROG, str(exc))
    if scores:
        table = Table(title=f"site {cfg.name}: validation split")
        for column in ("metric", "global", "personalised"):
            table.add_column(column, justify="left" if column == "metric" else "right")
        for name in (k.removeprefix("global_") for k in scores if k.startswith("global_")):
            table.add_row(name, f"{scores[f'global_{name}']:.4f}", f"{scores.get(f'local_{name}', float('nan')):.4f}")
        console.print(table)
        console.print(
            f"personalised: {personalise} epoch(s) on this site's training split, without the job's DP: "
            "keep it at this site"
        )
    console.print(f"site {cfg.name}: its model is in {path} (echocare-evaluate / echocare-predict --checkpoint {path})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = config_parser(
        PROG,
        "Join a federation: check this site's dataset, then connect to the coordinator "
        "and train each round on local data; only the shared weights leave the site.",
    )
    parser.add_argument(
        "action",
        nargs="?",
        choices=("run", "privacy", "model"),
        default="run",
        help="run: join the federation; privacy: print the site's privacy ledger; model: write the "
        "site's own model (--checkpoint, --out)",
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        help="model: a global checkpoint of the federation (from the coordinator's OUTPUT/checkpoints)",
    )
    parser.add_argument("--out", type=Path, help="model: the folder to write the site's model to")
    parser.add_argument(
        "--personalise",
        type=int,
        default=0,
        metavar="EPOCHS",
        help="model: fine-tune the global model on this site's training split for EPOCHS epochs first, and "
        "compare both on its validation split (0: the global model as it is)",
    )
    args = parser.parse_args(argv)
    if args.action == "model" and not (args.checkpoint and args.out):
        parser.error("model needs --checkpoint and --out")
    if args.personalise < 0:
        parser.error(f"--personalise {args.personalise}: epochs must be >= 0")
    setup_logging(args.verbose)
    try:
        cfg = load_config(SiteConfig, args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as exc:
        return fail(PROG, str(exc))
    state = Path(cfg.state_dir).resolve()
    report = verify_dataset(cfg.data)
    if not report.ok:
        return fail(
            PROG,
            f"data: {cfg.data} fails the dataset check with {report.describe()}. See them all with: "
            f"echocare-data verify {cfg.data}",
        )
    try:
        if args.action == "privacy":
            return show_ledger(cfg, state)
        if args.action == "model":
            return _site_model(cfg, state, args.checkpoint, args.out, args.personalise)
        PrivacyLedger(state / "privacy", cfg.privacy.epsilon_budget, cfg.privacy.delta)  # refuse a broken ledger
    except LedgerError as exc:
        return fail(PROG, str(exc), code=1)
    site = resolved(cfg)
    worker = SiteWorker(site)  # keeps the training stack loaded between rounds
    worker.start()
    try:
        return _supervise(cfg, state, write_node_config(site, worker.socket_path))
    finally:
        worker.close()


def _supervise(cfg: SiteConfig, state: Path, node_config: Path) -> int:
    """Keep Flower's SuperNode running until Ctrl-C / SIGTERM; restart it with back-off when it exits."""
    stop_flag = StopFlag("disconnecting from the federation")
    security = (
        ["--insecure"]
        if cfg.insecure
        else [
            "--root-certificates",
            str(Path(cfg.root_certificates).resolve()),
            "--auth-supernode-private-key",
            str(Path(cfg.private_key).resolve()),
        ]
    )
    cmd = ["flower-supernode", *security, "--superlink", cfg.server, "--node-config", str(node_config)]
    restarts = 0
    while not stop_flag():
        clock = check_clock(cfg)
        if clock:
            return fail(PROG, f"site {cfg.name}: {clock}", code=1)
        try:
            proc = start([*cmd, "--port", str(free_port())], state / "flwr", state / "supernode.log")
        except FlowerError as exc:
            return fail(PROG, str(exc), code=1)
        console.print(f"site {cfg.name}: connecting to {cfg.server} (log: {state / 'supernode.log'})")
        began = time.monotonic()
        while proc.poll() is None and not stop_flag():
            time.sleep(0.5)
        if stop_flag():
            stop(proc)
            break
        restarts = 1 if time.monotonic() - began > STABLE_S else restarts + 1  # count exits in a row only
        if restarts > cfg.max_restarts:
            return fail(
                PROG,
                f"the SuperNode exited {restarts} times in a row (last code {proc.returncode}); see "
                f"{state / 'supernode.log'}",
                code=1,
            )
        wait = min(2.0**restarts, 60.0)
        console.print(f"site {cfg.name}: SuperNode exited with code {proc.returncode}; restarting in {wait:.0f} s")
        end = time.monotonic() + wait
        while time.monotonic() < end and not stop_flag():
            time.sleep(0.5)
    console.print(f"site {cfg.name}: disconnected")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
