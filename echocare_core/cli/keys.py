"""`echocare-keys`: what a federation needs to authenticate its parts, made once by the coordinator.

- `ca.pem` / `ca.key`: the federation's certificate authority (the key stays with the coordinator);
- `server.pem` / `server.key`: the coordinator's TLS certificate, naming its host and also 127.0.0.1 and
  localhost (Flower's SuperLink connects to itself over loopback and refuses a certificate without them);
- `sites/NAME.key` / `sites/NAME.pub`: one key pair per hospital (OpenSSH EC P-384, as Flower's node
  authentication expects); the coordinator lists the public key, the hospital keeps the private one.

Private keys are written with mode 0600 (to a temporary file, then renamed); existing files are never
overwritten, so running it again adds only what is missing (e.g. a new site).
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import re
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from echocare_core.cli.common import command_parser, console, fail
from echocare_core.files import write_atomic

PROG = "echocare-keys"
SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def _write(path: Path, data: bytes, private: bool) -> None:
    write_atomic(path, data, mode=0o600 if private else 0o644)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    days: int,
    names: list[str] = (),
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    issuer_name, issuer_key = issuer or (name, key)
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
    )
    if issuer is None:  # the CA
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
    else:
        alt = []
        for n in names:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                alt.append(x509.DNSName(n))
        builder = (
            builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        )
    return builder.sign(issuer_key, hashes.SHA256())


def make_keys(out: Path, server_names: list[str], sites: list[str], days: int = 825) -> list[Path]:
    """Create whatever of the CA, the server certificate and the site key pairs is missing under `out`.

    Returns:
        The files written.

    Raises:
        ValueError: a site name that is not a plain name (letters, digits, `_.-`).
    """
    bad = [s for s in sites if not SITE_NAME.match(s)]
    if bad:
        raise ValueError(f"site names {bad}: use letters, digits, '_', '.' or '-' (up to 63 characters)")
    (out / "sites").mkdir(parents=True, exist_ok=True)
    written = []
    if not (out / "ca.key").exists():
        ca_key = ec.generate_private_key(ec.SECP384R1())
        _write(out / "ca.key", _pem_key(ca_key), private=True)
        _write(
            out / "ca.pem",
            _certificate("EchoCare FL federation CA", ca_key, None, days).public_bytes(serialization.Encoding.PEM),
            private=False,
        )
        written += [out / "ca.key", out / "ca.pem"]
    ca_key = serialization.load_pem_private_key((out / "ca.key").read_bytes(), password=None)
    ca_name = x509.load_pem_x509_certificate((out / "ca.pem").read_bytes()).subject
    if not (out / "server.key").exists():
        key = ec.generate_private_key(ec.SECP384R1())
        names = list(dict.fromkeys([*server_names, "localhost", "127.0.0.1"]))
        cert = _certificate(names[0], key, (ca_name, ca_key), days, names)
        _write(out / "server.key", _pem_key(key), private=True)
        _write(out / "server.pem", cert.public_bytes(serialization.Encoding.PEM), private=False)
        written += [out / "server.key", out / "server.pem"]
    for site in sites:
        private, public = out / "sites" / f"{site}.key", out / "sites" / f"{site}.pub"
        if private.exists():
            continue
        key = ec.generate_private_key(ec.SECP384R1())
        _write(
            private,
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
            ),
            private=True,
        )
        _write(
            public,
            key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n",
            private=False,
        )
        written += [private, public]
    return written


def main(argv: list[str] | None = None) -> int:
    parser = command_parser(
        PROG,
        "Create the federation's CA, the coordinator's TLS certificate and one key pair "
        "per hospital; files that exist are kept.",
    )
    parser.add_argument("--out", type=Path, default=Path("echocare_keys"), help="folder for the keys")
    parser.add_argument(
        "--server-name",
        action="append",
        default=[],
        metavar="HOST",
        help="host name or IP address the hospitals use to reach the coordinator (repeatable); "
        "localhost and 127.0.0.1 are always added",
    )
    parser.add_argument("--sites", nargs="*", default=[], metavar="NAME", help="a key pair for each site")
    parser.add_argument("--days", type=int, default=825, help="validity of the certificates")
    args: argparse.Namespace = parser.parse_args(argv)
    if args.days < 1:
        return fail(PROG, f"--days {args.days}: must be >= 1")
    try:
        written = make_keys(args.out, args.server_name or ["localhost"], args.sites, args.days)
    except ValueError as exc:
        return fail(PROG, str(exc))
    for path in written:
        console.print(f"wrote {path}{' (private: keep it here, mode 0600)' if path.suffix == '.key' else ''}")
    if not written:
        console.print(f"nothing to add under {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
