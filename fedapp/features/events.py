"""The event store: every run, round, client reply, node event, audit event and model version
in a real database (SQLAlchemy 2.x), written as the run goes and read by `fedapp-board`.

Where: `events_db` in the config (any SQLAlchemy URL, e.g.
`postgresql+psycopg://fedapp@db.example/fedapp` for a shared server), else
`$FEDAPP_EVENTS_DB`, else SQLite `fedapp.db` in the outputs root (`$FEDAPP_OUTPUT_ROOT` or
`./outputs`) when the run folder is below it, else beside the run folder. SQLite runs in WAL
mode: one writer per run and any number of readers (the board) at once.

The recorder hands the store the same dict it writes to results.json (`EventStore.record`),
once per round and once at the end; `import_dir` replays an existing run folder's
results.json through the same code, so a run written live and one imported give the same
rows. A write that fails is logged as a warning and never stops a run. Nothing secret is
written: no key, CKKS context or token (node keys: only which partition ids have one).
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import json
import logging
import math
import os
import platform
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Engine

from fedapp.core.config import OUTPUT_ROOT_ENV, PROJECT_ROOT

LOG = logging.getLogger("fedapp.events")
DB_ENV = "FEDAPP_EVENTS_DB"
DB_NAME = "fedapp.db"

metadata = MetaData()

runs = Table(
    "runs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("output_dir", String(1024), nullable=False, unique=True),
    Column("name", String(255), nullable=False),
    Column("flwr_run_id", String(32)),
    Column("started", String(32)),
    Column("updated_unix", Float),
    Column("status", String(32), index=True),
    Column("status_detail", JSON),
    Column("task", String(64), index=True),
    Column("strategy", String(64), index=True),
    Column("privacy", String(64), index=True),
    Column("secure", String(64)),
    Column("sweep", String(1024)),  # the multirun folder of a sweep's jobs, else null
    Column("num_clients", Integer),
    Column("rounds_total", Integer),
    Column("rounds_done", Integer),
    Column("elapsed_s", Float),
    Column("mean_round_s", Float),
    Column("test_accuracy", Float),
    Column("best_round", Integer),
    Column("best_test_accuracy", Float),
    Column("dp_epsilon", Float),
    Column("config", JSON),
    Column("config_hash", String(64)),
    Column("code_version", String(64)),
    Column("launched_by", String(255)),
    Column("launched_on", String(255)),
    Column("command", Text),
    Column("source", String(16)),  # live | import
    Column("final", JSON),
)

rounds = Table(
    "rounds",
    metadata,
    Column("run_id", Integer, ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True),
    Column("round", Integer, primary_key=True),
    Column("test_accuracy", Float),
    Column("test_loss", Float),
    Column("client_accuracy", Float),
    Column("train_loss", Float),
    Column("num_sampled", Integer),
    Column("num_replies", Integer),
    Column("num_failures", Integer),
    Column("aggregated", Boolean),
    Column("bytes_up", Integer),
    Column("bytes_down", Integer),
    Column("wall_s", Float),
    Column("elapsed_s", Float),
    Column("sim_time_s", Float),
    Column("dp_epsilon", Float),
    Column("data", JSON),  # the whole results.json round, minus its clients
)

client_rounds = Table(
    "client_rounds",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", Integer, ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    Column("round", Integer, nullable=False),
    Column("phase", String(16)),
    Column("partition_id", Integer),
    Column("node_id", String(32)),
    Column("status", String(32)),  # ok | error | rejected | pending
    Column("reason", Text),  # what followed "error: " / "rejected: "
    Column("num_examples", Integer),
    Column("weight", Float),
    Column("trust", Float),
    Column("tier", String(32)),
    Column("contribution", Float),
    Column("dp_epsilon", Float),
    Column("dp_target_epsilon", Float),
    Column("train_time_s", Float),
    Column("data", JSON),  # the whole results.json client entry
    Index("ix_client_rounds_run_round", "run_id", "round"),
    Index("ix_client_rounds_run_client", "run_id", "partition_id"),
)

node_events = Table(
    "node_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", Integer, ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    Column("partition_id", Integer),
    Column("node_id", String(32)),
    Column("kind", String(16)),  # joined | failed | rejoined | refused | disconnected
    Column("at_s", Float),
    Column("detail", Text),
    Column("at_unix", Float),
    Index("ix_node_events_run", "run_id"),
)

audit_events = Table(
    "audit_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", Integer, ForeignKey("runs.id", ondelete="CASCADE")),
    Column("at_unix", Float, index=True),
    Column("round", Integer),
    # node_refused | stats_refused | update_rejected | budget_exhausted | policy_refusal |
    # client_error | resume | keys_registered | run_failed | run_interrupted | version_released
    Column("kind", String(32), index=True),
    Column("partition_id", Integer),
    Column("node_id", String(32)),
    Column("reason", Text),
    Column("actor", String(255)),
    Index("ix_audit_run", "run_id"),
)

model_versions = Table(
    "model_versions",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", Integer, ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    Column("round", Integer),
    Column("kind", String(16)),  # best | final
    Column("file", String(1024)),
    Column("sha256", String(64)),
    Column("size", Integer),
    Column("metrics", JSON),
    Column("parent_id", Integer, ForeignKey("model_versions.id")),
    Column("created_unix", Float),
    Column("released_by", String(255)),
    Column("released_unix", Float),
    Index("ix_versions_run", "run_id"),
)

CLIENT_STATUS = ("ok", "error", "rejected", "pending")


class EventStoreError(RuntimeError):
    """The event store cannot be opened or written; the message says what to change."""


# ---------------------------------------------------------------- where the database lives
def output_root() -> Path:
    return Path(os.environ.get(OUTPUT_ROOT_ENV) or Path.cwd() / "outputs").resolve()


def default_url(out_dir: Path | None = None, root: Path | None = None) -> str:
    """`$FEDAPP_EVENTS_DB`, else SQLite in the outputs root (or beside a run folder that is
    not below it)."""
    if os.environ.get(DB_ENV):
        return os.environ[DB_ENV]
    root = (root or output_root()).resolve()
    place = root
    if out_dir is not None:
        out_dir = Path(out_dir).resolve()
        if not out_dir.is_relative_to(root):
            place = out_dir.parent
    return sqlite_url(place / DB_NAME)


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{Path(path).resolve()}"


_engines: dict[str, Engine] = {}
_engines_lock = threading.Lock()


def engine_for(url: str) -> Engine:
    """One engine per URL and process; SQLite in WAL mode with a short busy timeout, tables
    created when missing."""
    with _engines_lock:
        eng = _engines.get(url)
        if eng is not None:
            return eng
        if not isinstance(url, str) or "://" not in url:
            raise EventStoreError(
                f"events_db={url!r} is not a SQLAlchemy URL (e.g. sqlite:///outputs/fedapp.db "
                "or postgresql+psycopg://user@host/db)"
            )
        kwargs: dict[str, Any] = {"future": True}
        if url.startswith("sqlite"):
            path = url.split("///", 1)[-1]
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"timeout": 5, "check_same_thread": False}
        eng = create_engine(url, **kwargs)
        if url.startswith("sqlite"):

            @event.listens_for(eng, "connect")
            def _pragmas(dbapi_conn, _record):  # noqa: ANN001
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=NORMAL")
                cur.execute("PRAGMA foreign_keys=ON")
                cur.close()

        metadata.create_all(eng)
        _engines[url] = eng
        return eng


def dispose(url: str | None = None) -> None:
    with _engines_lock:
        for key in [url] if url else list(_engines):
            eng = _engines.pop(key, None)
            if eng is not None:
                eng.dispose()


# ---------------------------------------------------------------- who, where, which code
_code_version: str | None = None


def code_version() -> str:
    global _code_version
    if _code_version is None:
        try:
            out = subprocess.run(
                ["git", "-C", str(PROJECT_ROOT), "describe", "--always", "--dirty"],
                capture_output=True,
                text=True,
                timeout=5,
            )
            _code_version = out.stdout.strip() or "unknown"
        except (OSError, subprocess.SubprocessError):
            _code_version = "unknown"
        if _code_version == "unknown":
            from importlib.metadata import PackageNotFoundError, version

            with contextlib.suppress(PackageNotFoundError):
                _code_version = f"fedapp {version('fedapp')}"
    return _code_version


def _who() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry (containers)
        return str(os.getuid()) if hasattr(os, "getuid") else "unknown"


def config_hash(config: Any) -> str:
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or v is None:
        return None if v is None else float(v)
    if isinstance(v, int | float):
        v = float(v)
        return v if math.isfinite(v) else None
    return None


def _int(v: Any) -> int | None:
    try:
        return None if v is None else int(v)
    except (TypeError, ValueError):
        return None


def _status(status: str) -> tuple[str, str | None]:
    """("rejected", "why") from "rejected: why"."""
    head, _, rest = str(status).partition(":")
    head = head.strip()
    return (head if head in CLIENT_STATUS else head[:32]), (rest.strip() or None)


def classify_error(reason: str) -> str:
    """The audit kind of a client's error reply, from the text the client sent: what the
    client reports (its reason is stored as "client reports: ..."), not a fact the server
    checked."""
    low = reason.lower()
    if "refused by the institution's policy" in low:
        return "policy_refusal"
    if "budget" in low and ("privacy" in low or "epsilon" in low):
        return "budget_exhausted"
    return "client_error"


def _name(cfg: dict[str, Any], key: str) -> str | None:
    part = cfg.get(key)
    if isinstance(part, dict):
        return part.get("name")
    return part if isinstance(part, str) else None


def _sweep_of(out_dir: Path) -> str | None:
    for parent in out_dir.parents:
        if (parent / "multirun.yaml").is_file() or parent.name == "multirun":
            return str(parent)
    return None


# ---------------------------------------------------------------- secrets never stored
# a key or flag whose name says it may hold a secret; its value is never stored or shown
SECRET_WORDS = ("token", "password", "passwd", "secret", "private", "context", "key", "credential")
_URL_USERINFO = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^/@\s:]*)(:[^/@\s]*)?@"
)


def is_secret_name(name: str) -> bool:
    return any(w in str(name).lower() for w in SECRET_WORDS)


def hide_url_secrets(text: str) -> str:
    """URLs with their password (and user) masked: `postgresql://u:pw@h/db` ->
    `postgresql://***@h/db`."""
    return _URL_USERINFO.sub(lambda m: f"{m.group('scheme')}***@", text)


def redact(value: Any) -> Any:
    """A config as stored and shown: values under keys that may name a secret hidden, and
    the passwords of URLs (`events_db=postgresql://user:pw@host/db`) masked."""
    if isinstance(value, dict):
        return {k: ("(hidden)" if is_secret_name(k) else redact(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return hide_url_secrets(value)
    return value


def safe_command(argv: list[str]) -> str:
    """The command line as stored: the value of a flag that may name a secret (`--token X`,
    `--token=X`, Flower's ServerApp processes get their AppIo token so) and passwords in
    URLs are masked."""
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            out.append("(hidden)")
            hide_next = False
            continue
        flag, eq, _ = arg.partition("=")
        if flag.startswith("-") and is_secret_name(flag):
            if eq:
                out.append(f"{flag}=(hidden)")
            else:
                out.append(arg)
                hide_next = True
            continue
        if eq and is_secret_name(flag):  # a Hydra override such as tracking.api_token=...
            out.append(f"{flag}=(hidden)")
            continue
        out.append(hide_url_secrets(arg))
    return " ".join(out)


# ---------------------------------------------------------------- the store
class EventStore:
    """Writes one run's events. Every public method logs and swallows its own failures."""

    def __init__(self, url: str, out_dir: Path, source: str = "live") -> None:
        self.url = url
        self.out_dir = Path(out_dir).resolve()
        self.source = source
        self.run_id: int | None = None
        self.rounds_stored: set[int] = set()
        self.refused_seen: set[str] = set()
        self.stats_refused_seen: set[str] = set()
        self.resumes_seen = 0
        self.nodes_seen: dict[str, dict[str, Any]] = {}
        self.best_round_seen: int | None = None
        self.last_version_id: int | None = None
        self.final_done = False
        self.write_s = 0.0  # seconds spent writing (bench/board.py)
        self.failed = False
        self.engine = engine_for(url)

    @classmethod
    def open(cls, out_dir: Path, url: str | None = None, source: str = "live") -> EventStore:
        return cls(url or default_url(out_dir), out_dir, source)

    # -- the recorder's hook ------------------------------------------------------------
    def record(
        self,
        results: dict[str, Any],
        best: dict[str, Any] | None = None,
        final: bool = False,
        now: float | None = None,
    ) -> None:
        """Store what is new in `results` (the results.json dict) since the last call."""
        t0 = time.perf_counter()
        try:
            with self.engine.begin() as conn:
                self._record(conn, results, best, final, now or time.time())
        except Exception as exc:  # never stops a run
            self.failed = True
            LOG.warning(
                "[fedapp] event store %s: write failed (%s); the run goes on", self.url, exc
            )
        finally:
            self.write_s += time.perf_counter() - t0

    def _record(self, conn, results, best, final, now) -> None:
        meta = results.get("meta") or {}
        cfg = results.get("config") or {}
        if self.run_id is None:
            self._open_run(conn, meta, cfg, now)
        new_rows = [
            r for r in results.get("rounds") or [] if int(r["round"]) not in self.rounds_stored
        ]
        for row in new_rows:
            self._round(conn, row, now)
        self._meta_events(conn, meta, now)
        if results.get("nodes"):
            self._nodes(conn, results["nodes"], now)
        fed = [r for r in results.get("rounds") or [] if int(r["round"]) > 0]
        last = fed[-1] if fed else {}
        fin = results.get("final") or {}
        values: dict[str, Any] = {
            "status": meta.get("status"),
            "status_detail": meta.get("status_detail"),
            "updated_unix": now,
            "rounds_done": len(fed),
            "elapsed_s": _num(last.get("elapsed_s")),
            "mean_round_s": (
                sum(float(r.get("wall_s") or 0) for r in fed) / len(fed) if fed else None
            ),
            "test_accuracy": _num(last.get("test_accuracy")),
            "dp_epsilon": _num(last.get("dp_epsilon")),
        }
        if best:
            values["best_round"] = _int(best.get("round"))
            values["best_test_accuracy"] = _num(best.get("test_accuracy"))
        if fin:
            values["final"] = {k: v for k, v in fin.items() if k != "sites"}
            values["best_round"] = _int(fin.get("best_round"))
            values["best_test_accuracy"] = _num(fin.get("best_test_accuracy"))
        conn.execute(update(runs).where(runs.c.id == self.run_id).values(**values))
        self._versions(conn, best, final, fin, last, now)
        if final and not self.final_done:
            self.final_done = True
            status = meta.get("status")
            if status in ("failed", "interrupted"):
                detail = meta.get("status_detail") or {}
                self._audit(conn, f"run_{status}", now, reason=str(detail.get("reason", ""))[:2000])

    def _open_run(self, conn, meta, cfg, now) -> None:
        existing = conn.execute(
            select(runs.c.id).where(runs.c.output_dir == str(self.out_dir))
        ).scalar()
        if existing is not None:  # a resumed run (or a re-import): continue its rows
            self.run_id = int(existing)
            self.rounds_stored = set(
                conn.execute(select(rounds.c.round).where(rounds.c.run_id == existing)).scalars()
            )
            seen = conn.execute(
                select(
                    audit_events.c.kind, audit_events.c.node_id, audit_events.c.partition_id
                ).where(audit_events.c.run_id == existing)
            ).all()
            self.refused_seen = {str(n) for k, n, _ in seen if k == "node_refused"}
            self.stats_refused_seen = {str(p) for k, _, p in seen if k == "stats_refused"}
            self.resumes_seen = sum(k == "resume" for k, _, _ in seen)
            # nodes already recorded: their next counts are adopted without new events (no
            # second "joined"; what changed while no one recorded is not replayed)
            known = conn.execute(
                select(node_events.c.partition_id)
                .where(node_events.c.run_id == existing)
                .distinct()
            ).scalars()
            self.nodes_seen = {str(p): {"adopt": True} for p in known if p is not None}
            vers = conn.execute(
                select(model_versions.c.id, model_versions.c.round, model_versions.c.kind)
                .where(model_versions.c.run_id == existing)
                .order_by(model_versions.c.id)
            ).all()
            if vers:
                self.last_version_id = vers[-1][0]
                bests = [r for _, r, k in vers if k == "best"]
                self.best_round_seen = bests[-1] if bests else None
                self.final_done = any(k == "final" for _, _, k in vers) and self.source == "import"
            return
        live = self.source == "live"
        res = conn.execute(
            insert(runs).values(
                output_dir=str(self.out_dir),
                name=self.out_dir.name,
                flwr_run_id=str(meta.get("run_id")) if meta.get("run_id") is not None else None,
                started=meta.get("started"),
                updated_unix=now,
                status=meta.get("status"),
                task=_name(cfg, "task"),
                strategy=_name(cfg, "strategy"),
                privacy=_name(cfg, "privacy") or "none",
                secure=_name(cfg, "secure") or "none",
                sweep=_sweep_of(self.out_dir),
                num_clients=_int(meta.get("num_clients")),
                rounds_total=_int(cfg.get("rounds")),
                rounds_done=0,
                config=redact(cfg),
                config_hash=config_hash(cfg),
                code_version=code_version() if live else meta.get("code_version"),
                launched_by=_who() if live else None,
                launched_on=socket.gethostname() if live else None,
                command=safe_command(sys.argv)[:4000] if live else None,
                source=self.source,
            )
        )
        self.run_id = int(res.inserted_primary_key[0])
        keys = cfg.get("node_keys")
        if keys:
            self._audit(conn, "keys_registered", now, reason=_keys_summary(keys))

    def _round(self, conn, row, now) -> None:
        rnd = int(row["round"])
        data = {k: v for k, v in row.items() if k != "clients"}
        conn.execute(
            insert(rounds).values(
                run_id=self.run_id,
                round=rnd,
                test_accuracy=_num(row.get("test_accuracy")),
                test_loss=_num(row.get("test_loss")),
                client_accuracy=_num(row.get("client_accuracy")),
                train_loss=_num(row.get("train_loss")),
                num_sampled=_int(row.get("num_sampled")),
                num_replies=_int(row.get("num_replies")),
                num_failures=_int(row.get("num_failures")),
                aggregated=bool(row.get("aggregated")),
                bytes_up=_int(row.get("bytes_up")),
                bytes_down=_int(row.get("bytes_down")),
                wall_s=_num(row.get("wall_s")),
                elapsed_s=_num(row.get("elapsed_s")),
                sim_time_s=_num(row.get("sim_time_s")),
                dp_epsilon=_num(row.get("dp_epsilon")),
                data=_json_safe(data),
            )
        )
        self.rounds_stored.add(rnd)
        items, audits = [], []
        for c in row.get("clients") or []:
            status, reason = _status(c.get("status", "pending"))
            pid = _int(c.get("partition_id"))
            nid = str(c.get("node_id")) if c.get("node_id") is not None else None
            items.append(
                {
                    "run_id": self.run_id,
                    "round": rnd,
                    "phase": c.get("phase"),
                    "partition_id": pid,
                    "node_id": nid,
                    "status": status,
                    "reason": reason,
                    "num_examples": _int(c.get("num-examples")),
                    "weight": _num(c.get("weight")),
                    "trust": _num(c.get("trust_score", c.get("trust"))),
                    "tier": str(c["tier"]) if c.get("tier") is not None else None,
                    "contribution": _num(c.get("contrib_score", c.get("contribution"))),
                    "dp_epsilon": _num(c.get("dp_epsilon")),
                    "dp_target_epsilon": _num(c.get("dp_target_epsilon")),
                    "train_time_s": _num(c.get("train_time_s")),
                    "data": _json_safe(c),
                }
            )
            if status == "rejected":
                audits.append(("update_rejected", pid, nid, reason))
            elif status == "error":
                said = f"client reports: {reason}" if reason else "client reports no reason"
                audits.append((classify_error(reason or ""), pid, nid, said))
        if items:
            conn.execute(insert(client_rounds), items)
        for kind, pid, nid, reason in audits:
            self._audit(conn, kind, now, rnd=rnd, partition_id=pid, node_id=nid, reason=reason)

    def _meta_events(self, conn, meta, now) -> None:
        for nid, why in (meta.get("nodes_refused") or {}).items():
            if str(nid) in self.refused_seen:
                continue
            self.refused_seen.add(str(nid))
            why = str(why)
            self._audit(conn, "node_refused", now, node_id=str(nid), reason=why)
            conn.execute(
                insert(node_events).values(
                    run_id=self.run_id, node_id=str(nid), kind="refused", detail=why, at_unix=now
                )
            )
        for pid, why in (meta.get("stats_refused") or {}).items():
            if str(pid) in self.stats_refused_seen:
                continue
            self.stats_refused_seen.add(str(pid))
            self._audit(conn, "stats_refused", now, partition_id=_int(pid), reason=str(why))
        resumed = meta.get("resumed") or []
        for item in resumed[self.resumes_seen :]:
            self._audit(
                conn,
                "resume",
                now,
                rnd=_int(item.get("after_round")),
                reason=f"resumed after round {item.get('after_round')} at {item.get('at')}",
            )
        self.resumes_seen = len(resumed)

    def _nodes(self, conn, nodes: dict[str, Any], now) -> None:
        items = []
        for pid, n in nodes.items():
            old = self.nodes_seen.get(str(pid))
            nid = str(n.get("node_id"))
            if old is not None and old.get("adopt"):
                pass
            elif old is None:
                items.append((pid, nid, "joined", n.get("joined_s"), ""))
            else:
                if int(n.get("failures") or 0) > int(old.get("failures") or 0):
                    items.append((pid, nid, "failed", n.get("last_failure_s"), n.get("last_error")))
                if int(n.get("rejoins") or 0) > int(old.get("rejoins") or 0):
                    items.append((pid, nid, "rejoined", n.get("rejoined_s"), ""))
                if old.get("connected", True) and not n.get("connected", True):
                    items.append((pid, nid, "disconnected", n.get("last_seen_s"), ""))
            self.nodes_seen[str(pid)] = {
                k: n.get(k) for k in ("failures", "rejoins", "connected", "last_seen_s")
            }
        if items:
            conn.execute(
                insert(node_events),
                [
                    {
                        "run_id": self.run_id,
                        "partition_id": _int(p),
                        "node_id": nid,
                        "kind": kind,
                        "at_s": _num(at),
                        "detail": str(detail or "")[:2000],
                        "at_unix": now,
                    }
                    for p, nid, kind, at, detail in items
                ],
            )

    def _versions(self, conn, best, final, fin, last, now) -> None:
        if best and best.get("round") is not None and best["round"] != self.best_round_seen:
            self.best_round_seen = best["round"]
            self._version(
                conn,
                "best",
                int(best["round"]),
                {"test_accuracy": best.get("test_accuracy"), "test_loss": best.get("test_loss")},
                now,
            )
        elif final and fin and fin.get("best_round") is not None and self.best_round_seen is None:
            self.best_round_seen = fin["best_round"]  # an imported folder: its best model
            self._version(
                conn,
                "best",
                int(fin["best_round"]),
                {"test_accuracy": fin.get("best_test_accuracy")},
                now,
            )
        if final and not self.final_done and last:
            metrics = {k: last.get(k) for k in ("test_accuracy", "test_loss", "client_accuracy")}
            self._version(conn, "final", int(last["round"]), metrics, now)

    def _version(self, conn, kind: str, rnd: int, metrics: dict[str, Any], now) -> None:
        path = self.out_dir / f"{kind}_model.pt"
        sha = size = None
        if path.is_file():
            sha, size = sha256_file(path), path.stat().st_size
        res = conn.execute(
            insert(model_versions).values(
                run_id=self.run_id,
                round=rnd,
                kind=kind,
                file=path.name if sha else None,
                sha256=sha,
                size=size,
                metrics=_json_safe(metrics),
                parent_id=self.last_version_id,
                created_unix=now,
            )
        )
        self.last_version_id = int(res.inserted_primary_key[0])

    def _audit(
        self, conn, kind, now, rnd=None, partition_id=None, node_id=None, reason=None, actor=None
    ) -> None:
        conn.execute(
            insert(audit_events).values(
                run_id=self.run_id,
                at_unix=now,
                round=rnd,
                kind=kind,
                partition_id=partition_id,
                node_id=node_id,
                reason=(reason or "")[:4000],
                actor=actor,
            )
        )


def _keys_summary(path: Any) -> str:
    """Which partition ids have a registered key (never the keys)."""
    try:
        from omegaconf import OmegaConf

        raw = OmegaConf.to_container(OmegaConf.load(Path(str(path)).expanduser()), resolve=False)
        ids = sorted(int(k) for k in raw)  # type: ignore[union-attr]
        return f"node_keys={path}: keys registered for {len(ids)} partition ids {ids[:50]}"
    except Exception as exc:
        return f"node_keys={path}: ({exc})"


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, str | bytes):
        try:
            value = value.item()
        except Exception:
            return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ---------------------------------------------------------------- the recorder's side
