"""Node discovery and the client <-> SuperNode mapping (fedapp.features.clients): partition ids come from
the nodes, virtual clients spread over simulation nodes, restarted nodes recognised."""

from __future__ import annotations

import time

import pytest
from flwr.app import (
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from fedapp.core.config import ConfigError
from fedapp.core.flower_compat import ErrorCode, set_message_id, set_task_identity
from fedapp.features.clients import (
    CLIENT_RECORD,
    ClientGrid,
    assign_clients,
    client_id,
    virtual_client_mod,
)
from fedapp.server_app import discover_nodes


class QueryGrid:
    """A grid whose nodes answer the discovery QUERY from their node config."""

    def __init__(self, node_configs: dict[int, dict]):
        self.node_configs = node_configs
        self.mute: set[int] = set()  # nodes that never answer the discovery query
        self.asked: list[int] = []

    def get_node_ids(self):
        return list(self.node_configs)

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for msg in messages:
            self.asked.append(msg.metadata.dst_node_id)
            if msg.metadata.dst_node_id in self.mute:
                continue
            nc = self.node_configs[msg.metadata.dst_node_id]
            set_task_identity(node_id=msg.metadata.dst_node_id)
            metrics = {
                "partition-id": nc.get("partition-id", -1),
                "num-partitions": nc.get("num-partitions", -1),
                "has-data-path": int("data-path" in nc),
            }
            replies.append(Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg))
        set_task_identity(node_id=0)
        return replies


def _info(grid, nids=None):
    return discover_nodes(grid, min_nodes=len(nids or grid.node_configs), wait_s=5)


def test_discovery_reads_what_each_node_holds():
    grid = QueryGrid({900 + p: {"partition-id": p, "num-partitions": 5} for p in range(5)})
    info = discover_nodes(grid, min_nodes=3, wait_s=5)
    said = {n: (i.partition_id, i.num_partitions, i.has_data_path) for n, i in info.items()}
    assert said == {900 + p: (p, 5, False) for p in range(5)}
    nonces = [i.nonce for i in info.values()]  # each query its own fresh nonce (identity)
    assert len(set(nonces)) == 5 and all(len(n) == 64 for n in nonces)


def test_one_simulation_node_per_partition_serves_its_own_partition():
    grid = QueryGrid({900 + p: {"partition-id": p, "num-partitions": 5} for p in range(5)})
    served, virtual = assign_clients(_info(grid), num_clients=5)
    assert served == {p: 900 + p for p in range(5)} and virtual == set()


def test_flowers_default_two_supernodes_serve_every_client_as_virtual_clients():
    """Flower's local simulation has 2 SuperNodes; 201 FEMNIST writers are spread over them
    (the federation's size is no longer tied to the partitioning's)."""
    grid = QueryGrid(
        {5: {"partition-id": 0, "num-partitions": 2}, 3: {"partition-id": 1, "num-partitions": 2}}
    )
    info = discover_nodes(grid, min_nodes=20, wait_s=600)  # 2 of 2: no waiting for 20
    served, virtual = assign_clients(info, num_clients=201)
    assert virtual == set(range(201))
    assert [served[p] for p in range(4)] == [3, 5, 3, 5]  # round-robin over sorted node ids


def test_deployment_nodes_with_own_data_serve_their_partition_id():
    grid = QueryGrid(
        {
            7: {"data-path": "/x", "partition-id": 1, "num-partitions": 2},
            8: {"data-path": "/y", "partition-id": 0, "num-partitions": 2},
            9: {"data-path": "/z"},  # none given: the next free id
        }
    )
    served, virtual = assign_clients(_info(grid), num_clients=None)
    assert served == {0: 8, 1: 7, 2: 9} and virtual == set()


def test_two_nodes_with_their_own_data_cannot_claim_one_partition(tmp_path):
    """A duplicate claim is refused and recorded (neither claimant serves it: taking either
    would let an impostor take an institution's place); the run goes on with the others."""
    grid = QueryGrid(
        {
            1: {"data-path": "/x", "partition-id": 0, "num-partitions": 3},
            2: {"data-path": "/y", "partition-id": 0, "num-partitions": 3},
            3: {"data-path": "/z", "partition-id": 1, "num-partitions": 3},
        }
    )
    info = _info(grid)
    with pytest.raises(ConfigError, match="both claim"):  # the mapping itself never picks one
        assign_clients(info, num_clients=None)
    clients = ClientGrid(grid, info, None, tmp_path / "s")
    assert clients.node_partitions == {client_id(1): 1}
    assert set(clients.ignored) == {1, 2}
    assert "all claim partition-id 0" in clients.ignored[1]


