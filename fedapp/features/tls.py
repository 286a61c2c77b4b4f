"""Offline credentials of a secure federation: `fedapp-certs DIR --host NAME... --nodes ID...`.

Writes, with the `cryptography` library (no network, no openssl binary needed), one folder
per party, so that each party is handed its folder and nothing else:

- `DIR/operator/` (mode 0700): `ca.key`, the federation's certificate authority (it can
  mint SuperLink certificates), and `app-signing`, the operator's Ed25519 key that signs the
  app (FAB) the SuperNodes will run. Both stay offline with the operator; no SuperLink,
  proxy or SuperNode ever reads this folder.
- `DIR/superlink/` (0700): `superlink.crt` and `superlink.key`, the TLS certificate of the
  SuperLink and of the reverse proxy in front of it, for the names and addresses SuperNodes
  connect to (`--host`, each a DNS name or an IP address; `localhost`, `127.0.0.1` and
  `::1` are always included: the proxy reaches the SuperLink on loopback).
- `DIR/nodes/<id>/` (0700), one per SuperNode: `supernode.key` (its ECDSA P-384 private
  key, OpenSSH format: Flower's SuperNode authentication), `supernode.pub` (which the
  operator registers with `flwr supernode register`), `ca.crt` and `trusted-entities.yaml`
  (the operator's app-signing public key, for `flower-supernode --trusted-entities`).
- `DIR/ca.crt`, `DIR/app-signing.pub`, `DIR/trusted-entities.yaml`: the public files.

Every private key is created with mode 0600 from the start (a new file opened with
`O_EXCL` and mode 0600, then renamed over any old one: never a moment with wider rights);
private folders have mode 0700. An institution with its own PKI can bring its own files
under the same names; one that wants to make its own SuperNode key sends only
`supernode.pub`.

These are what Flower 1.41 needs for TLS (`--ssl-ca-certfile/--ssl-certfile/--ssl-keyfile`
on the SuperLink, `--root-certificates` on SuperNodes), SuperNode authentication
(`--enable-supernode-auth`, `--auth-supernode-private-key`) and app verification
(`--trusted-entities`; signing: `fedapp-certs sign-app`, `fedapp.features.appsign`). The nginx
reverse proxy that exposes only the Fleet API is written by `fedapp-certs proxy`. See
the multi-host runbook (docs/how-to/deploy.md).

    fedapp-certs DIR [--host NAME ...] [--nodes ID ...] [--days N]
    fedapp-certs proxy DIR --listen ADDRESS:PORT --superlink 127.0.0.1:PORT --out FOLDER
    fedapp-certs sign-app DIR APP_DIR --out FOLDER
    fedapp-certs serve-apps FOLDER --port PORT
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import ipaddress
import json
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedapp.core.files import PRIVATE, PUBLIC, write_atomic

LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")
NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
# What a SuperNode's folder holds: nothing of the operator's.
NODE_FILES = ("supernode.key", "supernode.pub", "ca.crt", "trusted-entities.yaml")


@dataclass(frozen=True)
class Credentials:
    """Paths of a federation's TLS, SuperNode-authentication and app-signing files."""

    root: Path

    # the operator's, offline
    @property
    def operator_dir(self) -> Path:
        return self.root / "operator"

    @property
    def ca_key(self) -> Path:
        return self.operator_dir / "ca.key"

    @property
    def signing_key(self) -> Path:
        return self.operator_dir / "app-signing"

    # public
    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.crt"

    @property
    def signing_public_key(self) -> Path:
        return self.root / "app-signing.pub"

    @property
    def trusted_entities(self) -> Path:
        return self.root / "trusted-entities.yaml"

    # the SuperLink host's (SuperLink and reverse proxy)
    @property
    def superlink_dir(self) -> Path:
        return self.root / "superlink"

    @property
    def superlink_cert(self) -> Path:
        return self.superlink_dir / "superlink.crt"

    @property
    def superlink_key(self) -> Path:
        return self.superlink_dir / "superlink.key"

    # one folder per SuperNode: what that institution is given
    def node_dir(self, node: str) -> Path:
        return self.root / "nodes" / node

    def node_key(self, node: str) -> Path:
        return self.node_dir(node) / "supernode.key"

    def node_public_key(self, node: str) -> Path:
        return self.node_dir(node) / "supernode.pub"

    def node_ca_cert(self, node: str) -> Path:
        return self.node_dir(node) / "ca.crt"

    def node_trusted_entities(self, node: str) -> Path:
        return self.node_dir(node) / "trusted-entities.yaml"

    def private_files(self, nodes: Sequence[str] = ()) -> list[Path]:
        return [
            self.ca_key,
            self.signing_key,
            self.superlink_key,
            *(self.node_key(n) for n in nodes),
        ]

    def check(self, nodes: Sequence[str] = (), signing: bool = True) -> None:
        """Every file a federation needs is there (a clear error naming the missing ones).
        `signing=False`: the operator's signing key may be elsewhere (offline)."""
        need = [self.ca_cert, self.superlink_cert, self.superlink_key, self.trusted_entities]
        if signing:
            need.append(self.signing_key)
        need += [
            p
            for n in nodes
            for p in (
                self.node_key(n),
                self.node_public_key(n),
                self.node_ca_cert(n),
                self.node_trusted_entities(n),
            )
        ]
        missing = [str(p) for p in need if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"missing credentials: {', '.join(missing)}; create them with "
                f"`fedapp-certs {self.root} --nodes ...`"
            )


