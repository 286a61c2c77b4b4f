"""fedapp ServerApp: compose the config, find the clients, run the strategy, record results."""

from __future__ import annotations

import contextlib
import platform
import random
import time
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import flwr
import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from omegaconf import DictConfig

from fedapp import checkpoint
from fedapp.checks import compose
from fedapp.core import seeds
from fedapp.core.config import ConfigError, resolve_data_dir, resolve_output_dir, to_dict
from fedapp.core.policy import REFUSED
from fedapp.features import synthetic
from fedapp.features.attacks import AttackSpec, attacker_partitions
from fedapp.features.clients import ClientGrid, NodeInfo, query_nodes
from fedapp.features.compression import CompressionSpec
from fedapp.features.hetero import ClockGrid, HeteroSpec, assign_profiles
from fedapp.features.identity import load_node_keys
from fedapp.features.privacy import PrivacyError, PrivacySpec, plan_config, with_privacy
from fedapp.features.secure import (
    check_resumed_key,
    designated_evaluator,
    secure_meta,
    server_aggregator,
)
from fedapp.features.sites import evaluate_sites
from fedapp.recorder import Recorder
from strategies import build_strategy
from strategies.claims import ClaimPolicy, clip_counts
from tasks import DataError, Task, get_task
from tasks.training import TrainSettings

app = ServerApp()