@pytest.mark.parametrize(
    "answer, why",
    [
        ({"partition-id": 10**9, "num-partitions": 3, "has-data-path": 1}, "beyond the federation"),
        ({"partition-id": 2**40, "num-partitions": 3, "has-data-path": 1}, "partition-id="),
        ({"partition-id": 0.5, "num-partitions": 3, "has-data-path": 1}, "partition-id=0.5"),
        ({"partition-id": float("nan"), "has-data-path": 1}, "partition-id=nan"),
        ({"partition-id": -7, "has-data-path": 1}, "partition-id=-7"),
        ({"partition-id": [1, 2], "has-data-path": 1}, "partition-id=[1, 2]"),
        ({"partition-id": 1, "num-partitions": 3, "has-data-path": 5}, "has-data-path"),
    ],
)
def test_an_unusable_discovery_answer_is_refused_and_the_run_goes_on(tmp_path, answer, why):
    """A partition id bounded by the federation (a huge one would make the server build that
    many per-client profiles), of integer value, and fields of the right type: else the node is
    refused with the reason (meta.nodes_refused), and the honest nodes serve their clients."""
    from fedapp.features.clients import NodeInfo

    honest = {
        n: NodeInfo.from_metrics({"partition-id": n - 1, "num-partitions": 3, "has-data-path": 1})
        for n in (1, 2)
    }
    nodes = {**honest, 9: NodeInfo.from_metrics(answer)}
    clients = ClientGrid(QueryGrid({}), nodes, None, tmp_path / "s")
    assert clients.node_partitions == {client_id(0): 0, client_id(1): 1}
    assert why in clients.ignored[9]


def test_a_discovery_reply_of_any_form_never_raises():
    from fedapp.features.clients import IDENTITY_RECORD, query_nodes

    class OddGrid(QueryGrid):
        def send_and_receive(self, messages, timeout=None):
            out = []
            bodies = [
                RecordDict({"other": MetricRecord({"partition-id": 0})}),  # no "metrics"
                RecordDict(
                    {
                        "metrics": MetricRecord({"partition-id": 0, "has-data-path": 1}),
                        IDENTITY_RECORD: ConfigRecord({"signature": 10**12}),  # not bytes
                    }
                ),
                RecordDict({"metrics": ConfigRecord({"partition-id": "zero"})}),
            ]
            for msg, body in zip(messages, bodies, strict=True):
                set_task_identity(node_id=msg.metadata.dst_node_id)
                out.append(Message(body, reply_to=msg))
            set_task_identity(node_id=0)
            return out

    info = query_nodes(OddGrid({}), [11, 12, 13], wait_s=1)
    assert all(i.refusal and i.partition_id == -1 for i in info.values()), info


def test_too_few_nodes_times_out_with_a_clear_error():
    grid = QueryGrid({1: {"data-path": "/x", "partition-id": 0, "num-partitions": 3}})
    with pytest.raises(ConfigError, match="only 1 SuperNodes"):
        discover_nodes(grid, min_nodes=3, wait_s=1.5)


