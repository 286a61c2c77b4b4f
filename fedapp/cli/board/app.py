"""fedapp-board's web application: a JSON API over the event store (fedapp/features/events.py) and
server-rendered pages with a little vanilla JavaScript that polls the API (no CDN: every
asset is served from fedapp/cli/board/static).

Read-only unless the operator token is presented (`Authorization: Bearer <token>`): the only
write is "release a model version". Never served: keys, CKKS contexts, tokens (the API reads
the database and a run folder's `best_model.pt` / `final_model.pt`, nothing else).
"""

from __future__ import annotations

import hmac
import html
import json
import threading
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy import and_, func, select

from fedapp.features import events as ev

STATIC = Path(__file__).resolve().parent / "static"
MAX_LIMIT = 1000
SCAN_EVERY_S = 2.0
MODEL_FILES = ("best_model.pt", "final_model.pt")


def _redact(value: Any) -> Any:
    """A config as shown (fedapp.features.events.redact; a database written before the store redacted
    is redacted here)."""
    return ev.redact(value)


def host_of(header: str) -> str:
    """The host of a Host header, without its port: `[::1]:8050` -> `::1`,
    `127.0.0.1:8050` -> `127.0.0.1`, `localhost` -> `localhost`."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else ""
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def _row(r) -> dict[str, Any]:
    return dict(r._mapping)


def _paged(total: int, offset: int, limit: int, items: list, **extra: Any) -> dict[str, Any]:
    """One page of a paginated answer: `total` rows in all, these `items` from `offset`."""
    return {"total": total, "offset": offset, "limit": limit, **extra, "items": items}


class Board:
    def __init__(self, url: str, root: Path | None, token: str | None) -> None:
        self.url = url
        self.root = Path(root).resolve() if root else None
        self.token = token or None
        self.engine = ev.engine_for(url)
        self._scan_lock = threading.Lock()
        self._scanned = 0.0

    # -- runs folders not yet in the database ------------------------------------------
    def scan(self, force: bool = False) -> None:
        if self.root is None or not self.root.is_dir():
            return
        now = time.monotonic()
        if not force and now - self._scanned < SCAN_EVERY_S:
            return
        if not self._scan_lock.acquire(blocking=False):
            return
        try:
            ev.import_dir(self.url, self.root)
            self._scanned = time.monotonic()
        finally:
            self._scan_lock.release()

    def authorized(self, request: Request) -> bool:
        if self.token is None:
            return False
        got = request.headers.get("authorization", "")
        scheme, _, value = got.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            value.strip().encode(), self.token.encode()
        )

    # -- queries ------------------------------------------------------------------------
    def runs(self, status=None, task=None, strategy=None, privacy=None, offset=0, limit=100):
        t = ev.runs
        cond = [
            c == v
            for c, v in (
                (t.c.status, status),
                (t.c.task, task),
                (t.c.strategy, strategy),
                (t.c.privacy, privacy),
            )
            if v
        ]
        cols = [c for c in t.c if c.name not in ("config", "final")]
        with self.engine.connect() as conn:
            total = ev.count(conn, t, *cond)
            rows = conn.execute(
                select(*cols).where(*cond).order_by(t.c.id.desc()).offset(offset).limit(limit)
            ).all()
            facets = {
                name: sorted(x for x in conn.execute(select(col).distinct()).scalars() if x)
                for name, col in (
                    ("status", t.c.status),
                    ("task", t.c.task),
                    ("strategy", t.c.strategy),
                    ("privacy", t.c.privacy),
                )
            }
        return _paged(total, offset, limit, [self._run_view(_row(r)) for r in rows], facets=facets)

    @staticmethod
    def _run_view(r: dict[str, Any]) -> dict[str, Any]:
        total, done = r.get("rounds_total") or 0, r.get("rounds_done") or 0
        eta = None
        if r.get("status") == "running" and r.get("mean_round_s") and total > done:
            eta = (total - done) * float(r["mean_round_s"])
        r["progress"] = done / total if total else None
        r["eta_s"] = eta
        if r.get("command"):  # stored masked; a database written before that is masked here
            r["command"] = ev.safe_command(str(r["command"]).split(" "))
        return r

    def run(self, run_id: int) -> dict[str, Any]:
        with self.engine.connect() as conn:
            row = conn.execute(select(ev.runs).where(ev.runs.c.id == run_id)).first()
            if row is None:
                raise HTTPException(404, f"no run {run_id}")
            r = self._run_view(_row(row))
            r["config"] = _redact(r.get("config"))
            cr = ev.client_rounds
            r["counts"] = {
                "rejected": ev.count(conn, cr, cr.c.run_id == run_id, cr.c.status == "rejected"),
                "errors": ev.count(conn, cr, cr.c.run_id == run_id, cr.c.status == "error"),
                "audit": ev.count(conn, ev.audit_events, ev.audit_events.c.run_id == run_id),
                "versions": ev.count(conn, ev.model_versions, ev.model_versions.c.run_id == run_id),
                "clients": int(
                    conn.execute(
                        select(func.count(func.distinct(cr.c.partition_id))).where(
                            cr.c.run_id == run_id
                        )
                    ).scalar()
                    or 0
                ),
            }
        return r

    def rounds(self, run_id: int, offset=0, limit=100, full=False):
        t = ev.rounds
        cols = list(t.c) if full else [c for c in t.c if c.name != "data"]
        with self.engine.connect() as conn:
            total = ev.count(conn, t, t.c.run_id == run_id)
            rows = conn.execute(
                select(*cols)
                .where(t.c.run_id == run_id)
                .order_by(t.c.round)
                .offset(offset)
                .limit(limit)
            ).all()
        return _paged(total, offset, limit, [_row(r) for r in rows])

    def clients(self, run_id: int, rnd=None, partition_id=None, status=None, offset=0, limit=100):
        t = ev.client_rounds
        cond = [t.c.run_id == run_id]
        if rnd is not None:
            cond.append(t.c.round == rnd)
        if partition_id is not None:
            cond.append(t.c.partition_id == partition_id)
        if status:
            cond.append(t.c.status == status)
        cols = [c for c in t.c if c.name not in ("data", "run_id")]
        with self.engine.connect() as conn:
            if rnd is None and partition_id is None and not status:
                last = conn.execute(
                    select(func.max(t.c.round)).where(t.c.run_id == run_id)
                ).scalar()
                if last is not None:  # default: the latest round
                    cond.append(t.c.round == last)
                    rnd = last
            total = ev.count(conn, t, *cond)
            rows = conn.execute(
                select(*cols)
                .where(and_(*cond))
                .order_by(t.c.round, t.c.phase, t.c.partition_id)
                .offset(offset)
                .limit(limit)
            ).all()
        return _paged(total, offset, limit, [_row(r) for r in rows], round=rnd)

    def ledger(self, run_id: int, offset=0, limit=100):
        """Per client (paginated over clients): epsilon spent after each round it trained in."""
        t = ev.client_rounds
        base = and_(t.c.run_id == run_id, t.c.phase == "train", t.c.dp_epsilon.is_not(None))
        with self.engine.connect() as conn:
            pids_q = select(t.c.partition_id).where(base).distinct().order_by(t.c.partition_id)
            total = int(
                conn.execute(select(func.count()).select_from(pids_q.subquery())).scalar() or 0
            )
            pids = list(conn.execute(pids_q.offset(offset).limit(limit)).scalars())
            rows = (
                conn.execute(
                    select(t.c.partition_id, t.c.round, t.c.dp_epsilon, t.c.dp_target_epsilon)
                    .where(base, t.c.partition_id.in_(pids))
                    .order_by(t.c.partition_id, t.c.round)
                ).all()
                if pids
                else []
            )
        out: dict[int, dict[str, Any]] = {
            p: {"partition_id": p, "target_epsilon": None, "series": []} for p in pids
        }
        for p, rnd, eps, target in rows:
            out[p]["series"].append([rnd, eps])
            out[p]["target_epsilon"] = target
        for item in out.values():
            item["spent_epsilon"] = max((e for _, e in item["series"]), default=None)
        return _paged(total, offset, limit, list(out.values()))

    def nodes(self, run_id: int, kind=None, offset=0, limit=100):
        """Node events; `kind`: one kind, or "!joined" for every other kind."""
        t = ev.node_events
        cond = [t.c.run_id == run_id]
        if kind and kind.startswith("!"):
            cond.append(t.c.kind != kind[1:])
        elif kind:
            cond.append(t.c.kind == kind)
        with self.engine.connect() as conn:
            total = ev.count(conn, t, *cond)
            rows = conn.execute(
                select(t).where(*cond).order_by(t.c.id).offset(offset).limit(limit)
            ).all()
            by_kind = dict(
                conn.execute(
                    select(t.c.kind, func.count()).where(t.c.run_id == run_id).group_by(t.c.kind)
                ).all()
            )
        return _paged(total, offset, limit, [_row(r) for r in rows], by_kind=by_kind)

    def audit(self, run_id=None, kind=None, q=None, offset=0, limit=100):
        t = ev.audit_events
        cond = []
        if run_id is not None:
            cond.append(t.c.run_id == run_id)
        if kind:
            cond.append(t.c.kind == kind)
        if q:
            cond.append(t.c.reason.contains(q, autoescape=True))
        with self.engine.connect() as conn:
            total = ev.count(conn, t, *cond)
            rows = conn.execute(
                select(t, ev.runs.c.name.label("run_name"))
                .join(ev.runs, ev.runs.c.id == t.c.run_id, isouter=True)
                .where(*cond)
                .order_by(t.c.id.desc())
                .offset(offset)
                .limit(limit)
            ).all()
            kinds = sorted(x for x in conn.execute(select(t.c.kind).distinct()).scalars() if x)
        return _paged(total, offset, limit, [_row(r) for r in rows], kinds=kinds)

    def versions(self, run_id=None, offset=0, limit=100):
        t = ev.model_versions
        cond = [t.c.run_id == run_id] if run_id is not None else []
        with self.engine.connect() as conn:
            total = ev.count(conn, t, *cond)
            rows = conn.execute(
                select(t, ev.runs.c.name.label("run_name"))
                .join(ev.runs, ev.runs.c.id == t.c.run_id)
                .where(*cond)
                .order_by(t.c.id.desc())
                .offset(offset)
                .limit(limit)
            ).all()
        return _paged(total, offset, limit, [_row(r) for r in rows])

    def version_file(self, version_id: int) -> Path:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(ev.model_versions, ev.runs.c.output_dir)
                .join(ev.runs, ev.runs.c.id == ev.model_versions.c.run_id)
                .where(ev.model_versions.c.id == version_id)
            ).first()
        if row is None:
            raise HTTPException(404, f"no model version {version_id}")
        if row.file not in MODEL_FILES:
            raise HTTPException(404, f"model version {version_id} has no file")
        path = Path(row.output_dir) / row.file
        if not path.is_file():
            raise HTTPException(410, f"{path.name} is no longer in the run folder")
        if ev.sha256_file(path) != row.sha256:
            raise HTTPException(
                410,
                f"{path.name} has been overwritten since version {version_id} (a later best "
                "model or a resumed run): its sha256 no longer matches",
            )
        return path


def _limit(limit: int) -> int:
    return max(1, min(int(limit), MAX_LIMIT))


def create_app(
    url: str,
    root: Path | None = None,
    token: str | None = None,
    allowed_hosts: list[str] | None = None,
) -> FastAPI:
    """`allowed_hosts`: Host headers accepted (loopback binds: the loopback names only, so a
    web page elsewhere cannot reach the board through DNS rebinding)."""
    board = Board(url, root, token)
    app = FastAPI(title="fedapp-board", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(OverflowError)
    async def too_large(request: Request, exc: OverflowError):  # an id or offset past int64
        return JSONResponse({"detail": "a number in the request is out of range"}, 400)

    if allowed_hosts:
        allowed = {h.strip("[]").lower() for h in allowed_hosts}

        @app.middleware("http")
        async def host_check(request: Request, call_next):
            # Starlette's TrustedHostMiddleware cuts "[::1]:8050" at its first colon; here an
            # IPv6 host keeps its brackets' content (DNS rebinding: a foreign name is refused)
            if host_of(request.headers.get("host", "")) not in allowed:
                return JSONResponse({"detail": "Invalid host header"}, 400)
            return await call_next(request)

    app.state.board = board
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.middleware("http")
    async def headers(request: Request, call_next):
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = (
            "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
            "frame-ancestors 'none'"
        )
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["Cache-Control"] = "no-store"
        return response

    # ---------------------------------------------------------------- API
    @app.get("/api/runs")
    def api_runs(
        status: str | None = None,
        task: str | None = None,
        strategy: str | None = None,
        privacy: str | None = None,
        offset: int = Query(0, ge=0),
        limit: int = Query(100, ge=1),
    ):
        board.scan()
        return board.runs(status, task, strategy, privacy, offset, _limit(limit))

    @app.get("/api/runs/{run_id}")
    def api_run(run_id: int):
        return board.run(run_id)

    @app.get("/api/runs/{run_id}/rounds")
    def api_rounds(
        run_id: int, offset: int = Query(0, ge=0), limit: int = Query(100, ge=1), full: bool = False
    ):
        return board.rounds(run_id, offset, _limit(limit), full)

    @app.get("/api/runs/{run_id}/clients")
    def api_clients(
        run_id: int,
        round: int | None = None,  # noqa: A002
        partition_id: int | None = None,
        status: str | None = None,
        offset: int = Query(0, ge=0),
        limit: int = Query(100, ge=1),
    ):
        return board.clients(run_id, round, partition_id, status, offset, _limit(limit))

    @app.get("/api/runs/{run_id}/ledger")
    def api_ledger(run_id: int, offset: int = Query(0, ge=0), limit: int = Query(100, ge=1)):
        return board.ledger(run_id, offset, _limit(limit))

    @app.get("/api/runs/{run_id}/nodes")
    def api_nodes(
        run_id: int,
        kind: str | None = None,
        offset: int = Query(0, ge=0),
        limit: int = Query(100, ge=1),
    ):
        return board.nodes(run_id, kind, offset, _limit(limit))

    @app.get("/api/runs/{run_id}/audit")
    def api_run_audit(
        run_id: int,
        kind: str | None = None,
        offset: int = Query(0, ge=0),
        limit: int = Query(100, ge=1),
    ):
        return board.audit(run_id, kind, None, offset, _limit(limit))

    @app.get("/api/runs/{run_id}/versions")
    def api_run_versions(run_id: int, offset: int = Query(0, ge=0), limit: int = Query(100, ge=1)):
        return board.versions(run_id, offset, _limit(limit))

    @app.get("/api/audit")
    def api_audit(
        run_id: int | None = None,
        kind: str | None = None,
        q: str | None = None,
        offset: int = Query(0, ge=0),
        limit: int = Query(100, ge=1),
    ):
        return board.audit(run_id, kind, q, offset, _limit(limit))

    @app.get("/api/versions")
    def api_versions(offset: int = Query(0, ge=0), limit: int = Query(100, ge=1)):
        return board.versions(None, offset, _limit(limit))

    @app.get("/api/versions/{version_id}/download")
    def api_download(version_id: int):
        path = board.version_file(version_id)
        return FileResponse(
            path, media_type="application/octet-stream", filename=f"v{version_id}-{path.name}"
        )

    @app.post("/api/versions/{version_id}/release")
    async def api_release(version_id: int, request: Request):
        if board.token is None:
            raise HTTPException(403, "read-only board: start it with an operator token to release")
        if not board.authorized(request):
            raise HTTPException(401, "operator token required (Authorization: Bearer <token>)")
        try:
            body = await request.json()
        except ValueError:
            body = {}
        body = body if isinstance(body, dict) else {}
        who = str(body.get("by") or "operator").strip()[:100] or "operator"
        out = ev.release_version(board.url, version_id, who)
        if out is None:
            raise HTTPException(404, f"no model version {version_id}")
        return out

    @app.get("/api/whoami")
    def api_whoami(request: Request):
        return {"operator": board.authorized(request), "writable": board.token is not None}

    # ---------------------------------------------------------------- pages
    @app.get("/", response_class=HTMLResponse)
    def page_runs():
        board.scan()
        return _page("Runs", "runs", "")

    @app.get("/runs/{run_id}", response_class=HTMLResponse)
    def page_run(run_id: int):
        r = board.run(run_id)
        return _page(f"Run {r['name']}", "run", json.dumps({"run_id": run_id}))

    @app.get("/versions", response_class=HTMLResponse)
    def page_versions():
        return _page("Model versions", "versions", "")

    @app.get("/audit", response_class=HTMLResponse)
    def page_audit():
        return _page("Audit trail", "audit", "")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code)

    return app


def _page(title: str, view: str, data: str) -> str:
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)} · fedapp-board</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="stylesheet" href="/static/board.css"></head>
<body data-view="{view}" data-args="{html.escape(data)}">
<header><a class="brand" href="/">fedapp-board</a>
<nav><a href="/">Runs</a> <a href="/versions">Model versions</a> <a href="/audit">Audit trail</a></nav>
<span id="mode"></span></header>
<main id="main"><h1>{html.escape(title)}</h1><div id="content">Loading…</div></main>
<script src="/static/board.js"></script></body></html>"""
