"""A whole federation on one machine: `echocare-server` and one `echocare-client` per site as separate processes,
for the demo, rehearsals, fault tests and benchmarks.

With `isolated=True` (root and iproute2) the server and every site get their own network namespace: the
sites sit on a bridge in the server's namespace (coordinator 10.77.0.1, site i 10.77.0.(10+i)), reach the
coordinator only through its published address, and `cut(site)` takes that site's link down for real.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from echocare_core.federation.runtime.processes import free_port, stop

__all__ = ["COORDINATOR_ADDRESS", "Testbed", "can_isolate", "run_on_this_machine"]

COORDINATOR_ADDRESS = "10.77.0.1"  # the coordinator's address on an isolated testbed's bridge


def can_isolate() -> bool:
    """Whether this machine can give each party its own network namespace (root and `ip netns`)."""
    if os.geteuid() != 0:
        return False
    name = f"ecprobe{os.getpid()}"
    try:
        subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        return False
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return True


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


class Testbed:
    """The server and the sites of a federation, started, killed and cut one by one; `close` stops everything
    (and removes the namespaces). Use as a context manager.

    Args:
        out: where federation.yaml, each NAME.yaml and the sites' state (site_state/NAME) go.
        sites: site name -> dataset folder.
        federation: federation.yaml without its `server` section (set here); its `output` is the server's.
        keys: an echocare-keys folder (TLS and site keys; each site uses keys/sites/NAME.key); None: insecure.
        allowed: the sites the server lets in (default: all of `sites`).
        isolated: one network namespace per party (see the module docstring).
    """

    def __init__(
        self,
        out: Path,
        sites: dict[str, Path],
        federation: dict[str, Any],
        keys: Path | None = None,
        allowed: list[str] | None = None,
        isolated: bool = False,
        show_server: bool = True,
    ) -> None:
        self.out, self.sites, self.keys, self.isolated, self.show_server = out, sites, keys, isolated, show_server
        self.prefix = f"ec{os.getpid() % 100000}"
        self.port = free_port()
        host = COORDINATOR_ADDRESS if isolated else "127.0.0.1"
        server: dict[str, Any] = {"host": host, "port": self.port, "insecure": keys is None}
        if keys is not None:
            server.update(keys=str(keys), allowed_sites=list(allowed or sites))
        out.mkdir(parents=True, exist_ok=True)
        (out / "federation.yaml").write_text(yaml.safe_dump({**federation, "server": server}, sort_keys=False))
        self.output = Path(federation["output"])
        self.server: subprocess.Popen | None = None
        self.clients: dict[str, subprocess.Popen] = {}
        self.namespaces: list[str] = []
        if isolated:
            try:
                self._make_network()
            except BaseException:
                self.close()  # no namespace left behind
                raise

    # -- the network ---------------------------------------------------------------------------------------
    def _ns(self, index: int | None) -> str:
        return f"{self.prefix}{'s' if index is None else f'n{index}'}"

    def _make_network(self) -> None:
        srv = self._ns(None)
        self._add_namespace(srv)
        _ip("-n", srv, "link", "add", "br0", "type", "bridge")
        _ip("-n", srv, "addr", "add", f"{COORDINATOR_ADDRESS}/24", "dev", "br0")
        _ip("-n", srv, "link", "set", "br0", "up")
        for i, _ in enumerate(self.sites):
            ns, site_end, server_end = self._ns(i), f"{self.prefix}a{i}", f"{self.prefix}b{i}"
            self._add_namespace(ns)
            _ip("link", "add", site_end, "netns", ns, "type", "veth", "peer", "name", server_end, "netns", srv)
            _ip("-n", srv, "link", "set", server_end, "master", "br0")
            _ip("-n", srv, "link", "set", server_end, "up")
            _ip("-n", ns, "addr", "add", f"10.77.0.{10 + i}/24", "dev", site_end)
            _ip("-n", ns, "link", "set", site_end, "up")

    def _add_namespace(self, name: str) -> None:
        _ip("netns", "add", name)
        self.namespaces.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def _in(self, index: int | None, cmd: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self._ns(index), *cmd] if self.isolated else cmd

    def cut(self, site: str, down: bool = True) -> None:
        """Take the site's network link down (`down=False`: bring it back). Isolated testbeds only."""
        index = list(self.sites).index(site)
        _ip("-n", self._ns(None), "link", "set", f"{self.prefix}b{index}", "down" if down else "up")

    # -- the processes -------------------------------------------------------------------------------------
    def start_server(self) -> None:
        quiet = {} if self.show_server else {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        self.server = subprocess.Popen(
            self._in(
                None, [sys.executable, "-m", "echocare_server.cli", "--config", str(self.out / "federation.yaml")]
            ),
            start_new_session=True,
            **quiet,
        )

    def start_site(self, name: str) -> None:
        host = COORDINATOR_ADDRESS if self.isolated else "127.0.0.1"
        site = {
            "name": name,
            "server": f"{host}:{self.port}",
            "insecure": self.keys is None,
            "data": str(self.sites[name]),
            "device": "cpu",
            "state_dir": str(self.out / "site_state" / name),
        }
        if self.keys is not None:
            site.update(
                root_certificates=str(self.keys / "ca.pem"), private_key=str(self.keys / "sites" / f"{name}.key")
            )
        config = self.out / f"{name}.yaml"
        config.write_text(yaml.safe_dump(site, sort_keys=False))
        index = list(self.sites).index(name)
        self.clients[name] = subprocess.Popen(
            self._in(index, [sys.executable, "-m", "echocare_client.cli", "--config", str(config)]),
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def kill_site(self, name: str) -> None:
        """SIGKILL the site's echocare-client (and its worker); its SuperNode gets SIGTERM as its parent dies."""
        _kill(self.clients.pop(name))

    def kill_server(self) -> None:
        """SIGKILL echocare-server; its SuperLink and proxy get SIGTERM as their parent dies (the ServerApp
        goes with the SuperLink)."""
        _kill(self.server)
        self.server = None

    def wait_server(self, timeout: float | None = None) -> int:
        """The server's exit code once it ends (the run finished or failed)."""
        return self.server.wait(timeout)

    def events(self) -> list[dict]:
        """The server's progress events so far (a line cut short by a kill is skipped)."""
        path = self.output / "progress.jsonl"
        events = []
        for line in path.read_text().splitlines() if path.is_file() else []:
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return events

    def wait_for(self, event: str, timeout: float = 600.0, **fields: Any) -> dict:
        """Block until the server logs `event` (with these field values); returns it.

        Raises:
            TimeoutError: not within `timeout` seconds, or the server ended first.
        """
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for e in self.events():
                if e["event"] == event and all(e.get(k) == v for k, v in fields.items()):
                    return e
            if self.server is None or self.server.poll() is not None:
                break
            time.sleep(0.5)
        raise TimeoutError(f"no {event} {fields} from the server")

    def lost(self, rounds: int) -> list[str]:
        """What a finished run of `rounds` rounds lost (empty: nothing): rounds missing from metrics.jsonl or
        recorded twice, a last checkpoint that does not load as round `rounds`, audit lines that do not parse,
        and sites whose copy of what they sent in a round they took part in is missing."""
        from echocare_core.checkpoint import load_weights, read_meta
        from echocare_core.engine.run_report import read_metrics

        problems = []
        history = read_metrics(self.output / "metrics.jsonl")
        if [r["round"] for r in history] != list(range(1, rounds + 1)):
            problems.append(f"metrics.jsonl has rounds {[r['round'] for r in history]}")
        last = self.output / "checkpoints" / f"round_{rounds:04d}"
        try:
            load_weights(last)
            if read_meta(last)["round"] != rounds:
                problems.append(f"{last.name} is not round {rounds}")
        except (OSError, ValueError, KeyError) as exc:
            problems.append(f"{last.name} does not load ({type(exc).__name__})")
        for line in (self.output / "audit.jsonl").read_text().splitlines():
            try:
                json.loads(line)
            except json.JSONDecodeError:
                problems.append("an audit.jsonl line does not parse")
        for r in history:
            for site in r["sites"]:
                sent = self.out / "site_state" / site["site"] / "sent" / f"round_{r['round']:04d}.safetensors"
                if not sent.is_file():
                    problems.append(f"{site['site']} has no copy of what it sent in round {r['round']}")
        return problems

    def close(self) -> None:
        for proc in self.clients.values():
            stop(proc, grace=60.0)
        stop(self.server, grace=60.0)
        for name in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        self.namespaces = []

    def __enter__(self) -> Testbed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _kill(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def run_on_this_machine(
    out: Path,
    sites: dict[str, Path],
    federation: dict[str, Any],
    show_server: bool = True,
    keys: Path | None = None,
    allowed: list[str] | None = None,
) -> int:
    """A whole federation on 127.0.0.1 (see `Testbed`), run to its end; all stopped on return, also on Ctrl-C.

    Returns:
        The server's exit code.
    """
    with Testbed(out, sites, federation, keys, allowed, show_server=show_server) as bed:
        bed.start_server()
        for name in sites:
            bed.start_site(name)
        return bed.wait_server()