class RoutingGrid(QueryGrid):
    """QueryGrid plus push/pull: a node answers a train message with its node id, the
    partition it was asked to serve, and, for virtual clients, the state-dir it was given."""

    def __init__(self, node_configs):
        super().__init__(node_configs)
        self.replies = {}
        self.pushed = []
        self.down = set()
        self.n = 0

    def get_node_ids(self):
        return [n for n in self.node_configs if n not in self.down]

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            self.n += 1
            set_message_id(msg, f"m{self.n}")
            self.pushed.append(msg)
            nid = msg.metadata.dst_node_id
            set_task_identity(node_id=nid)
            if nid in self.down:
                reply = Message(Error(ErrorCode.NODE_UNAVAILABLE, "gone"), reply_to=msg)
            else:
                rec = msg.content.config_records.get(CLIENT_RECORD)
                own = self.node_configs[nid]["partition-id"]
                pid = rec["partition-id"] if "partition-id" in (rec or {}) else own
                reply = Message(
                    RecordDict({"metrics": MetricRecord({"node": nid, "pid": pid})}),
                    reply_to=msg,
                )
            set_task_identity(node_id=0)
            self.replies[f"m{self.n}"] = reply
            ids.append(f"m{self.n}")
        return ids

    def pull_messages(self, ids):
        return [self.replies.pop(i) for i in list(ids) if i in self.replies]


def _train(cids):
    content = RecordDict({"config": ConfigRecord({"lr": 0.1})})  # shared, as strategies do
    return [Message(content, dst_node_id=c, message_type=MessageType.TRAIN) for c in cids]


def test_client_grid_routes_by_client_and_stamps_replies_with_the_client(tmp_path):
    grid = RoutingGrid({5: {"partition-id": 0, "num-partitions": 2}, 3: {"partition-id": 1}})
    clients = ClientGrid(grid, _info(grid), num_clients=5, state_dir=tmp_path)
    assert clients.node_partitions == {client_id(p): p for p in range(5)}
    assert sorted(clients.get_node_ids()) == [client_id(p) for p in range(5)]
    replies = clients.send_and_receive(_train([client_id(p) for p in (4, 0, 1)]), timeout=5)
    got = {r.metadata.src_node_id: dict(r.content["metrics"]) for r in replies}
    assert got == {
        client_id(4): {"node": 3, "pid": 4},
        client_id(0): {"node": 3, "pid": 0},
        client_id(1): {"node": 5, "pid": 1},
    }
    # each client got its own record; the strategy's shared content was left as it was
    assert [m.content[CLIENT_RECORD]["partition-id"] for m in grid.pushed] == [4, 0, 1]
    assert CLIENT_RECORD not in _train([1])[0].content
    assert clients.report()["4"]["replies"] == 1


def test_a_restarted_deployment_node_is_recognised_as_the_same_client(tmp_path):
    configs = {
        11: {"data-path": "/a", "partition-id": 0, "num-partitions": 2},
        12: {"data-path": "/b", "partition-id": 1, "num-partitions": 2},
    }
    grid = RoutingGrid(configs)
    clients = ClientGrid(grid, _info(grid), None, tmp_path, rediscover_every_s=0)
    grid.down.add(12)  # killed: Flower answers its messages with NODE_UNAVAILABLE
    replies = clients.send_and_receive(_train([client_id(0), client_id(1)]), timeout=5)
    assert sorted(r.has_error() for r in replies) == [False, True]
    assert clients.get_node_ids() == [client_id(0)]
    configs[13] = dict(configs[12])  # restarted: a new node id, the same institution
    configs[14] = {"data-path": "/c", "partition-id": 7, "num-partitions": 2}  # not ours
    assert sorted(clients.get_node_ids()) == [client_id(0), client_id(1)]
    (reply,) = clients.send_and_receive(_train([client_id(1)]), timeout=5)
    assert dict(reply.content["metrics"]) == {"node": 13, "pid": 1}
    status = clients.report()["1"]
    assert status["node_ids"] == [12, 13] and status["rejoins"] == 1
    assert status["failures"] == 1 and status["replies"] == 1 and status["connected"]
    assert 14 in clients.ignored and "not one of the 2 clients" in clients.ignored[14]


def test_a_new_node_that_does_not_answer_is_not_asked_at_every_message(tmp_path):
    grid = RoutingGrid({1: {"data-path": "/a", "partition-id": 0, "num-partitions": 1}})
    clients = ClientGrid(grid, _info(grid), None, tmp_path, rediscover_every_s=0)
    grid.node_configs[2] = {"data-path": "/b", "partition-id": 0}
    grid.mute.add(2)
    grid.asked.clear()
    for _ in range(5):
        clients.send_and_receive(_train([client_id(0)]), timeout=1)
    assert grid.asked.count(2) == 1 and 2 not in clients.nodes
    assert clients.status[client_id(0)].node_id == 1


