"""The federation's credentials (fedapp.features.tls), the nginx proxy config and app signing
(fedapp.features.appsign), without starting Flower: the chain verifies, the SANs are the hosts asked
for, private keys are 0600 from their creation, each key lands in its party's folder (the
CA key in none a SuperLink, proxy or SuperNode reads), and Flower's own checks accept the
signed app and nothing else."""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import ssl
import stat
import subprocess
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID

from fedapp.cli import certs
from fedapp.core.flower_compat import (
    build_fab_from_files,
    load_supernode_auth_keys,
    load_trusted_entities,
    request_download_link,
    validate_trusted_entities_ed25519,
)
from fedapp.features import appsign, tls
from fedapp.features.tls import Credentials, create_credentials
from tests.conftest import TINY_APP

HOSTS = ["fl.consortium.example", "10.20.30.40"]
NODES = ["bank-a", "bank-b"]


@pytest.fixture
def creds(tmp_path) -> Credentials:
    return create_credentials(tmp_path / "creds", hosts=HOSTS, nodes=NODES)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _verifier(ca: Path, name: x509.GeneralName):
    store = verification.Store([_cert(ca)])
    subject = name
    if isinstance(name, x509.DNSName):
        subject = verification.DNSName(name.value)
    elif isinstance(name, x509.IPAddress):
        subject = verification.IPAddress(name.value)
    return verification.PolicyBuilder().store(store).build_server_verifier(subject)


def test_the_superlink_certificate_is_signed_by_the_ca_for_the_hosts_asked(creds):
    ca, cert = _cert(creds.ca_cert), _cert(creds.superlink_cert)
    cert.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["fl.consortium.example", "localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == [
        "10.20.30.40",
        "127.0.0.1",
        "::1",
    ]
    # the chain verifies for every asked name (what a SuperNode checks), not for others
    for name in [
        x509.DNSName("fl.consortium.example"),
        x509.IPAddress(ipaddress.ip_address("10.20.30.40")),
        x509.DNSName("localhost"),  # what the proxy checks on loopback
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ]:
        chain = _verifier(creds.ca_cert, name).verify(cert, [])
        assert chain[-1] == ca
    with pytest.raises(verification.VerificationError):
        _verifier(creds.ca_cert, x509.DNSName("evil.example")).verify(cert, [])
    other = create_credentials(creds.root.parent / "other")
    with pytest.raises(verification.VerificationError):
        _verifier(other.ca_cert, x509.DNSName("fl.consortium.example")).verify(cert, [])


