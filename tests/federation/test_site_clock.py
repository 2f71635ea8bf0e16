"""A site whose clock is more than Flower's 300 s off the coordinator's cannot sign its requests: echocare-client
says so before connecting, measured against the coordinator's HTTPS `/health` answer."""

import ssl
import threading
import time
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

from echocare_client.cli import check_clock, main
from echocare_client.config import SiteConfig
from echocare_core.cli.keys import make_keys
from echocare_core.synthetic.dataset import write_dataset


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clock") / "keys"
    make_keys(folder, ["localhost"], ["site_a"])
    return folder


@pytest.fixture
def coordinator(keys):
    """An HTTPS server with the federation's certificate whose clock is `server.skew` seconds off ours."""

    class Health(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            self.send_response_only(200)
            self.send_header("Date", formatdate(time.time() + server.skew, usegmt=True))
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Health)
    server.skew = 0.0
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(keys / "server.pem", keys / "server.key")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


def _site(keys, coordinator, data="unused"):
    return {
        "name": "site_a",
        "server": f"127.0.0.1:{coordinator.server_address[1]}",
        "data": str(data),
        "root_certificates": str(keys / "ca.pem"),
        "private_key": str(keys / "sites" / "site_a.key"),
    }


@pytest.mark.parametrize(
    "skew, says",
    [(0, ""), (200, ""), (600, "about 600 s behind"), (-20, " s ahead of"), (-900, "about 900 s ahead of")],
)
def test_the_clock_is_checked_against_the_coordinators(keys, coordinator, skew, says):
    coordinator.skew = skew
    reason = check_clock(SiteConfig(**_site(keys, coordinator)))
    assert (says in reason and "NTP" in reason) if says else reason == ""


def test_an_unreachable_coordinator_is_not_a_clock_problem(keys, coordinator):
    site = _site(keys, coordinator)
    coordinator.shutdown()
    coordinator.server_close()
    assert check_clock(SiteConfig(**site)) == ""  # the SuperNode retries; nothing to say about the clock


def test_echocare_client_refuses_to_connect_with_a_clock_ten_minutes_off(keys, coordinator, tmp_path, capsys):
    coordinator.skew = -600
    data = write_dataset(tmp_path / "seg", "segmentation", sites=1, per_site=4, size=32, seed=1)[0]
    config = tmp_path / "site.yaml"
    config.write_text(yaml.safe_dump({**_site(keys, coordinator, data), "state_dir": str(tmp_path / "state")}))
    assert main(["--config", str(config)]) == 1
    out = capsys.readouterr().err
    assert "about 600 s ahead of the coordinator's" in out and "timedatectl set-ntp true" in out
    assert not (tmp_path / "state" / "supernode.log").exists()  # no SuperNode was started