def test_a_client_that_never_answers_is_not_waited_for(tmp_path):
    grid = RoutingGrid({1: {"data-path": "/a", "partition-id": 0, "num-partitions": 1}})
    clients = ClientGrid(grid, _info(grid), None, tmp_path)
    grid.push_messages = lambda msgs: [f"lost-{i}" for i, _ in enumerate(msgs)]  # no reply
    start = time.monotonic()
    assert clients.send_and_receive(_train([client_id(0)]), timeout=0.5) == []
    assert time.monotonic() - start < 3
    assert clients.report()["0"]["failures"] == 1


def _send(node, handler, tmp_path, pid, rnd, *, fail=False, lineage="a", history=None):
    content = RecordDict({"config": ConfigRecord({"fail": fail, "server-round": rnd})})
    history = history or {}
    content[CLIENT_RECORD] = ConfigRecord(
        {
            "partition-id": pid,
            "num-partitions": 9,
            "state-dir": str(tmp_path),
            "lineage": lineage,
            "lineages": list(history) or [""],
            "lineage-upto": list(history.values()) or [-1],
        }
    )
    msg = Message(content, dst_node_id=5, message_type=MessageType.TRAIN)
    set_message_id(msg, f"x{pid}{rnd}{fail}{lineage}")
    set_task_identity(node_id=5)
    try:
        return dict(virtual_client_mod(msg, node, handler).content["m"])
    finally:
        set_task_identity(node_id=0)


def _counting_handler(msg, context):
    """Counts its messages in its state, and DP 'spending' in a ledger record."""
    seen = context.node_config["partition-id"]
    count = context.state.config_records.get("c", ConfigRecord({"n": 0}))["n"]
    spent = context.state.config_records.get("fedapp.dp", ConfigRecord({"eps": 0.0}))["eps"]
    context.state["c"] = ConfigRecord({"n": count + 1})
    context.state["fedapp.dp"] = ConfigRecord({"eps": spent + 1.0})
    if msg.content["config"]["fail"]:
        raise RuntimeError("crash")
    return Message(
        RecordDict({"m": MetricRecord({"pid": seen, "n": count + 1, "eps": spent + 1.0})}),
        reply_to=msg,
    )


def test_a_virtual_clients_state_is_its_own_and_kept_only_on_success(tmp_path):
    """Two virtual clients on one node: each sees only its own state; a failing message
    leaves the state of before it."""
    node = Context(1, 5, {"partition-id": 0, "num-partitions": 2}, RecordDict(), {})
    send = lambda pid, rnd, **kw: _send(node, _counting_handler, tmp_path, pid, rnd, **kw)  # noqa: E731
    assert send(3, 1)["n"] == 1 and send(3, 2)["n"] == 2
    assert send(4, 2) == {"pid": 4, "n": 1, "eps": 1.0}
    with pytest.raises(RuntimeError):
        send(3, 3, fail=True)
    assert send(3, 3)["n"] == 3
    assert len(node.state) == 0  # the node's own state is untouched


def test_a_resumed_run_sees_the_state_of_its_checkpoint_but_privacy_never_rolls_back(tmp_path):
    """Run `a` checkpointed round 2, its client trained in round 3, then the server died. The
    resumed run `b` (from round 2) must start round 3 from the state of round 2, while the
    epsilon spent in the lost round 3 stays spent."""
    node = Context(1, 5, {}, RecordDict(), {})
    send = lambda rnd, **kw: _send(node, _counting_handler, tmp_path, 0, rnd, **kw)  # noqa: E731
    for rnd in (1, 2, 3):
        send(rnd)
    resumed = send(3, lineage="b", history={"a": 2})
    assert resumed["n"] == 3 and resumed["eps"] == 4.0  # state of round 2; ledger of round 3
    # a second resume, from b's round 3: a's own round 3 is not valid any more
    again = send(4, lineage="c", history={"a": 2, "b": 3})
    assert again["n"] == 4 and again["eps"] == 5.0
    versions = sorted(p.name for p in (tmp_path / "client-0").glob("r*.state"))
    assert versions == ["r000003-b.state", "r000004-c.state"]  # older versions pruned
