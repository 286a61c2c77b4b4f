"""Signed apps: SuperNodes run only the FAB the operator signed (Flower's `--trusted-entities`).

How Flower 1.41 verifies apps (read in the installed code):

- `flower-supernode --trusted-entities FILE` loads a YAML map {key id: 'ssh-ed25519 ...'}
  (`flwr/supernode/cli/flower_supernode.py`). For every new run the SuperNode fetches the
  FAB and, with trusted entities set, refuses it (an error reply, the ClientApp never
  starts) unless `fab.verifications` has a non-empty `valid_license` and, for a key id it
  trusts, a JSON `{"signature", "signed_at"}` whose Ed25519 signature over
  `signed_at (8 bytes, big-endian) + sha256(FAB)` verifies
  (`flwr/supernode/start_client_internal.py::_pull_and_store_message`, `_verify_fab`).
- The SuperLink fills `fab.verifications` only for apps it fetches by name
  (`flwr run @publisher/name==x.y.z`): it POSTs `{app_id, app_version, flwr_version}` to
  `$FLWR_SUPERGRID_API_URL/hub/fetch-fab` and expects `{"fab_url": ..., "verifications":
  [{"public_key_id", "signature", "signed_at"}, ...]}`, then downloads the FAB from
  `fab_url` (`flwr/superlink/servicer/control/control_handlers.py::_get_remote_fab`,
  `flwr/supercore/utils.py::request_download_link`). A FAB sent with `flwr run <folder>`
  always has empty verifications, so a SuperNode with trusted entities refuses it.
- `FLWR_SUPERGRID_API_URL` defaults to Flower's hosted platform (`https://api.flower.ai/v1`,
  `flwr/supercore/constant.py`), whose `flwr app review` signs and publishes apps there.

A self-hosted federation (no Flower platform, no Internet) therefore needs the SuperLink
to fetch the app from a server that speaks that one request. That is `serve_apps`: a
read-only index on the SuperLink's loopback interface, serving FABs and the signatures
made offline by `sign_fab`; it holds no key. The signature, not the index, is what the
SuperNodes trust: a SuperLink (or index) that serves another FAB, or changes one byte of
it, gets an error reply from every SuperNode. Signing uses Flower's own message format and
Ed25519 primitives (`flwr/supercore/primitives/asymmetric_ed25519.py`); every Flower function
used here is reached through `fedapp.core.flower_compat`.

Caveats: the index protocol is Flower's platform API, undocumented and possibly changed in
later Flower versions (checked for 1.41.0 only); the run-config overrides of a run are not
part of the FAB and are not signed (the ClientApp checks those itself); `signed_at` is not
checked for freshness by Flower, so revoking a signed version means a new signing key (and
new trusted-entities files) or removing the FAB from the index.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import re
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519

SIGNATURES = ".sig.json"  # next to each FAB: a list of {public_key_id, signature, signed_at}
FETCH_PATH = "/hub/fetch-fab"


@dataclass(frozen=True)
class SignedApp:
    app_id: str  # "@publisher/name", what `flwr run @publisher/name==version` names
    version: str
    fab: Path
    verifications: list[dict]

    @property
    def spec(self) -> str:
        return f"{self.app_id}=={self.version}"


def _fab_metadata(fab: bytes) -> tuple[str, str]:
    from fedapp.core.flower_compat import fab_id_and_version

    fab_id, version = fab_id_and_version(fab)
    return f"@{fab_id}", str(version)


def load_signing_key(path: Path | str) -> ed25519.Ed25519PrivateKey:
    from fedapp.core.flower_compat import load_ed25519_private_key

    return load_ed25519_private_key(path)


def signature(fab: bytes, key: ed25519.Ed25519PrivateKey, signed_at: int | None = None) -> dict:
    """One verification record of `fab`, as Flower's platform returns it."""
    from fedapp.core.flower_compat import sign_fab_digest
    from fedapp.features.tls import signing_key_id

    signed_at = int(time.time()) if signed_at is None else int(signed_at)
    sig = sign_fab_digest(key, hashlib.sha256(fab).digest(), signed_at)
    return {
        "public_key_id": signing_key_id(key.public_key()),
        "signature": base64.urlsafe_b64encode(sig).rstrip(b"=").decode("ascii"),
        "signed_at": signed_at,
    }


def build_fab(app_dir: Path | str) -> bytes:
    """The FAB `flwr run <app_dir>` would send (Flower's own builder)."""
    from fedapp.core.flower_compat import build_fab_from_disk

    return build_fab_from_disk(app_dir)


def sign_fab(
    fab: bytes, key_path: Path | str, out_dir: Path | str, name: str | None = None
) -> SignedApp:
    """Write `out_dir/<name>.fab` and its signatures (`.fab.sig.json`, keeping other keys'
    signatures of the same bytes). The private key is only read."""
    from fedapp.core.flower_compat import fab_filename
    from fedapp.features.tls import write_file

    app_id, version = _fab_metadata(fab)
    name = name or fab_filename(fab)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / (name if name.endswith(".fab") else f"{name}.fab")
    sig_path = path.with_name(path.name + SIGNATURES)
    new = signature(fab, load_signing_key(key_path))
    old = []
    if path.is_file() and path.read_bytes() == fab and sig_path.is_file():
        old = [
            v
            for v in json.loads(sig_path.read_text())
            if v["public_key_id"] != new["public_key_id"]
        ]
    write_file(path, fab, private=False)
    write_file(sig_path, json.dumps([*old, new], indent=1).encode(), private=False)
    return SignedApp(app_id, version, path, [*old, new])