def open_for_run(out_dir: Path, cfg: Any) -> EventStore | None:
    """The store a run writes (None, with a warning, when it cannot be opened)."""
    try:
        url = None
        if cfg is not None and hasattr(cfg, "get"):
            url = cfg.get("events_db") or None
        if url in ("off", "none", "false"):
            return None
        return EventStore.open(Path(out_dir), url=str(url) if url else None)
    except Exception as exc:
        LOG.warning("[fedapp] event store not opened (%s); the run goes on without it", exc)
        return None


# ---------------------------------------------------------------- importing run folders
def run_folders(root: Path) -> Iterable[Path]:
    """Run folders below `root` (those with a results.json)."""
    root = Path(root)
    if (root / "results.json").is_file():
        yield root
        return
    for path in sorted(root.rglob("results.json")):
        if ".hydra" in path.parts:
            continue
        yield path.parent


def import_dir(url: str, folder: Path) -> tuple[int, int]:
    """Import every run folder below `folder` not yet in the database (and bring those still
    `running` in it up to date). Returns (imported or updated, skipped)."""
    eng = engine_for(url)
    done = skipped = 0
    for run_dir in run_folders(folder):
        run_dir = run_dir.resolve()
        results_path = run_dir / "results.json"
        try:
            stat = results_path.stat()
            with eng.connect() as conn:
                row = conn.execute(
                    select(runs.c.status, runs.c.updated_unix, runs.c.source).where(
                        runs.c.output_dir == str(run_dir)
                    )
                ).first()
            if row is not None and row.source == "live":
                # a live run whose process died: its launcher marked results.json
                if row.status != "running" or stat.st_mtime <= (row.updated_unix or 0) + 1:
                    skipped += 1
                    continue
                status = (_results_of(results_path).get("meta") or {}).get("status")
                if status and status != "running":
                    with eng.begin() as conn:
                        conn.execute(
                            update(runs)
                            .where(runs.c.output_dir == str(run_dir))
                            .values(status=status, updated_unix=stat.st_mtime)
                        )
                    done += 1
                else:
                    skipped += 1
                continue
            if row is not None and (row.updated_unix or 0) >= stat.st_mtime:
                skipped += 1
                continue
            results = _results_of(results_path)
        except (OSError, ValueError) as exc:
            LOG.warning("[fedapp] %s: not imported (%s)", results_path, exc)
            skipped += 1
            continue
        store = EventStore(url, run_dir, source="import")
        final = results.get("final") is not None
        store.record(results, final=final, now=stat.st_mtime)
        if store.failed:
            skipped += 1
        else:
            done += 1
    return done, skipped


