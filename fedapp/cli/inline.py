"""Run the fedapp ServerApp and ClientApp in one process, without SuperLink or Ray.

Why this exists: a Flower simulation (`fedapp-run`, `flwr run`) starts a SuperLink, a
simulation process and a Ray cluster, about 30-40 s per run on two cores before the first
round. Benchmarks that compare many strategies x attacks x seeds would spend most of their
time starting up. Flower has no lightweight in-process engine, so this module provides the
smallest one that keeps every line of *our* code identical: the same `ServerApp` main, the
same strategies, the same `ClientApp` handlers, called through a `Grid` implementation that
delivers each message to the ClientApp in this process (a copy of it, as a real transport
would) and turns a raised exception into an error reply, as Flower does. Same seed, same
config -> the same global models as `fedapp-run` (tested in tests/test_e2e.py).

Like Flower, a ClientApp that raises leaves its node's `Context.state` as it was before the
message. What it does not model: process isolation, timeouts and concurrency between clients.
Use `fedapp-run` (simulation) or `fedapp-federation` (SuperLink + SuperNodes) for those.

    fedapp-inline strategy=trust attack=label_flip attack.fraction=0.3 rounds=5
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
import time
import traceback
from collections.abc import Iterable, Sequence
from logging import WARNING
from pathlib import Path

from flwr.app import Context, Error, Message, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from fedapp.checks import compose
from fedapp.cli.launch import client_env
from fedapp.core.config import (
    ConfigError,
    parse_overrides,
    resolve_data_dir,
    resolve_output_dir,
    run_config_values,
    with_keys,
)
from fedapp.core.flower_compat import (
    SUPERLINK_NODE_ID,
    ErrorCode,
    set_message_id,
    set_task_identity,
)
from fedapp.server_app import RunFailed
from tasks.base import DataError

RUN_ID = 1


class InlineGrid(Grid):
    """A Grid whose nodes are ClientApp calls in this process (one Context per node)."""

    def __init__(self, client_app, contexts: dict[int, Context]) -> None:
        self.client_app = client_app
        self.contexts = contexts
        self._replies: dict[str, Message] = {}
        self._next = 0

    # -- Grid API ---------------------------------------------------------------------------
    def set_run(self, run) -> None:  # the run is fixed at construction
        pass

    @property
    def run(self):
        raise NotImplementedError("InlineGrid has no SuperLink run object")

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            self._next += 1
            msg_id = f"inline-{self._next}"
            set_message_id(msg, msg_id)
            self._replies[msg_id] = self._deliver(msg)
            ids.append(msg_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None):
        return list(self.pull_messages(self.push_messages(messages)))

    # -- delivery ----------------------------------------------------------------------------
    def _deliver(self, msg: Message) -> Message:
        dst = msg.metadata.dst_node_id
        context = self.contexts.get(dst)
        if context is None:
            return Message(Error(ErrorCode.NODE_UNAVAILABLE, f"no node {dst}"), reply_to=msg)
        incoming = copy.deepcopy(msg)  # the client gets its own copy, as over a real transport
        state = copy.deepcopy(context.state)
        set_task_identity(node_id=dst)
        try:
            reply = self.client_app(incoming, context)
            return Message(reply.content, reply_to=msg)
        except Exception as exc:  # what Flower's runtime does with a raising ClientApp
            context.state = state  # Flower keeps the node state of before the message
            log(WARNING, "node %d raised %s: %s", dst, type(exc).__name__, exc)
            reason = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}"
            return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=msg)
        finally:
            set_task_identity(node_id=SUPERLINK_NODE_ID)


@contextlib.contextmanager
def _environment(values: dict[str, str]):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_inline(
    overrides: str | Sequence[str] | None = None,
    output_dir: Path | str | None = None,
    nodes: int | None = None,
) -> Path:
    """Run one job of the composed config in this process; return its output folder.

    `nodes`: how many in-process SuperNodes serve the clients (default:
    `simulation.num_supernodes`, else one per partition;
    fewer makes the server spread virtual clients over them, as on Flower's default
    2-SuperNode local simulation)."""
    from fedapp.client_app import app as client_app
    from fedapp.server_app import app as server_app
    from tasks import get_task

    ovr = parse_overrides(overrides)
    cfg = compose(ovr)
    data_dir = resolve_data_dir(cfg)
    out = resolve_output_dir(cfg, {"output-dir": str(output_dir) if output_dir else ""})
    cfg, ovr = with_keys(cfg, ovr, out)
    run_config = run_config_values(ovr, out, data_dir)
    n = nodes or int(cfg.simulation.get("num_supernodes") or 0)  # as fedapp-run sizes it
    n = n or get_task(cfg, data_dir).num_partitions()
    contexts = {
        # Node ids that are not partition ids, as in Flower, so nothing can confuse the two.
        10_000 + 7 * p: Context(
            run_id=RUN_ID,
            node_id=10_000 + 7 * p,
            node_config={"partition-id": p, "num-partitions": n},
            state=RecordDict(),
            run_config=dict(run_config),
        )
        for p in range(n)
    }
    set_task_identity(run_id=RUN_ID, task_id=1, node_id=SUPERLINK_NODE_ID)
    server_context = Context(RUN_ID, SUPERLINK_NODE_ID, {}, RecordDict(), dict(run_config))
    t0 = time.perf_counter()
    with _environment(client_env(ovr)):  # the in-process clients' own side
        server_app(InlineGrid(client_app, contexts), server_context)
    print(
        f"[fedapp] inline run done in {time.perf_counter() - t0:.0f}s: results in {out}", flush=True
    )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fedapp-inline",
        description="Run one fedapp job in this process (no SuperLink/Ray; for fast sweeps). "
        "Arguments are Hydra overrides.",
    )
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--output-dir", default=None)
    parser.add_argument(
        "--nodes",
        type=int,
        default=None,
        help="in-process SuperNodes (default: simulation.num_supernodes, else one per client)",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of setup errors")
    args = parser.parse_args(argv)
    try:
        out = run_inline(args.overrides, args.output_dir, args.nodes)
    except (DataError, ConfigError) as err:  # the message says what to change
        if args.debug:
            raise
        print(f"fedapp: {err}", file=sys.stderr)
        return 2
    except RunFailed as err:
        print(f"fedapp: the run failed: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # results.json says `interrupted` and how to resume
        print(
            "fedapp: interrupted; results.json meta.status_detail says how to resume",
            file=sys.stderr,
        )
        return 130
    return exit_code(out)


def exit_code(out: Path) -> int:
    """0 for a completed or degraded run (a degraded one is reported), 1 for a failed one."""
    import json

    meta = json.loads((out / "results.json").read_text())["meta"]
    if meta["status"] == "degraded":
        print(f"fedapp: the run is degraded: {meta['status_detail']}", file=sys.stderr)
    return 1 if meta["status"] == "failed" else 0


if __name__ == "__main__":
    raise SystemExit(main())
