"""`echocare-server --config federation.yaml`: start Flower's SuperLink, submit the federated run, show it live.

Everything Flower needs is written under OUTPUT (its home `flwr/`, database `superlink.db`, the thin
app `app/` that points at the installed `echocare_server` / `echocare_client` modules, the run config);
nobody writes Flower config by hand. The run's outcome is read from Flower (`flwr ls`), since
`flwr run` reports success even when a run failed. Run again on the same OUTPUT to resume after the
last checkpointed round.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from echocare_core.cli.common import StopFlag, config_parser, console, fail, setup_logging
from echocare_core.config import ConfigError, load_config, save_config, to_dict
from echocare_core.federation.rounds import initial_state
from echocare_core.federation.runtime.processes import (
    FlowerError,
    free_port,
    run_flwr,
    start,
    stop,
    toml_value,
    wait_healthy,
)
from echocare_core.files import write_atomic
from echocare_core.weights import weights_digest
from echocare_server.config import FederationConfig
from echocare_server.live import RunView

PROG = "echocare-server"
CONNECTION = "echocare"  # the name our private Flower config gives the local SuperLink

APP_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "echocare-federation"
version = "1.0.0"
description = "EchoCare FL job: configuration only; every side runs the echocare version it installed"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "echocare"

[tool.flwr.app.components]
serverapp = "echocare_server.server_app:app"
clientapp = "echocare_client.client_app:app"

[tool.flwr.app.config]
federation = "{}"
"""


def _ca(cfg: FederationConfig) -> Path | None:
    return None if cfg.server.insecure else (Path(cfg.server.keys) / "ca.pem").resolve()


def superlink_command(cfg: FederationConfig, out: Path, port: int) -> list[str]:
    """Flower's SuperLink on 127.0.0.1:port: TLS with the federation's certificate and node authentication,
    unless insecure."""
    keys = Path(cfg.server.keys).resolve()
    security = (
        ["--insecure"]
        if cfg.server.insecure
        else [
            "--ssl-ca-certfile",
            str(keys / "ca.pem"),
            "--ssl-certfile",
            str(keys / "server.pem"),
            "--ssl-keyfile",
            str(keys / "server.key"),
            "--enable-supernode-auth",
        ]
    )
    return [
        "flower-superlink",
        *security,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--database",
        str(out / "superlink.db"),
        "--disable-runtime-dependency-installation",
    ]


def proxy_command(cfg: FederationConfig, port: int) -> list[str]:
    """The Fleet-only proxy (echocare_server.proxy) on the public host:port, forwarding to 127.0.0.1:port."""
    keys = [] if cfg.server.insecure else ["--keys", str(Path(cfg.server.keys).resolve())]
    return [
        sys.executable,
        "-m",
        "echocare_server.proxy",
        "--listen",
        f"{cfg.server.host}:{cfg.server.port}",
        "--upstream",
        f"127.0.0.1:{port}",
        *keys,
    ]


def start_coordinator(cfg: FederationConfig, out: Path, port: int) -> list[subprocess.Popen]:
    """Start the SuperLink on 127.0.0.1:port (Flower's home written by `prepare`), register the allowed sites,
    then start the Fleet-only proxy on the public address; wait until both answer. Returns the processes, to
    stop with `processes.stop`.

    Raises:
        FlowerError: either did not come up, or a site key Flower refuses (both stopped).
    """
    home, procs = out / "flwr", []
    try:
        procs.append(start(superlink_command(cfg, out, port), home, out / "superlink.log"))
        wait_healthy("127.0.0.1", port, procs[0], out / "superlink.log", _ca(cfg))
        register_sites(cfg, out)  # before any site can reach it
        procs.append(start(proxy_command(cfg, port), home, out / "proxy.log"))
        wait_healthy(_local(cfg.server.host), cfg.server.port, procs[1], out / "proxy.log", _ca(cfg))
    except BaseException:
        for proc in reversed(procs):
            stop(proc)
        raise
    return procs


def _local(host: str) -> str:
    """Where this machine reaches a server bound to `host`."""
    return "127.0.0.1" if host in ("0.0.0.0", "::") else host


