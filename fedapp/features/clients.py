"""The federation's clients and the SuperNodes that serve them.

Flower addresses SuperNodes; fedapp's strategies address clients (one data partition, or one
institution's file). The two are tied only where a node holds its own data. Everything else
is mapped here, in one place:

- **Client ids.** Strategies see client ids, `partition id + 1`, never Flower node ids. They
  do not depend on how many SuperNodes there are or on the random ids Flower gives them,
  so the same config samples the same clients whatever the federation's size.
- **Nodes with their own data** (deployment: `data-path` in the node config) serve exactly
  their own client, the `partition-id` in their node config. A restarted SuperNode gets a
  new node id from Flower; when it says it holds the same partition it is recognised as the
  same client and receives that client's messages again (`rejoins` in the status). A node
  that appears later with a partition outside the run's clients, or with none, is reported
  and not used: the run's clients are fixed at discovery.
- **Simulation nodes** (no data file) are hosts. When there is one per partition, node `i`
  serves partition `i` as before. Otherwise (Flower's local simulation has 2 SuperNodes by
  default) the clients are spread round-robin over the hosts: each message then carries a
  `fedapp.client` record naming its client, and the ClientApp's `virtual_client_mod`
  presents it as a node of its own: that partition's data, and that client's own state.
- **Per-client state** (SCAFFOLD's control, MOON's previous model, the DP ledger,
  compression residuals...) lives in files per client (`ClientStateStore`): under the run's
  `client_state/` in simulation, under the node's `state-dir` in deployment (without one, a
  deployed node keeps Flower's `Context.state`, for one run only). Not in a shared node's
  `Context.state`: Flower runs several messages for one node at once and writes the node's
  context back after each, so clients sharing a context would overwrite each other's state
  (for a DP ledger, that would under-count epsilon). One version per round, written only
  when the ClientApp succeeds (as Flower keeps a node's state of before a failed message)
  and atomically, so that a resumed server (fedapp.checkpoint) finds each client as it was
  at the checkpoint.
- **Status**: every client's node ids, last reply, failures and rejoins, for results.json.
"""

from __future__ import annotations

import math
import os
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from fedapp.core.config import ConfigError
from fedapp.core.flower_compat import recorddict_from_bytes, recorddict_to_bytes, set_src_node_id
from fedapp.core.node import natural_names
from fedapp.core.policy import REFUSED, RUN_KEY, PolicyRefusal, check_lineage, client_policy
from fedapp.features.identity import claim_refusal, new_nonce

CLIENT_RECORD = "fedapp.client"  # ConfigRecord naming the virtual client a message is for
IDENTITY_RECORD = "fedapp.identity"  # a discovery reply's signed partition claim


def client_id(partition_id: int) -> int:
    """The id strategies address partition `partition_id` by."""
    return int(partition_id) + 1


@dataclass
class NodeInfo:
    """What a SuperNode said about itself in discovery (`query` handler)."""

    partition_id: int  # -1: none given
    num_partitions: int  # the federation size it was told (-1: none)
    has_data_path: bool
    nonce: str = ""  # the discovery query's (fedapp.features.identity)
    signature: bytes = b""  # its signature of its partition claim (b"": none)
    refusal: str = ""  # why its answer is unusable (then it serves no client)

    @classmethod
    def from_metrics(
        cls, metrics: Mapping[str, Any], nonce: str = "", signature: Any = b""
    ) -> NodeInfo:
        """What a discovery answer says, or (any field of another type or range) a NodeInfo
        whose `refusal` says why it is unusable: a reply never raises here."""
        fields: dict[str, int] = {}
        for key, low in (("partition-id", -1), ("num-partitions", -1), ("has-data-path", 0)):
            value = metrics.get(key, -1 if low < 0 else 0)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or value != int(value)
                or not low <= value < MAX_PARTITION_ID
            ):
                return cls(-1, -1, False, nonce, b"", f"unusable discovery answer: {key}={value!r}")
            fields[key] = int(value)
        if fields["has-data-path"] not in (0, 1):
            return cls(-1, -1, False, nonce, b"", "unusable discovery answer: has-data-path")
        if not isinstance(signature, bytes) or len(signature) > MAX_SIGNATURE:
            return cls(-1, -1, False, nonce, b"", "unusable discovery answer: its signature")
        return cls(
            fields["partition-id"],
            fields["num-partitions"],
            bool(fields["has-data-path"]),
            nonce,
            signature,
        )