def _private_dir(path: Path) -> None:
    """A folder only its owner can enter (made so, or tightened if it exists)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def write_file(path: Path, data: bytes, private: bool) -> None:
    """Write `path` atomically with its final mode from the start, 0600 for a private key
    (fedapp.core.files.write_atomic), synced to disk."""
    write_atomic(path, data, PRIVATE if private else PUBLIC, durable=True)


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
    _private_dir(creds.operator_dir)
    write_file(creds.ca_key, _pem_key(key), private=True)
    write_file(creds.ca_cert, cert.public_bytes(serialization.Encoding.PEM), private=False)


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
    _private_dir(creds.superlink_dir)
    write_file(creds.superlink_key, _pem_key(key), private=True)
    write_file(creds.superlink_cert, cert.public_bytes(serialization.Encoding.PEM), private=False)


def signing_key_id(public_key: ed25519.Ed25519PublicKey) -> str:
    """The id a signature and `--trusted-entities` name this key by (its fingerprint)."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "fpk_fedapp_" + hashlib.sha256(raw).hexdigest()[:16]


def trusted_entities_yaml(public_key: ed25519.Ed25519PublicKey) -> bytes:
    """`flower-supernode --trusted-entities` YAML: {key id: 'ssh-ed25519 ...'} (a JSON string
    is a YAML double-quoted scalar)."""
    line = public_key.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).decode()
    return f"{signing_key_id(public_key)}: {json.dumps(line + ' fedapp-operator')}\n".encode()


def create_signing_key(creds: Credentials) -> None:
    """The operator's Ed25519 app-signing key (OpenSSH format, what Flower loads)."""
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    _private_dir(creds.operator_dir)
    write_file(creds.signing_key, private, private=True)
    write_file(creds.signing_public_key, public + b" fedapp-operator\n", private=False)
    write_file(creds.trusted_entities, trusted_entities_yaml(key.public_key()), private=False)


def create_node_key(creds: Credentials, node: str) -> None:
    """An ECDSA P-384 key pair in OpenSSH format (what `flower-supernode` and
    `flwr supernode register` read), in the node's own folder."""
    write_node_key(creds.node_dir(node), node)


def write_node_key(folder: Path | str, node: str) -> Path:
    """`folder/supernode.key` (0600, in a 0700 folder) and `folder/supernode.pub`: a node's
    key pair, made by the institution itself (`fedapp-certs node-key`) so that its private
    key never exists anywhere else; it gives the operator the `.pub` only. Refuses to
    overwrite a key. Returns the public key's path."""
    folder = Path(folder)
    if (folder / "supernode.key").exists():
        raise FileExistsError(f"{folder / 'supernode.key'} exists; not overwritten")
    if not NODE_ID.fullmatch(node or ""):
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
    _private_dir(folder)
    write_file(folder / "supernode.key", private, private=True)
    write_file(folder / "supernode.pub", public + f" {node}\n".encode(), private=False)
    return folder / "supernode.pub"