def _results_of(path: Path) -> dict[str, Any]:
    """A run folder's results.json; ValueError when it is not a JSON object (the folder is
    then skipped and logged, never fatal to the board)."""
    results = json.loads(path.read_text())
    if not isinstance(results, dict) or not isinstance(results.get("meta", {}), dict):
        raise ValueError("results.json is not a results object")
    return results


def release_version(url: str, version_id: int, who: str) -> dict[str, Any] | None:
    """Mark a model version released by `who` now (recorded in the audit trail too)."""
    eng = engine_for(url)
    now = time.time()
    with eng.begin() as conn:
        row = conn.execute(select(model_versions).where(model_versions.c.id == version_id)).first()
        if row is None:
            return None
        conn.execute(
            update(model_versions)
            .where(model_versions.c.id == version_id)
            .values(released_by=who, released_unix=now)
        )
        conn.execute(
            insert(audit_events).values(
                run_id=row.run_id,
                at_unix=now,
                round=row.round,
                kind="version_released",
                reason=f"model version {version_id} ({row.kind}, round {row.round}, sha256 {row.sha256})",
                actor=who,
            )
        )
    return {"id": version_id, "released_by": who, "released_unix": now}


def count(conn, table: Table, *where) -> int:
    return int(conn.execute(select(func.count()).select_from(table).where(*where)).scalar() or 0)


def where_am_i() -> str:
    return f"{_who()}@{socket.gethostname()} ({platform.system()})"