def test_a_tls_handshake_with_the_node_folder_ca_succeeds_and_another_ca_fails(creds):
    """An in-process TLS server with the SuperLink's certificate and key; a client with the
    CA certificate of a SuperNode's folder connects under the asked name."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(creds.superlink_cert, creds.superlink_key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve(n: int) -> None:
        for _ in range(n):
            conn, _ = listener.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as tls_conn:
                    tls_conn.recv(1)
            except (ssl.SSLError, OSError):
                pass

    thread = threading.Thread(target=serve, args=(2,), daemon=True)
    thread.start()
    try:
        good = ssl.create_default_context(cafile=str(creds.node_ca_cert("bank-a")))
        with (
            socket.create_connection(("127.0.0.1", port)) as raw,
            good.wrap_socket(raw, server_hostname="fl.consortium.example") as c,
        ):
            assert c.version() in ("TLSv1.2", "TLSv1.3")
            c.sendall(b"x")
        other = create_credentials(creds.root.parent / "other")
        bad = ssl.create_default_context(cafile=str(other.ca_cert))
        with (
            socket.create_connection(("127.0.0.1", port)) as raw,
            pytest.raises(ssl.SSLCertVerificationError),
        ):
            bad.wrap_socket(raw, server_hostname="fl.consortium.example")
    finally:
        thread.join(timeout=10)
        listener.close()


def _tree(root: Path) -> dict[str, int]:
    return {
        str(p.relative_to(root)) + ("/" if p.is_dir() else ""): stat.S_IMODE(p.stat().st_mode)
        for p in sorted(root.rglob("*"))
    }


def test_each_key_lands_in_its_partys_folder(creds):
    """operator/ (offline): the CA key and the signing key; superlink/: the SuperLink's (and
    proxy's) key pair; nodes/<id>/: that institution's key pair and the public files it
    reads; nothing else anywhere. Private keys 0600, private folders 0700."""
    node_files = {
        **{f"nodes/{n}/": 0o700 for n in NODES},
        **{f"nodes/{n}/supernode.key": 0o600 for n in NODES},
        **{f"nodes/{n}/{f}": 0o644 for n in NODES for f in tls.NODE_FILES[1:]},
    }
    assert _tree(creds.root) == {
        "app-signing.pub": 0o644,
        "ca.crt": 0o644,
        "trusted-entities.yaml": 0o644,
        "nodes/": 0o755 & ~_umask(),
        "operator/": 0o700,
        "operator/ca.key": 0o600,
        "operator/app-signing": 0o600,
        "superlink/": 0o700,
        "superlink/superlink.crt": 0o644,
        "superlink/superlink.key": 0o600,
        **node_files,
    }
    assert creds.ca_key.parent == creds.signing_key.parent == creds.operator_dir
    # The CA key and the signing key are in no folder a SuperLink, proxy or SuperNode reads.
    operator_secrets = [creds.ca_key.read_bytes(), creds.signing_key.read_bytes()]
    for folder in [creds.superlink_dir, *(creds.node_dir(n) for n in NODES)]:
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            ["superlink.crt", "superlink.key"] if folder == creds.superlink_dir else tls.NODE_FILES
        )
        for path in folder.rglob("*"):
            assert all(secret not in path.read_bytes() for secret in operator_secrets), path
    # the only private keys outside operator/ are the SuperLink's and each node's own
    holders = sorted(
        str(p.relative_to(creds.root))
        for p in creds.root.rglob("*")
        if p.is_file() and b"PRIVATE KEY" in p.read_bytes()
    )
    assert holders == sorted(
        [
            "operator/ca.key",
            "operator/app-signing",
            "superlink/superlink.key",
            *(f"nodes/{n}/supernode.key" for n in NODES),
        ]
    )
    # a node's folder holds its own key pair and the federation's public files
    for n in NODES:
        key = serialization.load_ssh_private_key(creds.node_key(n).read_bytes(), None)
        public = key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        assert creds.node_public_key(n).read_bytes().startswith(public)
        assert creds.node_ca_cert(n).read_bytes() == creds.ca_cert.read_bytes()
        assert creds.node_trusted_entities(n).read_bytes() == creds.trusted_entities.read_bytes()
    assert creds.node_key("bank-a").read_bytes() != creds.node_key("bank-b").read_bytes()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_private_keys_are_created_0600_never_wider(tmp_path, monkeypatch):
    """Every private key is a new file (O_EXCL) opened with mode 0600 and renamed into
    place, even under umask 0 and over an old world-readable file: no moment with wider
    rights, and an old file's mode is not kept."""
    opened: list[tuple[str, int, int]] = []
    real_open = os.open

    def spy(path, flags, mode=0o777, *args, **kwargs):
        opened.append((os.fspath(path), flags, mode))
        return real_open(path, flags, mode, *args, **kwargs)

    monkeypatch.setattr(tls.os, "open", spy)
    old_mask = os.umask(0)
    try:
        creds = create_credentials(tmp_path / "c", nodes=["n1"])
        creds.superlink_key.chmod(0o644)  # an old key somebody loosened
        old_inode = creds.superlink_key.stat().st_ino
        create_credentials(creds.root, hosts=["new.example"], nodes=["n1"])  # a new cert
    finally:
        os.umask(old_mask)
    private = {str(p) for p in creds.private_files(["n1"])}
    writes = [(path, flags, mode) for path, flags, mode in opened if flags & os.O_WRONLY]
    for path, flags, mode in writes:
        name = Path(path).name
        final = str(Path(path).with_name(name[1:].rsplit(".", 2)[0]))  # ".x.<hex>.tmp" -> x
        assert name.startswith(".") and flags & os.O_CREAT and flags & os.O_EXCL, path
        if final in private:
            assert mode == 0o600, (final, oct(mode))
    assert {
        str(Path(p).with_name(Path(p).name[1:].rsplit(".", 2)[0])) for p, _, _ in writes
    } >= private
    for path in creds.private_files(["n1"]):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700, path.parent
    assert creds.superlink_key.stat().st_ino != old_inode
    assert not list(creds.root.rglob(".*.tmp"))


def test_flower_loads_the_files_as_a_supernode_would(creds):
    keys = load_supernode_auth_keys(creds.node_key("bank-a"))
    assert keys is not None
    entities = load_trusted_entities(creds.node_trusted_entities("bank-a"))
    validate_trusted_entities_ed25519(entities)  # exits the process if it is not Ed25519
    signing = serialization.load_ssh_private_key(creds.signing_key.read_bytes(), None)
    assert list(entities) == [tls.signing_key_id(signing.public_key())]