def _copy_public(creds: Credentials, node: str) -> None:
    """The public files a SuperNode reads, copied into its folder (so that the folder is
    all an institution is given)."""
    _private_dir(creds.node_dir(node))
    write_file(creds.node_ca_cert(node), creds.ca_cert.read_bytes(), private=False)
    write_file(
        creds.node_trusted_entities(node), creds.trusted_entities.read_bytes(), private=False
    )


def create_credentials(
    root: Path | str, hosts: Sequence[str] = (), nodes: Sequence[str] = (), days: int = 365
) -> Credentials:
    """The CA and the signing key (kept if `root` has them), a SuperLink certificate for
    `hosts`, and key pairs for `nodes` (existing node keys are kept: they may be registered
    already)."""
    creds = Credentials(Path(root))
    for node in nodes:  # before anything is written
        if not NODE_ID.fullmatch(node or ""):
            raise ValueError(f"node id {node!r}: use letters, digits, '-' or '_'")
    Path(root).mkdir(parents=True, exist_ok=True)
    if not creds.ca_cert.is_file():
        create_ca(creds, days)
    elif not creds.ca_key.is_file():
        raise FileNotFoundError(f"{creds.ca_cert} exists without its key {creds.ca_key}")
    if not creds.trusted_entities.is_file():
        create_signing_key(creds)
    create_superlink_cert(creds, list(hosts), days)
    for node in nodes:
        if not creds.node_key(node).is_file():
            create_node_key(creds, node)
        _copy_public(creds, node)
    return creds


# -- the reverse proxy ---------------------------------------------------------------------

FLEET_PREFIX = "/v1/fleet/"


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not host:
        raise ValueError(f"{text!r}: expected HOST:PORT (an IPv6 address in brackets)")
    return host, int(port)


def _quote(path: Path | str) -> str:
    return json.dumps(str(path))  # nginx reads "..." with backslash escapes


def proxy_config(
    creds: Credentials, listen: str, superlink: str, folder: Path | str, user: str | None = None
) -> str:
    """An nginx configuration (a whole `nginx.conf`) for the one port SuperNodes reach:
    TLS with the SuperLink's certificate on `listen`, forwarding POST requests under
    `/v1/fleet/` (the Fleet API, protobuf over HTTP/1.1) to the SuperLink at `superlink`
    (on loopback, over TLS checked against the federation's CA) and answering 404 to
    everything else: the Control API (`/v1/control/`), the Runtime API (`/v1/runtime/`),
    `/health` and the API docs. The path sent upstream is nginx's normalised one (the
    matched prefix replaced by itself), so no `..` or percent-encoded form of a path
    reaches the SuperLink outside `/v1/fleet/`. Logs, the pid file and temporary files go
    under `folder`. Run it with `nginx -p FOLDER -e FOLDER/error.log -c FOLDER/nginx.conf`."""
    _address(listen)
    _address(superlink)
    folder = Path(folder).resolve()
    user_line = f"user {user};\n" if user else ""
    return f"""# fedapp-certs proxy: only the Flower Fleet API ({FLEET_PREFIX}) of the SuperLink at
# {superlink} is reachable on {listen}; everything else answers 404.
{user_line}worker_processes 1;
pid {_quote(folder / "nginx.pid")};
error_log {_quote(folder / "error.log")} notice;

events {{
    worker_connections 1024;
}}

http {{
    access_log {_quote(folder / "access.log")};
    client_body_temp_path {_quote(folder / "client_body")};
    proxy_temp_path {_quote(folder / "proxy")};
    fastcgi_temp_path {_quote(folder / "fastcgi")};
    uwsgi_temp_path {_quote(folder / "uwsgi")};
    scgi_temp_path {_quote(folder / "scgi")};
    server_tokens off;

    upstream flower_superlink {{
        server {superlink};
        keepalive 16;
    }}

    server {{
        listen {listen} ssl;
        server_name _;
        ssl_certificate {_quote(creds.superlink_cert)};
        ssl_certificate_key {_quote(creds.superlink_key)};
        ssl_protocols TLSv1.2 TLSv1.3;

        # models travel in these requests: no size limit, streamed both ways
        client_max_body_size 0;
        proxy_request_buffering off;
        proxy_buffering off;

        location {FLEET_PREFIX} {{
            limit_except POST {{
                deny all;
            }}
            proxy_pass https://flower_superlink{FLEET_PREFIX};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host localhost;
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate {_quote(creds.ca_cert)};
            proxy_ssl_name localhost;
            proxy_ssl_server_name on;
            proxy_ssl_session_reuse on;
            proxy_connect_timeout 10s;
            proxy_send_timeout 600s;
            proxy_read_timeout 600s;
        }}

        location / {{
            return 404;
        }}
    }}
}}
"""


