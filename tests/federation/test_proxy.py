"""The coordinator publishes only Flower's Fleet API: the real SuperLink on 127.0.0.1 behind the TLS proxy
that echocare-server starts; the Control and Runtime APIs answer only on the private loopback port."""

import http.client
import json
import ssl

import httpx
import pytest

from echocare_core.cli.keys import make_keys
from echocare_core.config import from_dict
from echocare_core.federation.runtime.processes import FlowerError, free_port, run_flwr, stop
from echocare_server.cli import CONNECTION, prepare, start_coordinator
from echocare_server.config import FederationConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("proxy")
    make_keys(tmp / "keys", ["localhost"], ["site_a"])
    cfg = from_dict(
        FederationConfig,
        {
            "output": str(tmp / "run"),
            "server": {
                "host": "127.0.0.1",
                "port": free_port(),
                "keys": str(tmp / "keys"),
                "allowed_sites": ["site_a"],
            },
        },
        "federation",
    )
    out, private = tmp / "run", free_port()
    prepare(cfg, out, private)
    procs = start_coordinator(cfg, out, private)
    yield cfg, out, private, tmp / "keys" / "ca.pem"
    for proc in reversed(procs):
        stop(proc)


def test_the_public_port_serves_health_and_the_fleet_api_only(coordinator):
    cfg, _, private, ca = coordinator
    public = httpx.Client(base_url=f"https://127.0.0.1:{cfg.server.port}", verify=str(ca))
    assert public.get("/health").status_code == 200
    fleet = public.post("/v1/fleet/activate-node", content=b"\x00not a protobuf")  # reaches Flower, which says no
    assert fleet.status_code not in (403, 404) and "Fleet API" not in fleet.text
    for path in ("/v1/control/list-runs", "/v1/control/start-run", "/v1/runtime/get-nodes", "/docs", "/"):
        refused = public.post(path, content=b"{}")
        assert refused.status_code == 403 and "serves only the Fleet API" in refused.text, path
    for path in (
        "/v1/fleet/%2e%2e/control/list-runs",
        "/v1/fleet/../control/list-runs",
        "/v1/fleet/..%2fcontrol/list-runs",
        "/v1/fleet//x",
        "/v1/fleet/",
        "/health/../v1/control/start-run",
    ):
        conn = http.client.HTTPSConnection(
            "127.0.0.1",
            cfg.server.port,  # sends the path as is (curl
            context=ssl.create_default_context(cafile=str(ca)),
        )  # --path-as-is)
        conn.request("POST", path, body=b"{}")
        refused = conn.getresponse()
        assert refused.status == 403 and "serves only the Fleet API" in refused.read().decode(), path
        conn.close()
    private_client = httpx.Client(base_url=f"https://127.0.0.1:{private}", verify=str(ca))
    assert private_client.post("/v1/control/list-runs", content=b"{}").status_code != 403  # Flower's own answer


def test_flwr_commands_work_on_the_private_port_and_are_refused_on_the_public_one(coordinator, tmp_path):
    cfg, out, _, ca = coordinator
    assert [n["status"] for n in run_flwr(["supernode", "ls", CONNECTION], out / "flwr")["nodes"]] == ["registered"]
    (tmp_path / "config.toml").write_text(
        f'[superlink]\ndefault = "public"\n\n[superlink.public]\naddress = '
        f'"127.0.0.1:{cfg.server.port}"\nroot-certificates = "{ca}"\n'
    )
    with pytest.raises(FlowerError, match="403 Forbidden"):  # an outsider cannot list, run or register
        run_flwr(["ls", "public"], tmp_path)


def test_the_allow_list_follows_federation_yaml_across_restarts(tmp_path):
    make_keys(tmp_path / "keys", ["localhost"], ["site_a", "site_b"])

    def start(allowed):
        cfg = from_dict(
            FederationConfig,
            {
                "output": str(tmp_path / "run"),
                "server": {
                    "host": "127.0.0.1",
                    "port": free_port(),
                    "keys": str(tmp_path / "keys"),
                    "allowed_sites": allowed,
                },
            },
            "federation",
        )
        private = free_port()
        prepare(cfg, tmp_path / "run", private)
        procs = start_coordinator(cfg, tmp_path / "run", private)
        try:
            return {
                n["node-id"]: n["status"]
                for n in run_flwr(["supernode", "ls", CONNECTION], tmp_path / "run" / "flwr")["nodes"]
            }
        finally:
            for proc in reversed(procs):
                stop(proc)

    both = start(["site_a", "site_b"])
    assert sorted(both.values()) == ["registered", "registered"]
    assert start(["site_a", "site_b"]) == both  # a restart registers nobody twice
    known = json.loads((tmp_path / "run" / "sites.json").read_text())
    after = start(["site_a"])  # site_b taken off the list: its key no longer gets in
    assert after == {str(known["site_a"]["node"]): "registered", str(known["site_b"]["node"]): "unregistered"}
    assert list(json.loads((tmp_path / "run" / "sites.json").read_text())) == ["site_a"]
    with pytest.raises(FlowerError, match=r"site site_b: .*\(Flower never takes a removed key back\)"):
        start(["site_a", "site_b"])  # the removed key cannot come back: the coordinator says so and stops