def load_apps(folder: Path | str) -> dict[tuple[str, str], SignedApp]:
    """The signed FABs of `folder` by (app id, version); FABs without signatures are left out
    (a SuperNode with trusted entities would refuse them anyway)."""
    apps = {}
    for fab in sorted(Path(folder).glob("*.fab")):
        sig = fab.with_name(fab.name + SIGNATURES)
        if not sig.is_file():
            continue
        app_id, version = _fab_metadata(fab.read_bytes())
        apps[(app_id, version)] = SignedApp(app_id, version, fab, json.loads(sig.read_text()))
    return apps


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version))


class _Index(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, folder: Path, verbose: bool = True) -> None:
        super().__init__(address, _Handler)
        self.folder = Path(folder)
        self.verbose = verbose

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in str(host) else host
        return f"http://{host}:{port}"


class _Handler(BaseHTTPRequestHandler):
    server: _Index

    def log_message(self, fmt, *args) -> None:  # one line per request on stderr
        if self.server.verbose:
            sys.stderr.write(f"[fedapp-apps] {self.address_string()} {fmt % args}\n")

    def _json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        if self.path.rstrip("/") != FETCH_PATH:
            return self._json(404, {"detail": f"no such endpoint {self.path}"})
        try:
            length = int(self.headers.get("Content-Length", "0"))
            body = json.loads(self.rfile.read(length) or b"{}")
            app_id, version = str(body["app_id"]), body.get("app_version")
        except (ValueError, KeyError, TypeError):
            return self._json(400, {"detail": "expected {app_id, app_version}"})
        apps = load_apps(self.server.folder)  # read afresh: a newly signed version is served
        versions = sorted((v for a, v in apps if a == app_id), key=_version_key)
        if version is None and versions:
            version = versions[-1]
        app = apps.get((app_id, str(version)))
        if app is None:
            return self._json(
                404, {"detail": {"available_app_versions": versions}} if versions else {}
            )
        digest = hashlib.sha256(app.fab.read_bytes()).hexdigest()
        return self._json(
            200,
            {"fab_url": f"{self.server.url}/fab/{digest}.fab", "verifications": app.verifications},
        )

    def do_GET(self) -> None:  # noqa: N802
        match = re.fullmatch(r"/fab/([0-9a-f]{64})\.fab", self.path)
        if match:
            for app in load_apps(self.server.folder).values():
                data = app.fab.read_bytes()
                if hashlib.sha256(data).hexdigest() == match.group(1):
                    self.send_response(200)
                    self.send_header("Content-Type", "application/octet-stream")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
        self._json(404, {"detail": "not found"})


def serve_apps(
    folder: Path | str, host: str = "127.0.0.1", port: int = 0, verbose: bool = False
) -> _Index:
    """Start the index of `folder` in a background thread; `.url` is what the SuperLink's
    `FLWR_SUPERGRID_API_URL` must be; `.shutdown()` stops it."""
    index = _Index((host, port), Path(folder), verbose)
    threading.Thread(target=index.serve_forever, daemon=True).start()
    return index


def main(argv: Sequence[str]) -> int:
    """`fedapp-certs sign-app DIR APP --out FOLDER` and `fedapp-certs serve-apps FOLDER`."""
    command, rest = argv[0], list(argv[1:])
    if command == "sign-app":
        parser = argparse.ArgumentParser(
            prog="fedapp-certs sign-app",
            description="Build the app's FAB and sign it with the operator's key (offline).",
        )
        parser.add_argument("dir", type=Path, help="the credentials folder (fedapp-certs DIR)")
        parser.add_argument("app", type=Path, help="the app's folder (with pyproject.toml)")
        parser.add_argument("--out", required=True, type=Path, help="folder of signed FABs")
        parser.add_argument("--key", type=Path, default=None, help="another Ed25519 key")
        args = parser.parse_args(rest)
        from fedapp.features.tls import Credentials

        key = args.key or Credentials(args.dir).signing_key
        try:
            app = sign_fab(build_fab(args.app), key, args.out)
        except (OSError, ValueError) as err:
            print(f"fedapp-certs sign-app: {err}", file=sys.stderr)
            return 2
        print(f"[fedapp-certs] signed {app.fab} ({app.spec}): run it with `flwr run {app.spec}`")
        return 0
    parser = argparse.ArgumentParser(
        prog="fedapp-certs serve-apps",
        description="Serve signed FABs to the SuperLink (Flower's fetch-fab request), on "
        "loopback; set FLWR_SUPERGRID_API_URL=http://127.0.0.1:PORT for flower-superlink.",
    )
    parser.add_argument("folder", type=Path, help="folder of signed FABs (sign-app --out)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (loopback)")
    args = parser.parse_args(rest)
    index = _Index((args.host, args.port), args.folder)
    apps = load_apps(args.folder)
    print(f"[fedapp-certs] serving {len(apps)} signed app(s) at {index.url}", flush=True)
    for app in apps.values():
        print(f"[fedapp-certs]   {app.spec}: {app.fab.name}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        index.serve_forever()
    return 0


def verify_with_flower(fab: bytes, verifications: list[dict], trusted_entities: Path) -> bool:
    """What a SuperNode started with `--trusted-entities trusted_entities` decides about this
    FAB and these verifications (Flower's own functions; for tests and `sign-app` checks)."""
    from fedapp.core.flower_compat import fab_from_hub, load_trusted_entities, verify_fab

    entities = load_trusted_entities(Path(trusted_entities))
    fab_record = fab_from_hub(fab, verifications)
    return bool(fab_record.verifications.get("valid_license")) and verify_fab(fab_record, entities)