def register_sites(cfg: FederationConfig, out: Path) -> None:
    """Make the SuperLink's allow-list (kept in its database) match `server.allowed_sites`: register each listed
    site's public key, and unregister the sites registered by an earlier start that are no longer listed or
    whose key changed. `OUTPUT/sites.json` keeps name -> node id and key, rewritten after every change.

    Raises:
        FlowerError: a key Flower does not accept, or one it already knows but this coordinator did not
            register (Flower never takes a removed key back).
    """
    home, path = out / "flwr", out / "sites.json"
    known = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    keys = {name: Path(cfg.server.keys, "sites", f"{name}.pub").resolve() for name in cfg.server.allowed_sites}

    def save() -> None:
        write_atomic(path, json.dumps(known, indent=2))

    for name, entry in list(known.items()):
        if name not in keys or entry["key"] != keys[name].read_text(encoding="utf-8").strip():
            try:
                run_flwr(["supernode", "unregister", str(entry["node"]), CONNECTION], home)
            except FlowerError:
                nodes = run_flwr(["supernode", "ls", CONNECTION], home)["nodes"]
                if any(n["node-id"] == str(entry["node"]) and n["status"] != "unregistered" for n in nodes):
                    raise
            del known[name]
            save()
    for name, key in keys.items():
        if name in known:
            continue
        try:
            node = run_flwr(["supernode", "register", str(key), CONNECTION, "--name", name], home)["node-id"]
        except FlowerError as exc:
            if "already in use" in str(exc):
                raise FlowerError(
                    f"site {name}: the SuperLink's database ({out / 'superlink.db'}) already knows the key {key} but "
                    f"{path.name} has no record of registering it: it was removed from the federation earlier "
                    f"(Flower never takes a removed key back) or registered by an older start. Give the site a "
                    f"new key pair (delete {key.with_suffix('.*')}, run echocare-keys --out {cfg.server.keys} "
                    f"--sites {name}) or start with a new database"
                ) from exc
            raise
        known[name] = {"node": node, "key": key.read_text(encoding="utf-8").strip()}
        save()


def prepare(cfg: FederationConfig, out: Path, port: int) -> tuple[Path, Path]:
    """Write Flower's private home (its `flwr` commands reach the SuperLink on 127.0.0.1:port), the thin app
    and the run config; returns (app dir, run-config file)."""
    home, app = out / "flwr", out / "app"
    home.mkdir(parents=True, exist_ok=True)
    app.mkdir(exist_ok=True)
    trust = "insecure = true" if cfg.server.insecure else f"root-certificates = {toml_value(str(_ca(cfg)))}"
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "127.0.0.1:{port}"\n{trust}\n',
        encoding="utf-8",
    )
    (app / "pyproject.toml").write_text(APP_PYPROJECT, encoding="utf-8")
    run_config = out / "run_config.toml"
    job = json.dumps({**to_dict(cfg), "output": str(out)})
    run_config.write_text(f"federation = {toml_value(job)}\n", encoding="utf-8")
    return app, run_config


def follow(run_id: str, home: Path, progress: Path, offset: int, stop_flag: StopFlag) -> str:
    """Show the run's events until Flower says it finished; returns Flower's final status."""
    status, last_poll, stop_sent, view = "", 0.0, False, RunView()
    try:
        while True:
            if progress.is_file():
                with progress.open(encoding="utf-8") as f:
                    f.seek(offset)
                    for line in f:
                        if line.endswith("\n"):
                            offset += len(line.encode())
                            view.show(json.loads(line))
            if stop_flag() and not stop_sent:
                run_flwr(["stop", run_id, CONNECTION], home)
                stop_sent = True
            if time.monotonic() - last_poll > 2.0:
                last_poll = time.monotonic()
                runs = run_flwr(["ls", CONNECTION, "--run-id", run_id], home).get("runs", [])
                status = runs[0]["status"] if runs else ""
                if status.startswith("finished"):
                    return status
            time.sleep(0.3)
    finally:
        view.live.stop()


def main(argv: list[str] | None = None) -> int:
    parser = config_parser(
        PROG,
        "Coordinate a federation: start Flower's SuperLink, send the job to the sites each "
        "round, aggregate their shared weights, checkpoint every round.",
    )
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        cfg = load_config(FederationConfig, args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as exc:
        return fail(PROG, str(exc))
    if cfg.init:  # a file that does not fit stops here, before any site is asked
        try:
            initial_state(cfg.job, cfg.init, cfg.init_partial)
            base = weights_digest(cfg.init)
        except (ValueError, FileNotFoundError) as exc:
            return fail(PROG, f"init: {exc}")
        if cfg.job.base and cfg.job.base != base:
            return fail(
                PROG,
                f"job.base {cfg.job.base} is not the SHA-256 of init {cfg.init} ({base}); leave "
                f"job.base empty, the server sets it",
            )
        cfg = replace(cfg, job=replace(cfg.job, base=base))  # sites holding these weights need not download them
    out = Path(cfg.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "federation.yaml")
    home, progress = out / "flwr", out / "progress.jsonl"
    offset = progress.stat().st_size if progress.is_file() else 0
    stop_flag = StopFlag("stopping the run")
    procs: list[subprocess.Popen] = []
    try:
        port = free_port()
        app, run_config = prepare(cfg, out, port)
        procs = start_coordinator(cfg, out, port)
        console.print(
            f"serving the sites on {cfg.server.host}:{cfg.server.port} (Fleet API only); waiting for "
            f"{cfg.rounds.min_sites} sites"
        )
        run_id = str(run_flwr(["run", str(app), CONNECTION, "--run-config", str(run_config)], home)["run-id"])
        status = follow(run_id, home, progress, offset, stop_flag)
    except FlowerError as exc:
        return fail(PROG, str(exc), code=1)
    finally:
        for proc in reversed(procs):
            stop(proc)
    console.print(f"run {run_id}: {status}; checkpoints in {out / 'checkpoints'}")
    if status == "finished:completed":
        return 0
    return 130 if stop_flag() else 1


if __name__ == "__main__":
    raise SystemExit(main())