class RunFailed(RuntimeError):
    """The run ended without learning anything usable (results.json meta.status = failed)."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def discover_nodes(grid: Grid, min_nodes: int, wait_s: float) -> dict[int, NodeInfo]:
    """Ask every connected SuperNode what it holds (one QUERY message each): node id -> info.

    Waits until `min_nodes` nodes answered, or all the nodes the federation says it has (the
    `num-partitions` in their node config: Flower's simulation sets it to its number of
    SuperNodes), and at most `wait_s` seconds. Which node serves which client is decided
    from the answers (`fedapp.features.clients.assign_clients`): simulation nodes can serve any
    number of clients, so the federation's size no longer has to equal the partitioning's.
    """
    deadline = time.monotonic() + wait_s
    info: dict[int, NodeInfo] = {}
    while True:
        new = [nid for nid in grid.get_node_ids() if nid not in info]
        if new:
            info.update(query_nodes(grid, new, max(deadline - time.monotonic(), 1.0)))
        size = max((i.num_partitions for i in info.values()), default=-1)
        if info and len(info) >= (min(min_nodes, size) if size > 0 else min_nodes):
            return info
        if time.monotonic() > deadline:
            raise ConfigError(
                f"only {len(info)} SuperNodes answered within {wait_s:.0f}s, need {min_nodes}. "
                "Start more SuperNodes or lower clients_per_round."
            )
        time.sleep(1.0)


def collect_stats(
    grid: Grid,
    node_ids: list[int],
    timeout: float,
    task: Task,
    by_client: dict[int, dict] | None = None,
    refused: dict[int, str] | None = None,
) -> list[dict]:
    """One `query.stats` to every client for the sufficient statistics of its training rows.

    Only sums, sums of squares, counts and label histograms leave a client (never rows); the
    server screens each client's (`task.screen_stats`: shape, finite, plausible, as updates are)
    and adds them up (`task.aggregate_stats`) for feature scaling, imputation and class weights.
    A client that fails or sends unusable statistics (whatever its reply holds) is reported
    and left out of them. `by_client` (if given) receives each usable reply by client id,
    `refused` why each unusable one was left out.
    """
    msgs = [
        Message(RecordDict(), dst_node_id=nid, message_type=f"{MessageType.QUERY}.stats")
        for nid in node_ids
    ]
    stats, refusals = [], []
    for reply in grid.send_and_receive(msgs, timeout=timeout):
        src = reply.metadata.src_node_id
        if reply.has_error():
            log(WARNING, "node %d sent no statistics: %s", src, reply.error.reason)
            if REFUSED in reply.error.reason:
                refusals.append(reply.error.reason[reply.error.reason.index(REFUSED) :])
            continue
        try:  # a reply of any form: a rejected one, never an exception
            values = {
                str(k): [float(x) for x in v]
                for k, v in reply.content.metric_records["metrics"].items()
            }
            why = task.screen_stats(values)
        except Exception as exc:  # noqa: BLE001
            why = f"malformed statistics ({type(exc).__name__}: {str(exc)[:200]})"
        if why:
            log(WARNING, "node %d statistics rejected (left out): %s", src, why)
            if refused is not None:
                refused[src] = why
            continue
        stats.append(values)
        if by_client is not None:
            by_client[src] = values
    log(INFO, "[fedapp] preprocessing statistics from %d of %d clients", len(stats), len(node_ids))
    if not stats:
        why = (
            f"; {len(refusals)} refused by their institution's policy, e.g. "
            f"{refusals[0].splitlines()[0]}"
            if refusals
            else ""
        )
        raise DataError(
            "no client sent usable preprocessing statistics (see the warnings above); the "
            f"features cannot be scaled{why}"
        )
    return stats


STATS_ROWS = "stats.labels"  # a client's training rows: the sum of its label histogram


STATS_MEAN_Z = 10.0  # a client's feature mean this many robust spreads from the others' is a lie
STATS_STD_Z = 25.0  # ... and its standard deviation this many (measured honest maxima: 1.9, 8.2)


def implausible_stats(by_client: dict[int, dict[str, list[float]]]) -> dict[int, str]:
    """Clients whose exact statistics cannot be an honest client's (client id -> why): a feature
    mean more than STATS_MEAN_Z robust spreads from the median of the clients' means, or a
    standard deviation more than STATS_STD_Z of them (the spread: the larger of the clients'
    median standard deviation and the median absolute deviation of their means). Honest
    clients of every natural, IID and size-skewed split here stay within 1.9 and 8.2 (tiny
    medical clients of 5 rows up to ~7); needs three clients or more."""
    keys = ("stats.count", "stats.sum", "stats.sumsq")
    ids = [c for c, v in sorted(by_client.items()) if all(k in v for k in keys)]
    if len(ids) < 3:
        return {}
    count, total, sumsq = (np.array([by_client[c][k] for c in ids], dtype=np.float64) for k in keys)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = np.where(count > 0, total / count, np.nan)
        std = np.sqrt(np.clip(np.where(count > 0, sumsq / count - mean**2, np.nan), 0, None))
    center = np.nanmedian(mean, axis=0)
    spread = np.maximum(
        np.nanmedian(std, axis=0), 1.4826 * np.nanmedian(np.abs(mean - center), axis=0)
    )
    spread = np.where(
        np.isfinite(spread) & (spread > 0),
        spread,
        1e-6 * np.maximum(np.abs(np.nan_to_num(center)), 1.0),
    )
    out = {}
    for i, cid in enumerate(ids):
        with np.errstate(invalid="ignore"):
            z_mean = np.nan_to_num(np.abs(mean[i] - center) / spread)
            z_std = np.nan_to_num(std[i] / spread)
        if z_mean.max(initial=0) > STATS_MEAN_Z or z_std.max(initial=0) > STATS_STD_Z:
            j = int(np.argmax(np.maximum(z_mean / STATS_MEAN_Z, z_std / STATS_STD_Z)))
            out[cid] = (
                f"feature {j}: mean {mean[i, j]:.4g} and standard deviation {std[i, j]:.4g} "
                f"where the clients' median is {center[j]:.4g} with a spread of {spread[j]:.4g} "
                f"(more than {STATS_MEAN_Z:g} / {STATS_STD_Z:g} spreads off)"
            )
    return out


def robust_stats(
    by_client: dict[int, dict[str, list[float]]], policy: ClaimPolicy, exact: bool = True
) -> tuple[list[dict[str, list[float]]], dict[int, float], dict[int, str]]:
    """(the statistics to combine, each client's training rows, the clients left out and why).

    Exact statistics (no sample_dp noise) that no honest client can have (`implausible_stats`)
    are left out; every client's rows are clipped at `claims.stats_max_ratio` x the clients'
    median: a clipped client's additive statistics (counts, sums, sums of squares, label
    counts) are scaled down together, so it keeps its means and variances but no more than
    that weight in the global ones. So a client sending huge whole counts with matching sums
    moves no global mean: its means are out of line (left out), or its weight is bounded. An
    honest federation's statistics are combined exactly as before (nothing triggers)."""
    refused = implausible_stats(by_client) if exact else {}
    for cid, why in refused.items():
        log(WARNING, "client %d statistics rejected (left out): %s", cid, why)
    kept = {c: v for c, v in by_client.items() if c not in refused}
    rows = {c: float(sum(v[STATS_ROWS])) for c, v in kept.items() if STATS_ROWS in v}
    clipped = clip_counts(rows, policy.stats_max_ratio)
    out = []
    for cid, values in sorted(kept.items()):
        factor = clipped[cid] / rows[cid] if cid in rows and rows[cid] > clipped[cid] else 1.0
        if factor < 1.0:
            log(
                WARNING,
                "client %d's statistics count %g rows, %.3gx the clients' median: weighed as %g "
                "(claims.stats_max_ratio)",
                cid,
                rows[cid],
                rows[cid] / max(float(np.median(list(rows.values()))), 1e-12),
                clipped[cid],
            )
            values = {k: [x * factor for x in v] for k, v in values.items()}
        out.append(values)
    return out, clipped, refused