def test_fedapp_federation_keeps_credentials_out_of_the_results(tmp_path, monkeypatch):
    """Default: a private temporary folder (0700) outside the results, removed at the end;
    $FEDAPP_CREDENTIALS_DIR/<run name> when set (kept); a credentials folder inside the
    results folder (or holding it) is refused."""
    from fedapp.cli.federation import CREDENTIALS_ENV, federation_credentials

    out = tmp_path / "outputs" / "run-1"
    out.mkdir(parents=True)
    monkeypatch.delenv(CREDENTIALS_ENV, raising=False)
    creds, remove = federation_credentials(out, 2, None, insecure=False)
    assert remove == creds.root and out.resolve() not in creds.root.resolve().parents
    assert stat.S_IMODE(creds.root.stat().st_mode) == 0o700
    creds.check(["node-0", "node-1"])
    shutil.rmtree(remove)
    monkeypatch.setenv(CREDENTIALS_ENV, str(tmp_path / "state"))
    creds, remove = federation_credentials(out, 2, None, insecure=False)
    assert remove is None and creds.root == tmp_path / "state" / "run-1"
    assert not any(p.is_file() for p in out.rglob("*"))  # nothing was written to the results
    for bad in (out / "credentials", tmp_path):
        with pytest.raises(ValueError, match="must not hold keys"):
            federation_credentials(out, 2, bad, insecure=False)
    with pytest.raises(FileNotFoundError, match="missing credentials"):
        federation_credentials(out, 3, creds.root, insecure=False)  # no key for node-2
    assert federation_credentials(out, 2, None, insecure=True) == (None, None)


# -- the reverse proxy ---------------------------------------------------------------------


