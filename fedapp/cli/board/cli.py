"""`fedapp-board`: serve the board, or `fedapp-board import DIR`.

Safe by default: it binds to loopback; any other address needs TLS (`--certfile`,
`--keyfile`: fedapp-certs' server certificate works) and an operator token
(`$FEDAPP_BOARD_TOKEN` or `--token-file`). Without a token the board is read-only.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from pathlib import Path

TOKEN_ENV = "FEDAPP_BOARD_TOKEN"
MIN_TOKEN_CHARS = 16


class BoardError(SystemExit):
    """A refused start; the message says what to change."""

    def __init__(self, message: str) -> None:
        super().__init__(f"fedapp-board: {message}")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def read_token(token_file: str | None) -> str | None:
    if token_file:
        path = Path(token_file).expanduser()
        if not path.is_file():
            raise BoardError(f"--token-file {token_file}: no such file")
        token = path.read_text().strip()
    else:
        token = os.environ.get(TOKEN_ENV, "").strip()
    if token and len(token) < MIN_TOKEN_CHARS:
        raise BoardError(
            f"the operator token is {len(token)} characters; use at least {MIN_TOKEN_CHARS} "
            "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    return token or None


def serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedapp-board",
        description="The operator board: runs, rounds, clients, privacy ledgers, model versions "
        "and the audit trail, from the event store. `fedapp-board import DIR` imports run folders.",
    )
    p.add_argument(
        "--db",
        help="SQLAlchemy URL of the event store (default: $FEDAPP_EVENTS_DB, "
        "else sqlite fedapp.db in --root)",
    )
    p.add_argument(
        "--root",
        help="the outputs root whose run folders the board shows "
        "(default: $FEDAPP_OUTPUT_ROOT, else ./outputs)",
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default 127.0.0.1; any "
        "non-loopback address needs --certfile, --keyfile and an operator token)",
    )
    p.add_argument("--port", type=int, default=8050, help="port (default 8050)")
    p.add_argument("--certfile", help="TLS certificate (PEM), e.g. fedapp-certs' server.pem")
    p.add_argument("--keyfile", help="TLS private key (PEM) of --certfile")
    p.add_argument(
        "--token-file",
        help=f"file holding the operator token (else ${TOKEN_ENV}); "
        "without a token the board is read-only",
    )
    return p


def import_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedapp-board import",
        description="Import existing run folders (those with a results.json) into the event store.",
    )
    p.add_argument("dir", help="a run folder or a folder of run folders")
    p.add_argument(
        "--db",
        help="SQLAlchemy URL (default: $FEDAPP_EVENTS_DB, else sqlite fedapp.db in the outputs root)",
    )
    return p


def loopback_hosts(bind: str) -> list[str]:
    """The Host headers a loopback board answers: the loopback names and its own address."""
    return sorted({"127.0.0.1", "localhost", "::1", bind.strip("[]").lower()})


def check_bind(host: str, certfile: str | None, keyfile: str | None, token: str | None) -> None:
    """Refuse an unsafe start (raises BoardError)."""
    if bool(certfile) != bool(keyfile):
        raise BoardError("--certfile and --keyfile go together")
    for f in (certfile, keyfile):
        if f and not Path(f).is_file():
            raise BoardError(f"{f}: no such file")
    if is_loopback(host):
        return
    if not certfile:
        raise BoardError(
            f"--host {host} is not a loopback address: serving the board beyond this machine "
            "needs TLS (--certfile server.pem --keyfile server.key, e.g. from fedapp-certs) and "
            f"an operator token (${TOKEN_ENV} or --token-file)"
        )
    if not token:
        raise BoardError(
            f"--host {host} is not a loopback address: set an operator token (${TOKEN_ENV} or "
            "--token-file) so that only the operator can release model versions"
        )


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    from fedapp.features import events as ev

    if argv[:1] == ["import"]:
        args = import_parser().parse_args(argv[1:])
        folder = Path(args.dir)
        if not folder.is_dir():
            raise BoardError(f"{args.dir}: not a folder")
        url = args.db or ev.default_url(
            root=folder if (folder / "results.json").is_file() is False else folder.parent
        )
        done, skipped = ev.import_dir(url, folder)
        print(
            f"[fedapp-board] {done} run(s) imported or updated, {skipped} already up to date: {url}"
        )
        return
    args = serve_parser().parse_args(argv)
    token = read_token(args.token_file)
    check_bind(args.host, args.certfile, args.keyfile, token)
    root = Path(args.root).resolve() if args.root else ev.output_root()
    url = args.db or ev.default_url(root=root)
    import uvicorn

    from fedapp.cli.board.app import create_app

    hosts = loopback_hosts(args.host) if is_loopback(args.host) else None
    app = create_app(url, root=root, token=token, allowed_hosts=hosts)
    scheme = "https" if args.certfile else "http"
    print(
        f"[fedapp-board] {scheme}://{args.host}:{args.port}  db={url}  root={root}  "
        f"{'operator token set' if token else 'read-only (no operator token)'}"
    )
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        ssl_certfile=args.certfile,
        ssl_keyfile=args.keyfile,
        log_level="warning",
        server_header=False,
    )


if __name__ == "__main__":
    main()