def server_loss_fn(task, dataset, prep: dict[str, list[float]]):
    """arrays (in the model's state-dict order) -> the task's loss on `dataset`."""
    model = task.make_model()  # one instance: every call loads all of its state
    keys = list(model.state_dict().keys())

    def loss(arrays) -> float:
        model.load_state_dict(
            {k: torch.as_tensor(np.asarray(a)) for k, a in zip(keys, arrays, strict=True)}
        )
        return task.loss(model, dataset, prep)

    return loss


def num_clients(node_partitions: dict[int, int]) -> int:
    """The federation's size by partition ids (a deployment's may have gaps)."""
    return max(node_partitions.values(), default=-1) + 1


def bind_strategy(strategy, cfg: DictConfig, task: Task, node_partitions: dict[int, int]):
    """Attach the federation to the strategy; the attack harness's clients (reported only)."""
    attack = AttackSpec.from_config(cfg.get("attack"))
    attackers = (
        attacker_partitions(num_clients(node_partitions), attack.fraction, int(cfg.seed))
        if attack.active
        else []
    )
    if attackers:
        log(INFO, "[fedapp] attack=%s on %d clients: %s", attack.name, len(attackers), attackers)
    strategy.bind(
        node_partitions,
        seed=int(cfg.seed),
        min_replies=int(cfg.min_replies),
        attackers=attackers,
        sim_time_budget_s=float(cfg.get("sim_time_budget_s") or 0.0),
    )
    return attackers


def make_clock(
    grid: Grid, cfg: DictConfig, task: Task, node_partitions: dict[int, int]
) -> tuple[ClockGrid, dict]:
    """The one clock every strategy talks to the clients through (fedapp.features.hetero): simulated
    seconds under a virtual hetero profile, wall seconds otherwise."""
    hetero = HeteroSpec.from_config(cfg.get("hetero"))
    profiles = dict(enumerate(assign_profiles(hetero, num_clients(node_partitions), int(cfg.seed))))
    clock = ClockGrid(
        grid, hetero, profiles, node_partitions, int(cfg.seed), float(cfg.round_timeout_s)
    )
    if hetero.active:
        log(
            INFO,
            "[fedapp] hetero=%s (%s clock): %s",
            hetero.name,
            hetero.clock,
            {c: sum(p.tier_class == c for p in profiles.values()) for c, _, _ in hetero.classes},
        )
    return clock, profiles


def hold_out_server_validation(strategy, cfg: DictConfig, task: Task, prep) -> tuple[Any, int]:
    """(the test set to report on, server validation rows). Operator-held validation rows (off
    by default) are carved out of the central test set, which then reports on the rest only.
    Strategies that score updates on them (contribution's leave-one-out) get a loss function,
    never the rows."""
    fraction = float(cfg.get("server_val_fraction") or 0.0)
    server_val, test_set = task.central_test_split(fraction, int(cfg.seed))
    if server_val is None:
        return test_set, 0
    strategy.bind_server_validation(server_loss_fn(task, server_val, prep))
    log(
        INFO,
        "[fedapp] server validation: %d rows of the central test set (%.0f%%); %d left to test on",
        len(server_val),
        100 * fraction,
        len(test_set),
    )
    return test_set, len(server_val)


