"""Flower's commands as supervised subprocesses (flwr is driven through its CLIs, never imported here).

Every Flower process gets a private `FLWR_HOME` (the run's or the site's state folder, never the
user's home), telemetry and update checks off, and the Python environment's `bin` first on `PATH`
(the SuperLink and SuperNodes start `flower-superexec` by name). Each runs in its own process group,
so stopping it also stops what it started.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

__all__ = ["FlowerError", "flower_env", "free_port", "run_flwr", "start", "stop", "toml_value", "wait_healthy"]


PR_SET_PDEATHSIG = 1  # linux/prctl.h
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None  # resolved once, not
# in the forked child (which must not load libraries while other threads may hold locks)


class FlowerError(RuntimeError):
    """A Flower command failed; the message carries its output's last lines."""


def flower_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_SUPEREXEC_TASK_POLL_INTERVAL="0.2",  # default 1 s between checks for a new app to start
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
    )
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def toml_value(value: str | int | float | bool) -> str:
    """A TOML literal: JSON strings are valid TOML basic strings (quotes, backslashes, spaces survive)."""
    return json.dumps(value) if not isinstance(value, bool) else str(value).lower()


def _resolve(cmd: list[str], env: dict[str, str]) -> list[str]:
    """The command with its program found on `env`'s PATH (this Python's `bin` first).

    Raises:
        FlowerError: Flower's commands are not installed.
    """
    program = shutil.which(cmd[0], path=env["PATH"])
    if program is None:
        raise FlowerError(f"'{cmd[0]}' not found next to {sys.executable} or on PATH; install flwr (pip install -e .)")
    return [program, *cmd[1:]]


def _die_with(parent: int) -> Callable[[], None]:
    """For the child, before exec (Linux): SIGTERM when the thread that started it ends (ours: the main
    thread, so when the process dies, however it dies), so a killed echocare-server or echocare-client leaves
    no SuperLink, proxy or SuperNode behind; exit at once if the parent is already gone."""

    def child() -> None:
        if _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM) != 0 or os.getppid() != parent:
            os._exit(1)

    return child


def start(cmd: list[str], home: Path, log: Path) -> subprocess.Popen:
    """Start a Flower command in its own process group, output appended to `log`; it is stopped when this
    process dies (Linux)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = flower_env(home)
    with log.open("ab") as out:
        return subprocess.Popen(
            _resolve(cmd, env),
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with(os.getpid()) if _LIBC else None,
        )


def stop(proc: subprocess.Popen | None, grace: float = 15.0) -> None:
    """SIGTERM the process group, SIGKILL after `grace` seconds."""
    if proc is None or proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def wait_healthy(
    host: str, port: int, proc: subprocess.Popen, log: Path, ca: Path | None = None, timeout: float = 120.0
) -> None:
    """Wait until `proc` (the SuperLink or its proxy) answers `/health` on host:port (over TLS, trusting `ca`,
    when given).

    Raises:
        FlowerError: it exited or did not answer within `timeout` seconds.
    """
    name = f"the {log.stem}"  # superlink.log, proxy.log
    url = f"{'https' if ca else 'http'}://{host}:{port}/health"
    context = ssl.create_default_context(cafile=str(ca)) if ca else None
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise FlowerError(f"{name} exited with code {proc.returncode}; see {log}")
        try:
            with urllib.request.urlopen(url, timeout=2, context=context) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise FlowerError(f"{name} did not become healthy on {host}:{port} in {timeout:.0f} s; see {log}")


def run_flwr(args: list[str], home: Path, timeout: float = 120.0) -> dict:
    """Run `flwr ARGS --format json` and return its JSON answer.

    Raises:
        FlowerError: non-zero exit, no JSON, or `"success": false`.
    """
    env = flower_env(home)
    done = subprocess.run(
        _resolve(["flwr", *args, "--format", "json"], env), env=env, capture_output=True, text=True, timeout=timeout
    )
    try:
        answer = json.loads(done.stdout)
    except json.JSONDecodeError:
        answer = None
    if done.returncode != 0 or not isinstance(answer, dict) or answer.get("success") is False:
        tail = (done.stdout + done.stderr).strip().splitlines()[-5:]
        raise FlowerError(f"flwr {' '.join(args[:2])} failed (exit {done.returncode}): {' | '.join(tail)}")
    return answer
