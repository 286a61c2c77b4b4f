"""Offline credentials of a secure federation: `fedapp-certs DIR --host NAME... --nodes ID...`.

Writes, with the `cryptography` library (no network, no openssl binary needed):

- `DIR/ca.crt` and `DIR/ca.key`: a certificate authority of this federation. `ca.crt` goes to
  every SuperNode and to whoever runs `flwr` commands; `ca.key` stays offline with the
  operator (it can mint SuperLink certificates).
- `DIR/superlink.crt`, `DIR/superlink.key`: the SuperLink's TLS certificate, for the names
  and addresses SuperNodes connect to (`--host`, each a DNS name or an IP address;
  `localhost`, `127.0.0.1` and `::1` are always included for checks on the SuperLink's host).
- `DIR/nodes/<id>` and `DIR/nodes/<id>.pub`: one ECDSA P-384 key pair per SuperNode in
  OpenSSH format (Flower's SuperNode authentication). The private key goes to that
  institution only; the operator registers the public key with `flwr supernode register`.

These are what Flower 1.41 needs for TLS (`--ssl-ca-certfile/--ssl-certfile/--ssl-keyfile`
on the SuperLink, `--root-certificates` on SuperNodes) and SuperNode authentication
(`--enable-supernode-auth`, `--auth-supernode-private-key`); see the README's multi-host
runbook. An institution with its own PKI can bring its own files under the same names.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class Credentials:
    """Paths of a federation's TLS and SuperNode-authentication files."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def superlink_cert(self) -> Path:
        return self.root / "superlink.crt"

    @property
    def superlink_key(self) -> Path:
        return self.root / "superlink.key"

    def node_key(self, node: str) -> Path:
        return self.root / "nodes" / node

    def node_public_key(self, node: str) -> Path:
        return self.root / "nodes" / f"{node}.pub"

    def check(self, nodes: Sequence[str] = ()) -> None:
        """Every file a federation needs is there (a clear error naming the missing ones)."""
        need = [self.ca_cert, self.superlink_cert, self.superlink_key]
        need += [p for n in nodes for p in (self.node_key(n), self.node_public_key(n))]
        missing = [str(p) for p in need if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"missing credentials: {', '.join(missing)}; create them with "
                f"`fedapp-certs {self.root} --nodes ...`"
            )


def _write(path: Path, data: bytes, private: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _san(names: Sequence[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in dict.fromkeys([*names, *LOCAL_NAMES]):  # ordered, without duplicates
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedapp federation"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def create_ca(creds: Credentials, days: int) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("fedapp federation CA"))
        .issuer_name(_name("fedapp federation CA"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    _write(creds.ca_key, _pem_key(key), private=True)
    _write(creds.ca_cert, cert.public_bytes(serialization.Encoding.PEM), private=False)


def create_superlink_cert(creds: Credentials, hosts: Sequence[str], days: int) -> None:
    """A server certificate signed by the federation's CA, valid for `hosts`."""
    ca_key = serialization.load_pem_private_key(creds.ca_key.read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(creds.ca_cert.read_bytes())
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0] if hosts else "localhost"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    _write(creds.superlink_key, _pem_key(key), private=True)
    _write(creds.superlink_cert, cert.public_bytes(serialization.Encoding.PEM), private=False)


def create_node_key(creds: Credentials, node: str) -> None:
    """An ECDSA P-384 key pair in OpenSSH format (what `flower-supernode` and
    `flwr supernode register` read)."""
    if not node or "/" in node or node.startswith("."):
        raise ValueError(f"node id {node!r}: use letters, digits, '-' or '_'")
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    _write(creds.node_key(node), private, private=True)
    _write(creds.node_public_key(node), public + f" {node}\n".encode(), private=False)


def create_credentials(
    root: Path | str, hosts: Sequence[str] = (), nodes: Sequence[str] = (), days: int = 365
) -> Credentials:
    """The CA (kept if `root` has one), a SuperLink certificate for `hosts`, and key pairs
    for `nodes` (existing node keys are kept: they may be registered already)."""
    creds = Credentials(Path(root))
    if not creds.ca_cert.is_file():
        create_ca(creds, days)
    elif not creds.ca_key.is_file():
        raise FileNotFoundError(f"{creds.ca_cert} exists without its key {creds.ca_key}")
    create_superlink_cert(creds, list(hosts), days)
    for node in nodes:
        if not creds.node_key(node).is_file():
            create_node_key(creds, node)
    return creds


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fedapp-certs", description=__doc__.split("\n\n")[0].split(": ", 1)[1]
    )
    parser.add_argument("dir", type=Path, help="folder for the credentials")
    parser.add_argument(
        "--host",
        action="append",
        default=[],
        help="a DNS name or IP address SuperNodes use to reach the SuperLink (repeatable)",
    )
    parser.add_argument("--nodes", nargs="*", default=[], help="SuperNode ids to make keys for")
    parser.add_argument("--days", type=int, default=365, help="certificate validity")
    args = parser.parse_args(argv)
    try:
        creds = create_credentials(args.dir, args.host, args.nodes, args.days)
    except (OSError, ValueError) as err:
        print(f"fedapp-certs: {err}", file=sys.stderr)
        return 2
    print(f"[fedapp-certs] CA: {creds.ca_cert} (its key {creds.ca_key}: keep offline)")
    print(f"[fedapp-certs] SuperLink: {creds.superlink_cert}, {creds.superlink_key}")
    for node in args.nodes:
        print(
            f"[fedapp-certs] SuperNode {node}: {creds.node_key(node)} (to that node only), "
            f"{creds.node_public_key(node)} (register it)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