def run_meta(context: Context, cfg: DictConfig, initial: ArrayRecord, **extra) -> dict[str, Any]:
    """The `meta` section of results.json (what ran, with what, where)."""
    hetero = HeteroSpec.from_config(cfg.get("hetero"))
    return {
        "run_id": context.run_id,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "flwr_version": flwr.__version__,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "model_parameters": int(sum(a.numpy().size for a in initial.values())),
        "model_bytes": initial.count_bytes(),
        "hetero": hetero.name,
        "clock": hetero.clock,
        **extra,
    }


def live_objects(strategy, task, grid, clients, clock, recorder) -> dict[str, Any]:
    """Objects of this server the strategy may refer to, rebuilt on resume, never written
    into a checkpoint (fedapp.checkpoint)."""
    return {
        "strategy": strategy,
        # the name checkpoints have always written the strategy under (central DP was a
        # wrapper around it until the release mechanism): keeps them resumable
        "inner_strategy": strategy,
        "task": task,
        "grid": grid,
        "clients": clients,
        "clock": clock,
        "recorder": recorder,
        "secure": strategy.secure,
        "server_loss": getattr(strategy, "server_loss", None),
    }


def checkpointer(out_dir, cfg, strategy, live, recorder, clock, clients, prep):
    """The function the recorder calls after every round: writes `checkpoint.pt`. A
    checkpoint that fails is stated in `meta.checkpoint` (and logged once); the run goes on."""
    if not bool(cfg.get("checkpoint", True)):
        recorder.meta["checkpoint"] = "not written: checkpoint=false"
        return None

    def write(server_round: int, arrays: ArrayRecord) -> None:
        if str(recorder.meta.get("checkpoint", "")).startswith("failed"):
            return
        try:
            checkpoint.write(
                out_dir,
                {
                    "round": server_round,
                    "arrays": arrays,
                    "config": to_dict(cfg),
                    "prep": prep,
                    "meta": recorder.meta,
                    "strategy": checkpoint.strategy_state(strategy, live),
                    "recorder": recorder.state(),
                    "clock": clock.state(),
                    "clients": clients.state(),
                    "rng": checkpoint.rng_state(),
                    "lineage": clients.lineage,
                    "history": clients.history,
                },
            )
            recorder.meta["checkpoint"] = f"round {server_round}"
        except checkpoint.CheckpointError as exc:
            recorder.meta["checkpoint"] = f"failed: {exc}"
            log(WARNING, "[fedapp] %s; this run cannot be resumed", exc)

    return write


def final_sites(clients, node_partitions, final, cfg, task, train_config) -> list | None:
    """`final.sites` (fedapp.features.sites): every client scores the final model on its own held-out
    rows; None when that failed (logged; the run's other numbers stand)."""
    if final is None:
        return None
    try:
        timeout = float(cfg.round_timeout_s)
        return evaluate_sites(clients, node_partitions, final, cfg, task, train_config, timeout)
    except Exception as exc:  # noqa: BLE001 - the run's numbers are kept whatever happens here
        log(WARNING, "[fedapp] per-site evaluation failed: %s: %s", type(exc).__name__, exc)
        return None


def check_levels(spec: PrivacySpec, task, partitions) -> None:
    """privacy.levels: every id must name a client of this run (a partition id or a natural
    id); an unknown one stops the run at start-up, naming the valid ids (a misspelt hospital
    would otherwise silently get the run-wide target)."""
    if spec.name == "none" or not spec.levels:
        return
    valid: dict[str, None] = {}
    for pid in sorted(partitions):
        valid[str(pid)] = None
        try:
            names = task.natural_ids(pid)
        except Exception:  # a deployed node's partition: the server holds no pooled data
            names = []
        valid.update(dict.fromkeys(str(n) for n in names))
    unknown = sorted(set(spec.levels) - set(valid))
    if unknown:
        raise PrivacyError(
            f"privacy.levels names {unknown}, which match no client of this run; valid ids: "
            f"{', '.join(valid)} (natural ids are case-sensitive)"
        )


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_config = context.run_config
    cfg = compose(str(run_config.get("overrides", "")))
    out_dir = resolve_output_dir(cfg, run_config)
    with run_lock(out_dir):  # two runs never write one folder at once
        _main(grid, context, cfg, out_dir)


