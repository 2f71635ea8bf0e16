"""`echocare-keys`: a CA, a server certificate that also names 127.0.0.1 and localhost, OpenSSH EC site keys,
private files 0600, nothing overwritten."""

import ipaddress
import stat

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from echocare_core.cli.keys import main


def test_keys_for_a_federation(tmp_path, capsys):
    out = tmp_path / "keys"
    assert main(["--out", str(out), "--server-name", "fl.hospital-net.example", "--sites", "site_a", "site_b"]) == 0
    ca = x509.load_pem_x509_certificate((out / "ca.pem").read_bytes())
    server = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    alt = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(alt.get_values_for_type(x509.DNSName)) == {"fl.hospital-net.example", "localhost"}
    assert alt.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    for site in ("site_a", "site_b"):
        key = serialization.load_ssh_private_key((out / "sites" / f"{site}.key").read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
        assert (out / "sites" / f"{site}.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    for private in [out / "ca.key", out / "server.key", *out.glob("sites/*.key")]:
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
    before = (out / "ca.pem").read_bytes()
    capsys.readouterr()
    assert main(["--out", str(out), "--sites", "site_a", "site_c"]) == 0  # adds site_c, keeps the rest
    err = capsys.readouterr().err
    assert (out / "ca.pem").read_bytes() == before and "site_c.key" in err and "site_a" not in err
    assert main(["--out", str(out), "--sites", "../evil"]) == 2