def write_proxy_config(
    creds: Credentials, listen: str, superlink: str, folder: Path | str, user: str | None = None
) -> Path:
    """Write `folder/nginx.conf` (the folder, which will hold nginx's logs, is made 0700)."""
    folder = Path(folder)
    _private_dir(folder)
    path = folder / "nginx.conf"
    write_file(path, proxy_config(creds, listen, superlink, folder, user).encode(), private=False)
    return path


# -- command line ----------------------------------------------------------------------------


def _main_create(argv: Sequence[str] | None) -> int:
    parser = argparse.ArgumentParser(
        prog="fedapp-certs",
        description="Offline credentials of a secure federation (see also `fedapp-certs "
        "proxy|sign-app|serve-apps --help`).",
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
    print(f"[fedapp-certs] operator, offline: {creds.ca_key}, {creds.signing_key}")
    print(f"[fedapp-certs] SuperLink host: {creds.superlink_dir}/ (SuperLink and proxy)")
    print(f"[fedapp-certs] public: {creds.ca_cert}, {creds.trusted_entities}")
    for node in args.nodes:
        print(
            f"[fedapp-certs] SuperNode {node}: {creds.node_dir(node)}/ (to that institution "
            f"only; register {creds.node_public_key(node)})"
        )
    return 0


def _main_proxy(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="fedapp-certs proxy",
        description="Write an nginx config that exposes only the SuperLink's Fleet API.",
    )
    parser.add_argument("dir", type=Path, help="the credentials folder (fedapp-certs DIR)")
    parser.add_argument("--listen", required=True, help="public HOST:PORT the proxy serves")
    parser.add_argument(
        "--superlink", required=True, help="the SuperLink's HOST:PORT (loopback: 127.0.0.1:PORT)"
    )
    parser.add_argument("--out", required=True, type=Path, help="folder for nginx.conf and logs")
    parser.add_argument("--user", default=None, help="nginx `user` directive (nginx as root)")
    args = parser.parse_args(argv)
    creds = Credentials(args.dir)
    try:
        for p in (creds.ca_cert, creds.superlink_cert, creds.superlink_key):
            if not p.is_file():
                raise FileNotFoundError(f"missing {p}")
        path = write_proxy_config(creds, args.listen, args.superlink, args.out, args.user)
    except (OSError, ValueError) as err:
        print(f"fedapp-certs proxy: {err}", file=sys.stderr)
        return 2
    print(f"[fedapp-certs] nginx config: {path}")
    print(
        f"[fedapp-certs] run: nginx -p {args.out} -e {args.out}/error.log -c {path} "
        "-g 'daemon off;'"
    )
    return 0


def _main_node_key(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="fedapp-certs node-key",
        description="An institution's own SuperNode key pair (run on the institution's "
        "machine; give the operator the .pub only, to register and list in node_keys).",
    )
    parser.add_argument("dir", type=Path, help="the institution's credentials folder")
    parser.add_argument("--name", required=True, help="the node's id (letters, digits, -, _)")
    args = parser.parse_args(argv)
    try:
        public = write_node_key(args.dir, args.name)
    except (OSError, ValueError) as err:
        print(f"fedapp-certs node-key: {err}", file=sys.stderr)
        return 2
    print(f"[fedapp-certs] private key (stays here): {args.dir / 'supernode.key'}")
    print(f"[fedapp-certs] give the operator: {public}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "proxy":
        return _main_proxy(argv[1:])
    if argv and argv[0] == "node-key":
        return _main_node_key(argv[1:])
    if argv and argv[0] in ("sign-app", "serve-apps"):  # fedapp.cli.certs dispatches these
        print(f"fedapp-certs {argv[0]}: run it as `fedapp-certs {argv[0]} ...`", file=sys.stderr)
        return 2
    return _main_create(argv)


if __name__ == "__main__":
    sys.exit(main())