def interruption(exc: BaseException) -> str | None:
    """Why the run was cut off from outside (None: it failed by itself): a signal (Flower's
    handler turns SIGTERM and SIGINT into SystemExit; Ctrl-C in-process is KeyboardInterrupt)
    or a lost connection to the SuperLink."""
    if isinstance(exc, (SystemExit, KeyboardInterrupt)):
        return f"stopped by a signal or an exit request ({type(exc).__name__})"
    import httpx

    if isinstance(exc, (ConnectionError, httpx.TransportError)):
        return f"lost the connection to the SuperLink ({type(exc).__name__}: {str(exc)[:300]})"
    return None


@contextlib.contextmanager
def run_lock(out_dir: Path):
    """Hold `out_dir/.fedapp-run.lock` for the run (flock: released when the process ends,
    however it ends); a second run asked to write the same folder meanwhile stops at once."""
    import fcntl

    with open(out_dir / ".fedapp-run.lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(
                f"{out_dir} is the output folder of a run in progress; choose another "
                "output folder (or wait for that run to end)"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def join_federation(grid: Grid, cfg: DictConfig, task: Task, out_dir: Path, saved):
    """The SuperNodes that answered discovery and the client grid over them (which client
    each node serves, nodes refused with the reason)."""
    nodes = discover_nodes(grid, int(cfg.clients_per_round), float(cfg.round_timeout_s))
    clients = ClientGrid(
        grid,
        nodes,
        None if all(i.has_data_path for i in nodes.values()) else task.num_partitions(),
        out_dir / "client_state",
        query_timeout_s=min(float(cfg.round_timeout_s), 60.0),
        history=({**saved["history"], saved["lineage"]: int(saved["round"])} if saved else None),
        node_keys=load_node_keys(cfg.get("node_keys")),
    )
    if not clients.node_partitions:
        raise ConfigError(
            "no SuperNode may serve a client: "
            + "; ".join(f"node {n}: {why}" for n, why in clients.ignored.items())
        )
    log(INFO, "[fedapp] %d clients on %d SuperNodes", len(clients.node_partitions), len(nodes))
    return nodes, clients


def make_strategy(cfg: DictConfig, clients: ClientGrid, task: Task):
    """The run's strategy with its update codec, encrypted aggregation and release mechanism,
    bound to the federation; (strategy, the attack harness's partitions)."""
    node_partitions = clients.node_partitions
    strategy = build_strategy(cfg, num_nodes=len(node_partitions))
    strategy.compression = CompressionSpec.from_config(cfg.get("compression"))
    # the clients' key: public context only (fedapp.features.secure), checked against every client's
    strategy.secure = server_aggregator(
        cfg, clients, node_partitions, task, min(float(cfg.round_timeout_s), 60.0)
    )
    strategy = with_privacy(strategy, cfg, strategy.min_train_nodes)
    attackers = bind_strategy(strategy, cfg, task, node_partitions)
    return strategy, attackers


def preprocessing(cfg: DictConfig, clients: ClientGrid, task: Task, strategy, saved):
    """The federated preprocessing parameters (asked once, before the clock starts; a resumed
    run reuses its own and spends no privacy on asking again) and the clients whose
    statistics were left out, with why. Binds the claim caps to the strategy."""
    node_partitions = clients.node_partitions
    prep: dict[str, list[float]] = {}
    claims = ClaimPolicy.from_config(cfg.get("claims"))  # caps on claimed num-examples
    stats_rows: dict[int, float] = {}  # partition id -> training rows its statistics counted
    stats_refused: dict[int, str] = {}  # client id -> why its statistics were left out
    if saved is not None:  # the same parameters, and no privacy spent on asking again
        prep = saved["prep"]  # (and the strategy's `stats_rows` come with its state)
    elif task.needs_stats:  # before the clock starts, as discovery
        by_client: dict[int, dict] = {}
        collect_stats(
            clients,
            sorted(node_partitions),
            float(cfg.round_timeout_s),
            task,
            by_client,
            stats_refused,
        )
        # exact counts only: noised ones (privacy=sample_dp) say nothing of one client's rows
        exact = not PrivacySpec.from_config(cfg.get("privacy")).sample_level
        stats, rows, implausible = robust_stats(by_client, claims, exact)
        stats_refused.update(implausible)
        if not stats:
            raise DataError("no client sent plausible preprocessing statistics (see the warnings)")
        prep = task.aggregate_stats(stats)
        if exact:
            stats_rows = {node_partitions[c]: r for c, r in rows.items() if c in node_partitions}
    strategy.bind_claims(claims, stats_rows)
    return prep, stats_refused


def describe_run(
    context, cfg, initial, out_dir, clients, clock, profiles, prep, stats_refused, **facts
) -> dict[str, Any]:
    """results.json's `meta` at the start: the run, its federation and what was refused
    (`facts`: the attack harness's partitions, the operator's validation rows)."""
    node_partitions = clients.node_partitions
    meta = run_meta(
        context,
        cfg,
        initial,
        num_clients=len(node_partitions),
        output_dir=str(out_dir),
        **facts,
        clients_started_unix=clients.started_unix,
    )
    meta["nodes_refused"] = clients.ignored  # node id -> why (kept up to date by the grid)
    if stats_refused:  # partition id -> why its statistics were left out
        meta["stats_refused"] = {
            str(node_partitions.get(c, c)): w for c, w in stats_refused.items()
        }
    if clock.spec.active:
        meta["device_class"] = {p: prof.tier_class for p, prof in profiles.items()}
    if prep:
        meta["preprocessing"] = {
            k: prep[k] for k in ("prep.label_counts", "prep.class_weights") if k in prep
        }
    return meta


def resumed_meta(saved, meta: dict[str, Any], strategy) -> dict[str, Any]:
    """A resumed run's `meta`: the checkpointed one, with this start appended to `resumed`."""
    check_resumed_key(saved["meta"], strategy.secure)
    resumed = {"after_round": int(saved["round"]), "at": meta["started"], "run_id": meta["run_id"]}
    return {**saved["meta"], "resumed": [*saved["meta"].get("resumed", []), resumed]}


def restore_run(saved, strategy, live, recorder, clock, clients, task) -> None:
    """Everything a checkpoint holds back in place (the RNG state last, by the caller)."""
    checkpoint.restore_strategy(strategy, saved["strategy"], live)
    recorder.restore(saved["recorder"])
    clock.restore(saved["clock"])
    clients.restore(saved["clients"])
    if strategy.release is not None:  # central DP: a possible release after the checkpoint
        strategy.release.resumed()
    synthetic.resumed(strategy, task)  # augment: clients' copies of the generator may be lost


def _main(grid: Grid, context: Context, cfg, out_dir: Path) -> None:
    log(
        INFO,
        "[fedapp] task=%s strategy=%s partition=%s rounds=%d seed=%d",
        cfg.task.name,
        cfg.strategy.name,
        cfg.partition.name,
        cfg.rounds,
        cfg.seed,
    )
    log(INFO, "[fedapp] results will be written to %s", out_dir)
    saved = checkpoint.read(cfg.resume) if cfg.get("resume") else None
    if saved is not None:
        checkpoint.check_compatible(saved["config"], cfg, int(saved["round"]))
        log(INFO, "[fedapp] resuming after round %d of %s", saved["round"], cfg.resume)
    seed_everything(int(cfg.seed))
    task = get_task(cfg, resolve_data_dir(cfg, context.run_config))
    task.load_central_test()  # bad data fails here, before any node is waited for
    synthetic.check(cfg, task)  # before any statistic is asked for (privacy spent)
    nodes, clients = join_federation(grid, cfg, task, out_dir, saved)
    node_partitions = clients.node_partitions
    check_levels(PrivacySpec.from_config(cfg.get("privacy")), task, node_partitions.values())
    strategy, attackers = make_strategy(cfg, clients, task)
    prep, stats_refused = preprocessing(cfg, clients, task, strategy, saved)
    clock, profiles = make_clock(clients, cfg, task, node_partitions)
    test_set, server_val_rows = hold_out_server_validation(strategy, cfg, task, prep)
    torch.manual_seed(seeds.torch_seed("model.init", int(cfg.seed)))
    initial = ArrayRecord(task.make_model().state_dict())
    settings = TrainSettings.from_train_config(cfg.train, int(cfg.seed))
    synthetic.attach(strategy, cfg, task, prep, settings)  # strategy=synthetic, augment=rare_class
    meta = describe_run(
        context,
        cfg,
        initial,
        out_dir,
        clients,
        clock,
        profiles,
        prep,
        stats_refused,
        attackers=attackers,
        server_val_rows=server_val_rows,
    )
    evaluator = None
    if strategy.secure is not None:  # simulation: all nodes are hosts without their own data
        simulation = not any(i.has_data_path for i in nodes.values())
        evaluator = designated_evaluator(cfg, task, strategy.secure, simulation)
        meta["secure"] = secure_meta(cfg, strategy.secure, evaluator)
    start_round = 1
    if saved is not None:
        meta = resumed_meta(saved, meta, strategy)
        initial, start_round = saved["arrays"], int(saved["round"]) + 1
    recorder = Recorder(out_dir, cfg, task, strategy, meta, test_set, prep=prep, clock=clock)
    recorder.nodes_fn = clients.report
    if strategy.secure is not None:
        recorder.evaluator = evaluator
    live = live_objects(strategy, task, grid, clients, clock, recorder)
    if saved is not None:
        restore_run(saved, strategy, live, recorder, clock, clients, task)
    recorder.checkpoint_fn = checkpointer(
        out_dir, cfg, strategy, live, recorder, clock, clients, prep
    )
    if saved is not None:  # as they were at the end of the checkpointed round
        checkpoint.set_rng_state(saved["rng"])
    # every training round's config, and the final per-site scoring's
    train_config = {**settings.to_config(), **prep, **plan_config(cfg)}
    run_strategy(
        strategy,
        cfg,
        clock,
        clients,
        task,
        recorder,
        initial,
        start_round,
        train_config,
        prep,
        out_dir,
    )


def run_strategy(
    strategy, cfg, clock, clients, task, recorder, initial, start_round, train_config, prep, out_dir
) -> None:
    """The strategy's rounds, then the final per-site scoring; results.json is written
    whatever happens, and a failed run raises RunFailed."""
    final, error, cut = None, None, None
    try:
        result = strategy.start(
            grid=clock,
            initial_arrays=initial,
            num_rounds=int(cfg.rounds),
            # Synchronous strategies wait this long for a round's replies (simulated seconds on
            # the virtual clock); `strategy.deadline_s` makes e.g. FedAvg drop stragglers.
            timeout=float(cfg.strategy.get("deadline_s") or cfg.round_timeout_s),
            train_config=ConfigRecord(train_config),
            evaluate_config=ConfigRecord({"seed": int(cfg.seed), **prep}),
            evaluate_fn=recorder.evaluate_fn,
            start_round=start_round,
        )
        final = result.arrays
        if strategy.secure is None:  # encrypted: the server holds no plaintext model
            recorder.sites = final_sites(
                clients, clients.node_partitions, final, cfg, task, train_config
            )
    except BaseException as exc:
        cut = interruption(exc)
        if cut is None:
            error = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        results = recorder.finish(final, error=error, interrupted=cut)
        status = results["meta"]["status"]
        log(INFO, "[fedapp] %s: results in %s", status, out_dir)
    if status == "failed":  # Flower then marks the run failed, and the launchers exit non-zero
        raise RunFailed(
            f"{results['meta']['status_detail'].get('reason')}; see {out_dir}/results.json"
        )