MAX_PARTITION_ID = 2**31  # beyond any federation (the federation's size bounds it further)
MAX_SIGNATURE = 4096  # bytes of a partition claim's signature (an SSH signature is ~300)


def claim_refusals(
    nodes: Mapping[int, NodeInfo], num_clients: int | None, registered: Iterable[int] = ()
) -> dict[int, str]:
    """Nodes whose partition claim cannot be taken (node id -> why): an unusable answer, a
    partition id beyond the federation (the task's partitions, the nodes that answered, the
    federation size most nodes were told, the registered node keys: the largest of these), or
    a partition id that two or more nodes holding their own data claim (none of them is used:
    taking either would let an impostor take an institution's place; node keys tell them
    apart). The run goes on with the others."""
    out = {n: i.refusal for n, i in nodes.items() if i.refusal}
    told = sorted(
        i.num_partitions for n, i in nodes.items() if n not in out and i.num_partitions > 0
    )
    lower_median = told[(len(told) - 1) // 2] if told else 0
    bound = max(num_clients or 0, len(nodes), lower_median, max(registered, default=-1) + 1)
    claims: dict[int, list[int]] = {}
    for nid, info in sorted(nodes.items()):
        if nid in out or info.partition_id < 0:
            continue
        if info.partition_id >= bound:
            out[nid] = (
                f"partition-id {info.partition_id} is beyond the federation's {bound} clients"
            )
        elif info.has_data_path:
            claims.setdefault(info.partition_id, []).append(nid)
    for pid, nids in claims.items():
        if len(nids) > 1:
            for nid in nids:
                out[nid] = (
                    f"nodes {', '.join(map(str, nids))} all claim partition-id {pid}: none of "
                    "them is used (register their keys with node_keys= to tell them apart)"
                )
    return out


@dataclass
class ClientStatus:
    """One client's life in the run (results.json `nodes`)."""

    partition_id: int
    node_id: int  # the SuperNode serving it now
    node_ids: list[int] = field(default_factory=list)  # every SuperNode that served it
    virtual: bool = False  # served through a shared simulation host
    joined_s: float = 0.0  # seconds since the run started
    last_seen_s: float | None = None  # last reply of any kind
    replies: int = 0
    failures: int = 0  # error replies (crashed, unreachable, timed out)
    refusals: int = 0  # of those, refused by the institution's policy (fedapp.core.policy)
    rejoins: int = 0  # came back (a new SuperNode, or its node reconnected)
    last_error: str = ""
    last_failure_s: float | None = None
    rejoined_s: float | None = None  # when it last came back
    connected: bool = True  # its SuperNode was connected at the last check

    # Shallow copies (the one list copied): `dataclasses.asdict` recurses field by field and
    # cost seconds per round with 10,000 clients (checkpoint and results.json, every round).
    def to_dict(self) -> dict[str, Any]:
        return {**vars(self), "node_ids": list(self.node_ids)}

    def copy(self) -> ClientStatus:
        return ClientStatus(**self.to_dict())


def query_nodes(grid: Grid, node_ids: list[int], wait_s: float) -> dict[int, NodeInfo]:
    """Ask nodes (Flower node ids) which partition they hold (one QUERY message each, with a
    fresh nonce that a node holding its own data signs: fedapp.features.identity)."""
    nonces = {nid: new_nonce() for nid in node_ids}
    msgs = [
        Message(
            RecordDict({"config": ConfigRecord({"nonce": nonces[nid]})}),
            dst_node_id=nid,
            message_type=MessageType.QUERY,
        )
        for nid in node_ids
    ]
    info: dict[int, NodeInfo] = {}
    for reply in grid.send_and_receive(msgs, timeout=wait_s):
        src = reply.metadata.src_node_id
        if reply.has_error():
            log(WARNING, "node %d did not answer the discovery query: %s", src, reply.error.reason)
            continue
        try:  # an answer of any form: refused with the reason (NodeInfo.refusal), never raised
            identity = reply.content.config_records.get(IDENTITY_RECORD)
            signature = identity.get("signature", b"") if identity is not None else b""
            metrics = reply.content.metric_records["metrics"]
            info[src] = NodeInfo.from_metrics(metrics, nonces.get(src, ""), signature)
        except Exception as exc:  # noqa: BLE001
            why = f"unusable discovery answer ({type(exc).__name__}: {str(exc)[:200]})"
            info[src] = NodeInfo(-1, -1, False, nonces.get(src, ""), b"", why)
    return info


def assign_clients(
    nodes: Mapping[int, NodeInfo], num_clients: int | None
) -> tuple[dict[int, int], set[int]]:
    """(partition id -> node id, the partitions served as virtual clients); see the module
    docstring.

    `num_clients`: the partitions the task makes (None when every node holds its own data).
    Nodes holding their own data serve their partition-id (nodes without one get the next
    free ids, in node-id order); the other partitions go to the simulation hosts.
    """
    own = {n: i for n, i in nodes.items() if i.has_data_path}
    hosts = sorted(n for n, i in nodes.items() if not i.has_data_path)
    served: dict[int, int] = {}
    for nid in sorted(own, key=lambda n: (own[n].partition_id < 0, n)):
        pid = own[nid].partition_id
        if pid < 0:
            pid = max(served, default=-1) + 1
            while pid in served:
                pid += 1
        if pid in served:
            raise ConfigError(f"nodes {served[pid]} and {nid} both claim partition-id {pid}")
        served[pid] = nid
    if not hosts:
        return served, set()
    wanted = [p for p in range(num_clients or 0) if p not in served]
    by_pid = {nodes[n].partition_id: n for n in hosts}
    if sorted(by_pid) == wanted and len(by_pid) == len(hosts):  # one host per partition
        served.update({p: by_pid[p] for p in wanted})
        return served, set()
    served.update({p: hosts[k % len(hosts)] for k, p in enumerate(wanted)})
    return served, set(wanted)


class ClientGrid(Grid):
    """The Grid strategies talk to: addressed by client id, routed to the serving SuperNode."""

    def __init__(
        self,
        grid: Grid,
        nodes: Mapping[int, NodeInfo],
        num_clients: int | None,
        state_dir: Path,
        *,
        query_timeout_s: float = 30.0,
        rediscover_every_s: float = 2.0,
        lineage: str | None = None,
        history: Mapping[str, int] | None = None,
        node_keys: Mapping[int, Any] | None = None,
    ) -> None:
        self.grid = grid
        self.nodes = dict(nodes)  # every node ever seen (Flower node id -> what it said)
        self.num_clients = num_clients
        self.state_dir = Path(state_dir)
        self.query_timeout_s = float(query_timeout_s)
        # Client state versions: this server run's token, and the earlier runs of a resumed
        # chain with the last round of each that is kept (fedapp.checkpoint).
        self.lineage = lineage or uuid.uuid4().hex[:12]
        self.history = dict(history or {})
        self.rediscover_every_s = float(rediscover_every_s)
        self._t0 = time.monotonic()
        self.started_unix = time.time()  # the `*_s` times in the status count from here
        self._last_check = -float("inf")
        self.node_keys = node_keys
        self.ignored: dict[int, str] = {}  # node id -> why it is not used
        for nid, info in sorted(nodes.items()):
            why = info.refusal or self._identity_refusal(info)
            if why:
                self.ignored[nid] = why
                log(WARNING, "[fedapp] node %d refused: %s", nid, why)
        nodes = {n: i for n, i in nodes.items() if n not in self.ignored}
        registered = [int(p) for p in (node_keys or {})]
        for nid, why in sorted(claim_refusals(nodes, num_clients, registered).items()):
            self.ignored[nid] = why
            log(WARNING, "[fedapp] node %d refused: %s", nid, why)
        nodes = {n: i for n, i in nodes.items() if n not in self.ignored}
        served, virtual = assign_clients(nodes, num_clients)
        self.status = {
            client_id(p): ClientStatus(
                partition_id=p, node_id=n, node_ids=[n], virtual=p in virtual
            )
            for p, n in sorted(served.items())
        }
        self._sent: dict[str, int] = {}  # message id -> client id
        self._retry_at: dict[int, float] = {}  # new nodes that did not answer: ask again then
        self._connected: set[int] = set(nodes)
        if virtual:
            log(
                INFO,
                "[fedapp] %d clients on %d SuperNodes (virtual clients, their state in %s)",
                len(served),
                len({*served.values()}),
                self.state_dir,
            )

    # -- the clients -------------------------------------------------------------------------
    @property
    def node_partitions(self) -> dict[int, int]:
        """client id -> partition id (what strategies bind to)."""
        return {cid: s.partition_id for cid, s in self.status.items()}

    def _elapsed(self) -> float:
        return round(time.monotonic() - self._t0, 3)

    def refresh(self, force: bool = False) -> None:
        """Which SuperNodes are connected now; recognise restarted ones (at most every
        `rediscover_every_s`). Bounded: one discovery query with `query_timeout_s`."""
        now = time.monotonic()
        if not force and now - self._last_check < self.rediscover_every_s:
            return
        self._last_check = now
        connected = set(self.grid.get_node_ids())
        waiting = {n for n, t in self._retry_at.items() if t > now}
        new = sorted(connected - set(self.nodes) - set(self.ignored) - waiting)
        if new:
            info = query_nodes(self.grid, new, self.query_timeout_s)
            for nid in new:
                if nid in info:
                    self._retry_at.pop(nid, None)
                    self._adopt(nid, info[nid])
                else:  # asked again later, not at every message (each ask can take a while)
                    self._retry_at[nid] = time.monotonic() + max(30.0, self.query_timeout_s)
        self._connected = connected
        for s in self.status.values():
            back = s.node_id in connected
            if back and not s.connected:  # e.g. an authenticated node restarted: same node id
                s.rejoins += 1
                s.rejoined_s = self._elapsed()
                log(
                    INFO,
                    "[fedapp] client %d's node %d is connected again",
                    s.partition_id,
                    s.node_id,
                )
            elif s.connected and not back:
                log(WARNING, "[fedapp] client %d's node %d disconnected", s.partition_id, s.node_id)
            s.connected = back

    def _identity_refusal(self, info: NodeInfo) -> str | None:
        """Why a node may not serve the partition it claims (fedapp.features.identity); None: it may.
        With a registry of node keys every node must prove a registered partition id: a
        simulation host or a node without a partition id would otherwise be handed the
        registered institutions' partitions (or the unclaimed ones) without any proof."""
        if self.node_keys is not None and (not info.has_data_path or info.partition_id < 0):
            return (
                "node_keys is set: only nodes holding their own data and claiming a registered "
                "partition-id (signed with its key) may join"
            )
        if not info.has_data_path or info.partition_id < 0:
            return None
        return claim_refusal(self.node_keys, info.partition_id, info.nonce, info.signature)

    def _adopt(self, nid: int, info: NodeInfo) -> None:
        """A SuperNode that connected after discovery: the same institution back, or not ours."""
        self.nodes[nid] = info
        why = info.refusal or self._identity_refusal(info)
        if why:
            self.ignored[nid] = why
            log(WARNING, "[fedapp] node %d refused: %s", nid, why)
            return
        cid = client_id(info.partition_id)
        status = self.status.get(cid)
        if not info.has_data_path or info.partition_id < 0 or status is None or status.virtual:
            why = (
                f"partition-id {info.partition_id} with its own data file is not one of the "
                f"{len(self.status)} clients the run started with (fixed at discovery)"
                if info.has_data_path
                else "a simulation node that joined after discovery"
            )
            self.ignored[nid] = why
            log(WARNING, "[fedapp] node %d ignored: %s", nid, why)
            return
        old = status.node_id
        status.node_id = nid
        status.node_ids.append(nid)
        status.rejoins += 1
        status.rejoined_s = self._elapsed()
        status.connected = True
        log(
            INFO,
            "[fedapp] client %d (partition %d) rejoined on node %d (was node %d)",
            cid,
            info.partition_id,
            nid,
            old,
        )

    def client_record(self, status: ClientStatus) -> ConfigRecord:
        """What a message tells the ClientApp about its client: for simulation clients their
        partition and the run's state folder; for every client the state lineage (see
        `ClientStateStore`)."""
        values: dict = {
            "lineage": self.lineage,
            "lineages": list(self.history) or [""],
            "lineage-upto": list(self.history.values()) or [-1],
        }
        if not self.nodes[status.node_id].has_data_path:
            values.update(
                {
                    "partition-id": status.partition_id,
                    "num-partitions": int(self.num_clients or 0),
                    "state-dir": str(self.state_dir),
                }
            )
        return ConfigRecord(values)

    # -- Grid API ----------------------------------------------------------------------------
    @property
    def run(self):
        return self.grid.run

    def set_run(self, run_id) -> None:
        self.grid.set_run(run_id)

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        """Client ids whose SuperNode is connected."""
        self.refresh()
        return [cid for cid, s in self.status.items() if s.node_id in self._connected]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        self.refresh()
        routed, cids = [], []
        for msg in messages:
            cid = msg.metadata.dst_node_id
            status = self.status.get(cid)
            if status is None:
                raise ValueError(f"no client {cid} in this run")
            content = RecordDict(dict(msg.content.items()))  # strategies share one per round
            content[CLIENT_RECORD] = self.client_record(status)
            routed.append(
                Message(
                    content,
                    dst_node_id=status.node_id,
                    message_type=msg.metadata.message_type,
                    ttl=msg.metadata.ttl,
                    group_id=msg.metadata.group_id,
                )
            )
            cids.append(cid)
        ids = list(self.grid.push_messages(routed))
        for mid, cid in zip(ids, cids, strict=True):
            self._sent[mid] = cid
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self.grid.pull_messages(message_ids))
        for reply in replies:
            cid = self._sent.pop(reply.metadata.reply_to_message_id, None)
            if cid is None:
                continue
            set_src_node_id(reply, cid)
            status = self.status[cid]
            status.last_seen_s = self._elapsed()
            if reply.has_error():
                status.failures += 1
                status.refusals += int(REFUSED in reply.error.reason)
                status.last_error = reply.error.reason[:300]
                status.last_failure_s = status.last_seen_s
            else:
                status.replies += 1
        return replies

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push, then collect replies until all are in or `timeout` seconds passed (None:
        the grid's query timeout; never unbounded)."""
        limit = self.query_timeout_s if timeout is None else float(timeout)
        pending = set(self.push_messages(messages))
        deadline = time.monotonic() + limit
        replies: list[Message] = []
        while pending:
            got = list(self.pull_messages(pending))
            replies.extend(got)
            pending -= {r.metadata.reply_to_message_id for r in got}
            if not pending or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        for mid in pending:  # late replies are ignored, as in Flower
            cid = self._sent.pop(mid, None)
            if cid is not None:
                self.status[cid].failures += 1
                self.status[cid].last_error = f"no reply within {limit:.0f}s"
                self.status[cid].last_failure_s = self._elapsed()
        return replies

    def state(self) -> dict[int, ClientStatus]:
        return {cid: s.copy() for cid, s in self.status.items()}

    def restore(self, saved: Mapping[int, ClientStatus]) -> None:
        """A resumed run: each client's history so far, then the SuperNode serving it now."""
        for cid, now in self.status.items():
            old = saved.get(cid)
            if old is None:
                continue
            for name in (
                "replies",
                "failures",
                "refusals",
                "rejoins",
                "last_error",
                "last_failure_s",
            ):
                setattr(now, name, getattr(old, name))
            now.node_ids = [*old.node_ids, *(n for n in now.node_ids if n not in old.node_ids)]

    def report(self) -> dict[str, dict]:
        """results.json `nodes`: per client (by partition id), its SuperNodes and history."""
        try:
            self.refresh(force=True)
        except Exception as exc:  # the SuperLink may be gone; the numbers must still be written
            log(WARNING, "[fedapp] could not check the SuperNodes at the end: %s", exc)
        out = {str(s.partition_id): s.to_dict() for s in self.status.values()}
        lost = [s.partition_id for s in self.status.values() if not s.connected]
        if lost:
            log(WARNING, "[fedapp] clients whose SuperNode is gone at the end: %s", lost)
        return out


# -- client side ----------------------------------------------------------------------------
LEDGER_PREFIX = (
    "fedapp.dp"  # privacy ledgers: never rolled back (fedapp.features.privacy.STATE_KEY)
)


class ClientStateStore:
    """One client's persistent state in files, one version per server round.

    A message of round r runs with the newest *valid* version of round <= r and, if the
    ClientApp succeeds, writes version r. Valid: written by this server run (`lineage`), or by
    an earlier run of a resumed chain up to the round it was resumed from (`history`: lineage
    -> last round kept). So when a server dies after round k's checkpoint while clients already
    trained in round k+1, the resumed run's round k+1 starts from the state as of round k, as
    the uninterrupted run did. Privacy ledgers are the exception: whatever a client released
    stays spent, so they live in one file that only moves forward.
    """

    def __init__(self, root: str | Path, partition_id: int, lineage: str, history: dict[str, int]):
        self.dir = Path(root) / f"client-{partition_id}"
        self.lineage = lineage
        self.history = dict(history)

    def _versions(self) -> list[tuple[int, str, Path]]:
        out = []
        for path in self.dir.glob("r*-*.state"):
            rnd, _, lineage = path.stem[1:].partition("-")
            if rnd.isdigit():
                out.append((int(rnd), lineage, path))
        return sorted(out)

    def _valid(self, rnd: int, lineage: str) -> bool:
        return lineage == self.lineage or rnd <= self.history.get(lineage, -1)

    def load(self, server_round: int) -> RecordDict:
        candidates = [
            (r, path)
            for r, lineage, path in self._versions()
            if r <= server_round and self._valid(r, lineage)
        ]
        state = (
            recorddict_from_bytes(candidates[-1][1].read_bytes()) if candidates else RecordDict()
        )
        ledger = self.dir / "ledger.state"
        if ledger.is_file():
            for name, record in recorddict_from_bytes(ledger.read_bytes()).items():
                state[name] = record
        return state

    def save(self, state: RecordDict, server_round: int) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        ledger = RecordDict({k: v for k, v in state.items() if k.startswith(LEDGER_PREFIX)})
        rest = RecordDict({k: v for k, v in state.items() if not k.startswith(LEDGER_PREFIX)})
        if len(ledger):
            _write_atomic(self.dir / "ledger.state", recorddict_to_bytes(ledger))
        _write_atomic(
            self.dir / f"r{server_round:06d}-{self.lineage}.state", recorddict_to_bytes(rest)
        )
        valid = [path for r, lineage, path in self._versions() if self._valid(r, lineage)]
        keep = set(valid[-2:])  # this round's and the one before (a resume may go back one)
        for _, _, path in self._versions():
            if path not in keep:
                path.unlink(missing_ok=True)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # atomic: a crash leaves the previous file


def virtual_client_mod(msg: Message, context: Context, call_next) -> Message:
    """ClientApp mod: run a message as its client (see the module docstring), under the
    client's own configuration.

    A message for a virtual client runs as if its node were that client's own (its partition
    in the node config, and in simulation its policy from `$FEDAPP_CLIENT_POLICY`,
    `fedapp.core.policy.client_policy`); a client's state comes from its files rather than the
    node's `Context.state`, so it is the client's own and survives the server. A node holding
    its own data (deployment) takes no partition id and no folder from a message (a message
    that names one is refused): its state lives under the `state-dir` of its node config
    (without one it keeps `Context.state`, lost when the run ends). A simulated client's state
    lives under its policy's `state-dir`, else the run's folder named by the server."""
    rec = msg.content.config_records.get(CLIENT_RECORD)
    if rec is not None:
        del msg.content[CLIENT_RECORD]
    node_config = dict(context.node_config)
    deployed = bool(node_config.get("data-path"))
    named = {k for k in ("partition-id", "num-partitions", "state-dir") if rec and k in rec}
    if deployed and named:
        raise PolicyRefusal(
            f"this node holds its own data: it takes no {', '.join(sorted(named))} from the "
            "server (they come from its node config)"
        )
    if rec is not None and "partition-id" in rec:
        node_config.update(
            {"partition-id": int(rec["partition-id"]), "num-partitions": int(rec["num-partitions"])}
        )
    if not deployed:  # simulation: this client's policy, as a deployed node's own keys
        pid = int(node_config.get("partition-id", -1))
        extra = client_policy(pid, lambda: natural_names(context, node_config, pid))
        dp_keys = sorted(k for k in ("max-epsilon", "require-dp", "target-epsilon") if k in extra)
        if dp_keys and not (extra.get("ledger-dir") or extra.get("dp-state-dir")):
            # its ledger would otherwise live in the state folder the server names
            raise PolicyRefusal(
                f"client {pid}'s policy sets {', '.join(dp_keys)} but no ledger-dir: give it "
                "one (in $FEDAPP_CLIENT_POLICY), where its DP ledger is kept across runs"
            )
        node_config.update({k: v for k, v in extra.items() if k not in _IDENTITY_KEYS})
    if rec is None:
        return call_next(msg, _with(context, node_config, context.state, context.run_config))
    lineage = check_lineage(rec["lineage"])
    lineages = [check_lineage(x) for x in rec["lineages"]]
    history = dict(zip(lineages, [int(u) for u in rec["lineage-upto"]], strict=True))
    run_config = {**context.run_config, RUN_KEY: next((x for x in lineages if x), lineage)}
    state_dir = str(node_config.get("state-dir") or ("" if deployed else rec.get("state-dir", "")))
    if not state_dir:
        return call_next(msg, _with(context, node_config, context.state, run_config))
    store = ClientStateStore(state_dir, int(node_config.get("partition-id", -1)), lineage, history)
    config = msg.content.config_records.get("config")
    server_round = int(config.get("server-round", 0)) if config is not None else 0
    client = _with(context, node_config, store.load(server_round), run_config)
    reply = call_next(msg, client)
    if not reply.has_error():
        store.save(client.state, server_round)
    return reply


_IDENTITY_KEYS = ("partition-id", "num-partitions", "data-path")


def _with(context: Context, node_config: dict, state: RecordDict, run_config) -> Context:
    return Context(
        run_id=context.run_id,
        node_id=context.node_id,
        node_config=node_config,
        state=state,
        run_config=run_config,
    )