def test_the_proxy_config_forwards_only_the_fleet_api(creds, tmp_path):
    path = tls.write_proxy_config(creds, "127.0.0.1:8443", "127.0.0.1:9000", tmp_path / "px")
    text = path.read_text()
    assert text.count("proxy_pass") == 1
    assert "proxy_pass https://flower_superlink/v1/fleet/;" in text
    assert "location /v1/fleet/ {" in text and "limit_except POST" in text
    assert "location / {\n            return 404;" in text
    assert "listen 127.0.0.1:8443 ssl;" in text and "server 127.0.0.1:9000;" in text
    assert "proxy_ssl_verify on;" in text and str(creds.ca_cert) in text
    assert str(creds.ca_key) not in text and str(creds.signing_key) not in text
    assert "client_max_body_size 0;" in text
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    with pytest.raises(ValueError, match="HOST:PORT"):
        tls.proxy_config(creds, "8443", "127.0.0.1:9000", tmp_path)
    if shutil.which("nginx") is None:
        pytest.skip("nginx is not installed: the config's syntax is not checked")
    done = subprocess.run(
        [
            "nginx",
            "-t",
            "-p",
            str(path.parent),
            "-e",
            str(path.parent / "error.log"),
            "-c",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr


def test_the_command_line_writes_credentials_and_the_proxy_config(tmp_path, capsys):
    assert tls.main([str(tmp_path / "c"), "--host", "fl.example", "--nodes", "n1"]) == 0
    printed = capsys.readouterr().out
    assert "operator, offline" in printed and "nodes/n1/ (to that institution only" in printed
    assert Credentials(tmp_path / "c").check(["n1"]) is None
    assert (
        tls.main(
            [
                "proxy",
                str(tmp_path / "c"),
                "--listen",
                "0.0.0.0:443",
                "--superlink",
                "127.0.0.1:9000",
                "--out",
                str(tmp_path / "px"),
            ]
        )
        == 0
    )
    assert (tmp_path / "px" / "nginx.conf").is_file()
    assert tls.main([str(tmp_path / "c2"), "--nodes", "../evil"]) == 2
    assert not (tmp_path / "c2").exists()  # refused before anything is written


# -- signed apps -------------------------------------------------------------------------------


def _fab(extra: bytes = b"") -> bytes:
    return build_fab_from_files({"pyproject.toml": TINY_APP, "tiny/__init__.py": extra})


def test_flower_accepts_the_signed_fab_and_nothing_else(creds, tmp_path):
    fab = _fab()
    app = appsign.sign_fab(fab, creds.signing_key, tmp_path / "apps")
    assert app.spec == "@tester/tinyapp==1.2.3" and app.fab.read_bytes() == fab
    trusted = creds.node_trusted_entities("bank-a")
    assert appsign.verify_with_flower(fab, app.verifications, trusted)
    # another FAB (one byte changed) under that signature
    assert not appsign.verify_with_flower(_fab(b"#"), app.verifications, trusted)
    # the same FAB signed by another operator's key
    other = create_credentials(tmp_path / "other")
    forged = appsign.signature(fab, appsign.load_signing_key(other.signing_key))
    assert not appsign.verify_with_flower(fab, [forged], trusted)
    # ... even under the trusted key's id
    forged["public_key_id"] = app.verifications[0]["public_key_id"]
    assert not appsign.verify_with_flower(fab, [forged], trusted)
    # no signature at all (what `flwr run <folder>` sends)
    assert not appsign.verify_with_flower(fab, [], trusted)
    # a second signer is added, not swapped in
    both = appsign.sign_fab(fab, other.signing_key, tmp_path / "apps", name=app.fab.name)
    assert len(both.verifications) == 2
    assert appsign.verify_with_flower(fab, both.verifications, trusted)
    assert appsign.verify_with_flower(fab, both.verifications, other.trusted_entities)


def test_the_index_answers_the_superlinks_fetch_fab_request(creds, tmp_path):
    """The SuperLink's own client code (`request_download_link`, then a plain GET) against
    `serve_apps`: the signed FAB and its verifications, which Flower's check accepts."""
    import requests

    fab = _fab()
    app = appsign.sign_fab(fab, creds.signing_key, tmp_path / "apps")
    (tmp_path / "apps" / "unsigned.fab").write_bytes(_fab(b"# unsigned"))
    index = appsign.serve_apps(tmp_path / "apps")
    try:
        url = f"{index.url}{appsign.FETCH_PATH}"
        for version in ("1.2.3", None):
            fab_url, verifications, _ = request_download_link(
                "@tester/tinyapp", version, url, "fab_url"
            )
            got = requests.get(fab_url, timeout=10).content
            assert got == fab and verifications == app.verifications
            assert appsign.verify_with_flower(got, verifications, creds.trusted_entities)
        with pytest.raises(ValueError, match="not found"):
            request_download_link("@tester/tinyapp", "9.9.9", url, "fab_url")
        with pytest.raises(ValueError, match="not found"):
            request_download_link("@tester/other", None, url, "fab_url")
        assert requests.get(f"{index.url}/fab/{'0' * 64}.fab", timeout=10).status_code == 404
        assert index.server_address[0] == "127.0.0.1"
    finally:
        index.shutdown()
    assert not any(b"PRIVATE KEY" in p.read_bytes() for p in (tmp_path / "apps").iterdir())


def test_sign_app_command(creds, tmp_path):
    app_dir = tmp_path / "tiny"
    (app_dir / "tiny").mkdir(parents=True)
    (app_dir / "pyproject.toml").write_bytes(TINY_APP)
    (app_dir / "tiny" / "__init__.py").write_text("")
    assert (
        certs.main(["sign-app", str(creds.root), str(app_dir), "--out", str(tmp_path / "a")]) == 0
    )
    apps = appsign.load_apps(tmp_path / "a")
    assert list(apps) == [("@tester/tinyapp", "1.2.3")]
    signed = apps[("@tester/tinyapp", "1.2.3")]
    assert appsign.verify_with_flower(
        signed.fab.read_bytes(), signed.verifications, creds.node_trusted_entities("bank-b")
    )


def test_an_institution_makes_its_own_node_key_and_the_operator_sees_only_the_public_half(
    tmp_path, capsys
):
    """`fedapp-certs node-key`: the institution's private key exists only in its folder
    (0600, folder 0700); Flower loads it; a partition claim signed with it verifies against
    the .pub the operator registers, and a second run never overwrites the key."""
    from fedapp.features.identity import load_node_keys, new_nonce, sign_claim, verify_claim

    mine = tmp_path / "bank-a" / "credentials"
    assert tls.main(["node-key", str(mine), "--name", "bank-a"]) == 0
    assert "give the operator" in capsys.readouterr().out
    key, pub = mine / "supernode.key", mine / "supernode.pub"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(mine.stat().st_mode) == 0o700
    assert load_supernode_auth_keys(key) is not None
    registry = tmp_path / "node_keys.yaml"
    registry.write_text(f'0: "{pub}"\n')
    nonce = new_nonce()
    assert verify_claim(load_node_keys(registry)[0], nonce, 0, sign_claim(key, nonce, 0))
    before = key.read_bytes()
    assert tls.main(["node-key", str(mine), "--name", "bank-a"]) == 2
    assert "not overwritten" in capsys.readouterr().err and key.read_bytes() == before
    assert tls.main(["node-key", str(tmp_path / "x"), "--name", "../evil"]) == 2
