"""Differential privacy of the customers and patients in each institution's data.

`privacy=sample_dp` (conf/privacy/sample_dp.yaml), the main mode: sample-level DP-SGD inside
every client with Opacus (Poisson sampling, per-sample clipping to `max_grad_norm`, Gaussian
noise), for every task. The protected unit is one row (a customer, a patient, an image) of a
client's training data; the adversary is whoever sees what the client sends, the server
included.

- **Accounted across the whole run, never per round.** Each client calibrates its noise
  multiplier once, from its target (epsilon, delta) over the whole planned run: the federated
  statistics release (tabular tasks, below) plus `participations` rounds of its local steps
  (`calibrate`). Its accountant (Opacus RDP or PRV) keeps the history of every step it has
  taken in **one ledger per institution, across runs** (`Ledger`): a file under the node's
  own `ledger-dir` (required for DP on a deployed node; `dp-state-dir` is the older name),
  named by its `institution` id, never by a run; in simulation without one, in the client's
  state. A new run re-plans for what is left (`Ledger.start_run`), never from zero. A client
  whose next round would take it over its target refuses to train
  (`PrivacyBudgetExhausted`, an error reply; the round goes on without it).
- **Per-client targets** (seed 001's privacy by data sensitivity): `levels` maps a client's
  natural id (hospital, state, education level...) or partition id to its own epsilon (an
  unknown id stops the run); the node's own `max-epsilon` / `target-epsilon`
  (fedapp.core.policy); the strictest of every target that applies, stored or new, holds.
- **The noise is secret** (`NOISE`, tasks.dp_sgd): drawn from generators seeded with fresh
  OS entropy, never from the run seed.
- **What a client sends under sample_dp**, and what the guarantee covers:
  - the model update: DP-SGD (covered); SCAFFOLD's control change and anything else computed
    from the trained model and public values is post-processing (covered);
  - the federated statistics of tabular tasks (feature counts, sums, sums of squares, label
    histogram): each value clipped to [-`stats_clip`, `stats_clip`] after the signed-log
    transform (under sample_dp numeric features always use it, so every row's contribution is
    bounded), released once with Gaussian noise and accounted in the same budget (a share
    `stats_share` of the target epsilon, by itself); within it the label histogram gets its
    own share `stats_label_share` of the release's zCDP budget (`split_stats_noise`), so that
    on wide tables its few counts are not swamped by noise sized for 3 d sums;
  - not sent: the label histogram and mean training loss of each round;
  - outside the guarantee, and listed in results.json `meta.privacy.outside`: the number of
    training rows and the number of local steps (a function of it), the client's compute
    time, metrics on its validation rows (federated evaluation, the contribution strategy's
    validation gain), probe and heartbeat timings.
- The proximal term and SCAFFOLD's correction do not depend on the samples; under DP-SGD they
  are applied to the gradient after the noise (post-processing), since per-sample clipping
  would otherwise silently drop them.

`privacy=central_dp`: client-level DP with Flower's own wrappers (see `central_dp`).
"""

from __future__ import annotations

import contextlib
import json
import math
import secrets
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, RecordDict
from omegaconf import DictConfig, OmegaConf

from fedapp.core.config import ConfigError
from fedapp.core.files import PRIVATE, write_atomic
from fedapp.core.policy import RUN_KEY, NodePolicy
from fedapp.core.units import ClientUnit, TrainJob
from tasks.dp_sgd import (  # noqa: F401 (re-exported)
    SECURE_NOISE,
    DPSGDHook,
    PrivateStep,
    noise_seed,
    opacus,
    seeded_noise,
)

MODES = ("none", "sample_dp", "central_dp")
ACCOUNTANTS = ("rdp", "prv")
STATE_KEY = "fedapp.dp"  # the ConfigRecord in Context.state holding the ledger (JSON)
LABELS_KEY = "fedapp.dp-labels"  # the client's DP-released label histogram (Context.state)
# What a client sends that sample-level DP does not cover (results.json meta.privacy.outside).
OUTSIDE = (
    "num-examples (the number of training rows) and train_steps (a function of it)",
    "train_time_s and eval_time_s (compute time)",
    "loss and accuracy on the clients' validation rows (federated evaluation; contribution's "
    "val_loss_before/val_loss_after), whose share each node fixes; exact confusion counts "
    "are not sent under sample_dp",
    "probe and heartbeat timings (scheduling strategies)",
    "the final (and its personal) model's score on the client's validation rows after the "
    "last round (per-site evaluation, results.json final.sites)",
)
WITHHELD = ("train_loss", "label-counts")  # reply metrics a client does not send under sample_dp


class PrivacyError(ConfigError):
    """Invalid privacy settings; the message names the key and what to set."""


class PrivacyBudgetExhausted(RuntimeError):
    """Raised by a client whose next round would take it over its privacy budget."""


@dataclass(frozen=True)
class PrivacySpec:
    """The `privacy` config group."""

    name: str = "none"
    target_epsilon: float = 8.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: str = "rdp"
    participations: int | str = "auto"
    levels: Mapping[str, float] = field(default_factory=dict)
    stats_share: float = 0.1
    stats_clip: float = 25.0
    stats_label_share: float = 0.25
    # central_dp
    noise_multiplier: float = 1.0
    clipping_norm: float = 1.0
    clipping: str = "server"

    @classmethod
    def from_config(cls, cfg: DictConfig | Mapping[str, Any] | None) -> PrivacySpec:
        if not cfg:
            return cls()
        raw = (
            OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
        )
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise PrivacyError(f"privacy: unknown keys {unknown}; known: {sorted(known)}")
        spec = cls(
            **{**raw, "levels": {str(k): float(v) for k, v in (raw.get("levels") or {}).items()}}
        )
        spec.validate()
        return spec

    def validate(self) -> None:
        if self.name not in MODES:
            raise PrivacyError(f"privacy={self.name}: choose one of {', '.join(MODES)}")
        if self.name == "none":
            return
        if self.accountant not in ACCOUNTANTS:
            raise PrivacyError(f"privacy.accountant={self.accountant}: use rdp or prv")
        if not 0 < self.delta < 1:
            raise PrivacyError(f"privacy.delta={self.delta} must be in (0, 1)")
        if not self.target_epsilon > 0:
            raise PrivacyError(f"privacy.target_epsilon={self.target_epsilon} must be > 0")
        if not self.max_grad_norm > 0 or not self.clipping_norm > 0:
            raise PrivacyError("privacy.max_grad_norm and privacy.clipping_norm must be > 0")
        if any(not v > 0 for v in self.levels.values()):
            raise PrivacyError(
                f"privacy.levels: every epsilon must be > 0, got {dict(self.levels)}"
            )
        if not 0 < self.stats_share < 1:
            raise PrivacyError(f"privacy.stats_share={self.stats_share} must be in (0, 1)")
        if not 0 < self.stats_label_share < 1:
            raise PrivacyError(
                f"privacy.stats_label_share={self.stats_label_share} must be in (0, 1)"
            )
        if self.participations != "auto" and int(self.participations) < 1:
            raise PrivacyError("privacy.participations must be 'auto' or a positive integer")
        if self.clipping not in ("server", "client"):
            raise PrivacyError(f"privacy.clipping={self.clipping}: use server or client")

    @property
    def sample_level(self) -> bool:
        return self.name == "sample_dp"


NOISE = (
    "every DP noise draw (DP-SGD's Gaussian noise and Poisson sampling, the statistics "
    "release, the generator's and discriminator's DP-SGD, central DP) comes from a generator "
    "seeded with 63 bits of fresh OS entropy (Python's secrets) on the party that adds it, "
    "never from the run seed, and is never stored; PyTorch's and numpy's generators "
    "(statistical, not cryptographic); DP-SGD noise as a sum of four draws (Opacus' "
    "floating-point-attack mitigation)"
)


def mark_seeded_noise(meta: dict[str, Any], who: Any) -> None:
    """A client (or the server) ran the insecure seeded-noise test mode: say so."""
    seeded = meta.setdefault("noise_seeded", [])
    if str(who) not in seeded:
        seeded.append(str(who))
    meta["guarantee"] = (
        "DOES NOT HOLD: the DP noise of "
        + ", ".join(seeded)
        + " was seeded from the run seed (FEDAPP_INSECURE_SEEDED_DP_NOISE=1, a test mode); "
        "whoever knows the seed can subtract it"
    )


def privacy_meta(spec: PrivacySpec) -> dict[str, Any]:
    """results.json `meta.privacy`: the mode, its parameters and what the guarantee leaves out
    (the recorder adds each client's noise multiplier and target as they report them)."""
    if spec.sample_level:
        return {
            "mode": spec.name,
            "unit": "one training row of a client (add/remove one row)",
            "delta": spec.delta,
            "accountant": spec.accountant,
            "max_grad_norm": spec.max_grad_norm,
            "target_epsilon": spec.target_epsilon,
            "levels": dict(spec.levels),
            "participations": spec.participations,
            "stats_share": spec.stats_share,
            "stats_clip": spec.stats_clip,
            "stats_label_share": spec.stats_label_share,
            "not_sent": list(WITHHELD),
            "outside": list(OUTSIDE),
            "noise": NOISE,
            "ledger": "one per institution across runs (a node's ledger-dir; in simulation "
            "without one, the client's state folder of the run); epsilons are lifetime totals",
        }
    return {
        "mode": spec.name,
        "unit": "one client (all of its rows)",
        "delta": spec.delta,
        "accountant": spec.accountant,
        "noise_multiplier": spec.noise_multiplier,
        "clipping_norm": spec.clipping_norm,
        "clipping": spec.clipping,
        "target_epsilon": spec.target_epsilon,
        "outside": ["the clients' metrics (num-examples, losses, label histograms)"],
        "noise": NOISE,
    }


# -- accounting (pure functions over Opacus accountants) --------------------------------------------
History = list[tuple[float, float, int]]  # (noise multiplier, sample rate, steps), Opacus' format
# RDP orders: Opacus' defaults (up to 63), plus larger ones for histories of full-data releases
# only, without which a small epsilon of one strongly noised release (the statistics at epsilon
# 0.1) cannot be certified at all. (Any set of orders gives a valid bound; the large ones are
# left out once subsampled steps are in, where Opacus' series for them is slow and the best
# order is small.)
DEFAULT_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
LARGE_ORDERS = DEFAULT_ORDERS + [2.0**k for k in np.arange(6, 12.25, 0.25)]


def epsilon_of(history: History, delta: float, accountant: str = "rdp") -> float:
    """Epsilon at `delta` of a history of subsampled Gaussian steps (0 for no history)."""
    if not history:
        return 0.0
    acc = opacus("opacus.accountants").create_accountant(mechanism=accountant)
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore")
        if accountant == "rdp":
            full_data_only = all(float(q) == 1.0 for _, q, _ in history)
            orders = LARGE_ORDERS if full_data_only else DEFAULT_ORDERS
            return float(acc.get_epsilon(delta=delta, alphas=orders))
        return float(acc.get_epsilon(delta=delta))


def calibrate(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
    prefix: History = (),
    tolerance: float = 0.01,
) -> float:
    """The smallest noise multiplier (within `tolerance` of epsilon) such that `prefix` followed
    by `steps` steps at `sample_rate` spends at most `target_epsilon` at `delta` (Opacus'
    `get_noise_multiplier`, with a prefix: the statistics release composes with DP-SGD)."""
    prefix = list(prefix)
    if epsilon_of(prefix, delta, accountant) >= target_epsilon:
        raise PrivacyError(
            f"the statistics release alone spends the whole target epsilon {target_epsilon:g}; "
            "lower privacy.stats_share"
        )
    low, high = 0.0, 10.0
    while epsilon_of([*prefix, (high, sample_rate, steps)], delta, accountant) > target_epsilon:
        low, high = high, 2 * high
        if high > 1e6:
            raise PrivacyError(f"target epsilon {target_epsilon:g} cannot be reached")
    while high - low > 1e-4 * high:
        mid = (low + high) / 2
        eps = epsilon_of([*prefix, (mid, sample_rate, steps)], delta, accountant)
        if eps > target_epsilon:
            low = mid
        else:
            high = mid
            if target_epsilon - eps <= tolerance:
                break
    return high


def gaussian_noise_multiplier(epsilon: float, delta: float, accountant: str = "rdp") -> float:
    """Noise multiplier of one full-data Gaussian release spending `epsilon` at `delta`."""
    return calibrate(epsilon, delta, 1.0, 1, accountant)


def planned_participations(rounds: int, per_round: int, clients: int) -> int:
    """How many rounds a client should plan to train in: every round when all clients train
    each round; otherwise its expected participations plus three binomial standard
    deviations (about 1 in 700 clients would need more and refuses its last rounds)."""
    q = min(1.0, per_round / max(clients, 1))
    if q >= 1.0:
        return int(rounds)
    mean = rounds * q
    return int(min(rounds, math.ceil(mean + 3 * math.sqrt(mean * (1 - q)))))


def client_target(spec: PrivacySpec, names: Sequence[str], node_config: Mapping[str, Any]) -> float:
    """A client's target epsilon: the run's, or its level (by natural id or partition id,
    `names`), or its node's own `max-epsilon` / `target-epsilon`, whichever is strictest."""
    targets = [spec.target_epsilon]
    targets += [spec.levels[n] for n in names if n in spec.levels]
    cap = NodePolicy.from_node_config(node_config).epsilon_cap(node_config)
    if cap is not None:
        targets.append(cap)
    return min(targets)


# -- one client's plan and ledger --------------------------------------------------------------------
@dataclass
class Ledger:
    """What one client has spent: its plan (fixed at its first use) and its step history."""

    target_epsilon: float
    delta: float
    accountant: str
    noise_multiplier: float = 0.0  # DP-SGD's, calibrated once
    sample_rate: float = 0.0
    steps_per_round: int = 0
    participations: int = 0
    stats_noise_multiplier: float = 0.0
    history: History = field(default_factory=list)
    # DP-SGD of the synthetic-data generator (fedapp.features.synthetic); last, so that positional
    # construction of older ledgers keeps its meaning
    generator_noise_multiplier: float = 0.0
    # The ledger is the institution's, across runs: `run` is the server run (chain of resumed
    # runs) the plan above is for, `run_start_epsilon` what was spent before it began, and
    # `stats_released` whether this run's statistics release happened.
    run: str = ""
    run_start_epsilon: float = 0.0
    stats_released: bool = False

    def epsilon(self, extra: History = ()) -> float:
        return epsilon_of([*self.history, *extra], self.delta, self.accountant)

    def share(self, fraction: float) -> float:
        """The epsilon after spending `fraction` of what this run may spend (its budget left
        at the start of the run)."""
        return self.run_start_epsilon + fraction * (self.target_epsilon - self.run_start_epsilon)

    def start_run(self, run: str, target_epsilon: float, who: str) -> None:
        """A new server run: the strictest target so far applies (stored or new), the plan is
        made again for what is left, and the history is kept (PrivacyBudgetExhausted when
        nothing is left)."""
        self.target_epsilon = min(self.target_epsilon, float(target_epsilon))
        if run == self.run:
            return
        spent = self.epsilon()
        if spent >= self.target_epsilon * (1 - 1e-6):
            raise PrivacyBudgetExhausted(
                f"{who} has spent epsilon={spent:.3f} of its lifetime {self.target_epsilon:g} "
                "in earlier runs; it trains no more (its ledger is kept across runs)"
            )
        self.run, self.run_start_epsilon, self.stats_released = run, spent, False
        self.noise_multiplier = self.stats_noise_multiplier = 0.0
        self.generator_noise_multiplier = self.sample_rate = 0.0
        self.steps_per_round = self.participations = 0

    def record(self, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        """Add steps to the history (merged with the last entry when it is the same mechanism,
        as Opacus' accountants do: the epsilon is the same, its computation cheaper)."""
        if self.history and self.history[-1][:2] == (noise_multiplier, sample_rate):
            s, q, n = self.history[-1]
            self.history[-1] = (s, q, n + int(steps))
        else:
            self.history.append((noise_multiplier, sample_rate, int(steps)))

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Ledger:
        data = json.loads(text)
        data["history"] = [tuple(h) for h in data["history"]]
        return cls(**data)


def ledger_dir(node_config: Mapping[str, Any]) -> str:
    """The node's own folder for its DP ledger: `ledger-dir` (or `dp-state-dir`) in its node
    config; '' when it names none."""
    return str(node_config.get("ledger-dir") or node_config.get("dp-state-dir") or "")


def ledger_file(node_config: Mapping[str, Any], partition_id: int) -> Path | None:
    """The file of an institution's ledger (one per institution, across runs): under the
    node's `ledger-dir`, named by its `institution` id (default `client-<partition id>`).
    None: the ledger lives in the client's state (simulation: its state folder)."""
    folder = ledger_dir(node_config)
    if not folder:
        return None
    name = str(node_config.get("institution") or f"client-{int(partition_id)}")
    return Path(folder).expanduser() / f"{name}.dp-ledger.json"


def run_key(context) -> str:
    """The server run (chain of resumed runs) this message belongs to, for the ledger's plan."""
    return str(context.run_config.get(RUN_KEY) or f"flower-run-{int(context.run_id)}")


def require_persistent_ledger(node_config: Mapping[str, Any]) -> None:
    """A deployed node spends privacy only into a ledger that survives runs and restarts."""
    if node_config.get("data-path") and not ledger_dir(node_config):
        raise PrivacyError(
            "privacy=sample_dp on a deployed node needs a persistent DP ledger: start the "
            "SuperNode with --node-config 'ledger-dir=/var/lib/fedapp/ledger ...' (the ledger "
            "is kept there across runs and restarts)"
        )


def open_ledger(
    spec: PrivacySpec,
    task,
    partition_id: int,
    state: RecordDict,
    node_config: Mapping[str, Any],
    run: str,
) -> tuple[Ledger, Path | None]:
    """This client's ledger, started for server run `run` (see `Ledger.start_run`)."""
    require_persistent_ledger(node_config)
    path = ledger_file(node_config, partition_id)
    ledger = load_ledger(state, path) or new_ledger(spec, task, partition_id, node_config)
    names = [str(partition_id), *task.natural_ids(partition_id)]
    ledger.start_run(run, client_target(spec, names, node_config), f"client {partition_id}")
    return ledger, path


def load_ledger(state: RecordDict, path: Path | None) -> Ledger | None:
    """The ledger: its file when the node names a `ledger-dir` (the file alone counts: it is
    written at every spending, and a state record, which in simulation is restored from a
    folder, could otherwise stand in for it with a history that counts many steps and spends
    little), else the one in the client's state."""
    if path is not None:
        return Ledger.from_json(path.read_text()) if path.exists() else None
    if STATE_KEY in state.config_records:
        return Ledger.from_json(str(state.config_records[STATE_KEY]["json"]))
    return None


def save_ledger(ledger: Ledger, state: RecordDict, path: Path | None) -> None:
    text = ledger.to_json()
    state.config_records[STATE_KEY] = ConfigRecord({"json": text})
    if path is not None:
        write_atomic(path, text, PRIVATE, durable=True)  # the institution's, across runs


LOCKED_MESSAGES = ("train", "train.generator", "train.synthesize", "query.stats")


def ledger_lock_mod(msg, context, call_next):
    """ClientApp mod (inside `virtual_client_mod`, so the node config is the client's own):
    a message that may spend privacy holds an exclusive lock on its institution's ledger file
    from reading the ledger to writing it, so two messages at once (two SuperNode processes
    for one institution, or an operator's restart) cannot both plan from the same history and
    lose one's spending. `flock` on `<ledger>.lock` beside the file; released when the process
    ends, so a crashed client never leaves it held."""
    path = None
    if str(msg.metadata.message_type) in LOCKED_MESSAGES:
        pid = int(context.node_config.get("partition-id", -1))
        path = ledger_file(context.node_config, pid)
    if path is None:
        return call_next(msg, context)
    with ledger_lock(path):
        return call_next(msg, context)


@contextlib.contextmanager
def ledger_lock(path: Path):
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# -- the statistics release (tabular tasks) ---------------------------------------------------------
def split_stats_noise(
    noise_multiplier: float, d: int, label_share: float | None
) -> tuple[float, float]:
    """Per-coordinate noise std (in units of one row's change) of the statistics release's two
    parts: the 3 d counts, sums / clip and sums of squares / clip^2 (L2 sensitivity sqrt(3 d)),
    and the label histogram (L2 sensitivity 1: a row adds 1 to one count).

    One Gaussian release of noise multiplier sigma has zCDP rho = 1 / (2 sigma^2) (and RDP
    alpha rho at every order alpha; Gaussian DP mu = 1 / sigma). Giving the histogram the share
    f of rho and the sums 1 - f: multipliers sigma / sqrt(f) and sigma / sqrt(1 - f), whose
    composition has 1 / sigma_s^2 + 1 / sigma_h^2 = 1 / sigma^2, exactly the one release the
    ledger records at sigma, under RDP and PRV alike. f = None: one mechanism over the whole
    vector (sensitivity sqrt(3 d + 1)), every coordinate std sigma sqrt(3 d + 1), which is
    the split f = 1 / (3 d + 1)."""
    if label_share is None:
        both = noise_multiplier * math.sqrt(3 * d + 1)
        return both, both
    if not 0 < label_share < 1:
        raise PrivacyError(f"privacy.stats_label_share={label_share} must be in (0, 1)")
    sums = noise_multiplier * math.sqrt(3 * d) / math.sqrt(1 - label_share)
    return sums, noise_multiplier / math.sqrt(label_share)


def privatize_stats(
    stats: dict[str, list[float]],
    clip: float,
    noise_multiplier: float,
    seed: int,
    label_share: float | None = None,
) -> dict[str, list[float]]:
    """Gaussian mechanism on one client's sufficient statistics (values already clipped to
    [-clip, clip]): counts, sums / clip, sums of squares / clip^2 and the label histogram each
    change by at most 1 per coordinate when a row is added or removed. The histogram's share
    `label_share` of the release's budget sets the two parts' noise (`split_stats_noise`; the
    release as a whole spends what one at `noise_multiplier` does). The server's combination
    post-processes (clamps) the noisy sums."""
    d = len(stats["stats.count"])
    sums_std, labels_std = split_stats_noise(noise_multiplier, d, label_share)
    scale = {
        "stats.count": sums_std,
        "stats.sum": sums_std * clip,
        "stats.sumsq": sums_std * clip**2,
        "stats.labels": labels_std,
    }
    rng = np.random.default_rng(noise_seed(int(seed) * 0xD9))  # secret (tasks.dp_sgd)
    out = {}
    for key, values in stats.items():
        v = np.asarray(values, dtype=np.float64)
        out[key] = (v + secure_gaussian(rng, scale[key], v.shape)).tolist()
    return out


def secure_gaussian(rng: np.random.Generator, std: float, shape) -> np.ndarray:
    """N(0, std^2) as Opacus' secure mode draws it (tasks.dp_sgd.SECURE_NOISE): the sum of
    four draws over 2, so that the low bits of one value do not reveal the draw (the
    floating-point attack on the Gaussian mechanism, Mironov 2012)."""
    if not SECURE_NOISE:
        return rng.normal(0.0, std, size=shape)
    return rng.normal(0.0, std, size=(4, *tuple(np.atleast_1d(shape)))).sum(0) / 2.0


# -- DP-SGD in the training loop --------------------------------------------------------------------
class SampleDP(ClientUnit):
    """Sample-level DP-SGD as a client-side unit (stage "privacy", between the attack harness
    and the strategy's part): plan, refuse over budget, train privately, account, report."""

    stage = "privacy"

    @classmethod
    def wanted(cls, job: TrainJob) -> bool:
        return PrivacySpec.from_config(job.cfg.get("privacy")).sample_level

    def before_train(self, job: TrainJob) -> None:
        spec = PrivacySpec.from_config(job.cfg.get("privacy"))
        ledger, self.path = open_ledger(
            spec, job.task, job.partition_id, job.state, job.node_config, job.run_key
        )
        n = job.data.num_train
        if ledger.delta >= 1.0 / (n - job.synthetic_rows):  # the client's own rows
            raise PrivacyError(
                f"privacy.delta={ledger.delta:g} is not below 1/n = 1/{n} for client "
                f"{job.partition_id}; lower privacy.delta"
            )
        steps_per_epoch = max(1, math.ceil(n / job.settings.batch_size))
        if not ledger.noise_multiplier:
            plan_dp_sgd(ledger, spec, job, steps_per_epoch)
        this_round = [
            (ledger.noise_multiplier, 1.0 / steps_per_epoch, job.settings.steps_per_round(n))
        ]
        after = ledger.epsilon(this_round)
        if after > ledger.target_epsilon * (1 + 1e-9):
            raise PrivacyBudgetExhausted(
                f"client {job.partition_id} has spent epsilon={ledger.epsilon():.3f} of its "
                f"{ledger.target_epsilon:g}; this round would take it to {after:.3f}, so it does "
                "not train (raise privacy.participations or the target to let it)"
            )
        self.ledger = ledger
        self.hook = DPSGDHook(ledger.noise_multiplier, spec.max_grad_norm, job.seed ^ 0xD95)
        job.hooks.append(self.hook)
        job.withheld.update(WITHHELD)

    def after_train(self, job: TrainJob) -> None:
        self.hook.finish()
        ledger = self.ledger
        if self.hook.steps:
            ledger.record(ledger.noise_multiplier, self.hook.sample_rate, self.hook.steps)
        save_ledger(ledger, job.state, self.path)
        job.reply_metrics.update(
            {
                "dp_epsilon": ledger.epsilon(),
                "dp_target_epsilon": ledger.target_epsilon,
                "dp_noise_multiplier": ledger.noise_multiplier,
                "dp_delta": ledger.delta,
                **({"dp_noise_seeded": 1} if seeded_noise() else {}),
            }
        )


def new_ledger(spec: PrivacySpec, task, partition_id: int, node_config: Mapping) -> Ledger:
    """A first ledger: the strictest target that applies, and the run's delta unless the
    node's `max-delta` is smaller (a ledger's delta is fixed at its first use)."""
    names = [str(partition_id), *task.natural_ids(partition_id)]
    return Ledger(
        client_target(spec, names, node_config), client_delta(spec, node_config), spec.accountant
    )


def client_delta(spec: PrivacySpec, node_config: Mapping[str, Any]) -> float:
    """The run's delta, lowered to the node's `max-delta` when that is smaller."""
    cap = NodePolicy.from_node_config(node_config).max_delta
    return spec.delta if cap is None else min(spec.delta, cap)


def private_stats(node, context) -> dict[str, list[float]]:
    """This node's federated statistics: exact without privacy; under sample_dp clipped to
    `stats_clip`, released through the Gaussian mechanism once, and accounted in its ledger."""
    spec = PrivacySpec.from_config(node.cfg.get("privacy"))
    if not spec.sample_level:
        return node.task.client_stats(node.data)
    ledger, path = open_ledger(
        spec, node.task, node.partition_id, context.state, context.node_config, run_key(context)
    )
    if ledger.stats_released:
        raise PrivacyBudgetExhausted(
            f"client {node.partition_id} has released its statistics in this run already"
        )
    plan_stats(ledger, spec)
    stats = node.task.client_stats(node.data, clip=spec.stats_clip)
    seed = int(node.cfg.seed) * 1_000_003 + node.partition_id  # the seeded test mode only
    noisy = privatize_stats(
        stats, spec.stats_clip, ledger.stats_noise_multiplier, seed, spec.stats_label_share
    )
    ledger.record(ledger.stats_noise_multiplier, 1.0, 1)
    ledger.stats_released = True
    save_ledger(ledger, context.state, path)
    # kept by the client: its released (noisy) label histogram, which later uses read for free
    # (post-processing; fedapp.features.synthetic draws its synthetic rows' labels from it)
    context.state.config_records[LABELS_KEY] = ConfigRecord({"counts": noisy["stats.labels"]})
    return noisy


def plan_stats(ledger: Ledger, spec: PrivacySpec) -> None:
    """Noise of the statistics release: a share of what the run may spend (by itself in a
    client's first run; after what earlier runs spent otherwise)."""
    if not ledger.history:
        share = spec.stats_share * ledger.target_epsilon
        ledger.stats_noise_multiplier = gaussian_noise_multiplier(
            share, ledger.delta, ledger.accountant
        )
        return
    ledger.stats_noise_multiplier = calibrate(
        ledger.share(spec.stats_share), ledger.delta, 1.0, 1, ledger.accountant, ledger.history
    )


PLAN_ROUNDS = "dp-rounds"  # round config: the rounds a client plans its DP noise for
PLAN_PER_ROUND = "dp-per-round"  # round config: the clients sampled per round
PLAN_MAX = 10**6


def plan_config(cfg: DictConfig) -> dict[str, int]:
    """What the ServerApp puts in every training round's config under sample-level DP: the
    run's plan, from which a client calibrates its noise (`plan_inputs`). A strategy whose
    first rounds do not train the task model sends fewer `dp-rounds` (the generator phase of
    fedapp.features.synthetic)."""
    if not PrivacySpec.from_config(cfg.get("privacy")).sample_level:
        return {}
    return {PLAN_ROUNDS: int(cfg.rounds), PLAN_PER_ROUND: int(cfg.clients_per_round)}


def plan_inputs(config: Mapping[str, Any]) -> tuple[int, int]:
    """(rounds, clients per round) of the plan in a round's config. They come from the server
    and only size the noise: a plan that understates the run gives less noise per step, and
    the ledger then refuses the rounds that would go over the node's budget (the epsilon
    holds; training stops early); one that overstates it wastes utility, never privacy."""
    values = []
    for key in (PLAN_ROUNDS, PLAN_PER_ROUND):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= PLAN_MAX:
            raise PrivacyError(
                f"the round's config has {key}={value!r}: a fedapp ServerApp sends the run's "
                f"plan ({PLAN_ROUNDS}, {PLAN_PER_ROUND}: integers in [1, {PLAN_MAX}]) under "
                "sample-level DP; this client does not train without it"
            )
        values.append(int(value))
    return values[0], values[1]


def plan_dp_sgd(ledger: Ledger, spec: PrivacySpec, job: TrainJob, steps_per_epoch: int) -> None:
    """Calibrate DP-SGD's noise once for the whole planned run, after what was already spent."""
    participations = spec.participations
    if participations == "auto":  # the plan of the round's config (`plan_inputs`)
        rounds, per_round = plan_inputs(job.config)
        participations = planned_participations(rounds, per_round, job.num_clients)
    ledger.participations = int(participations)
    ledger.sample_rate = 1.0 / steps_per_epoch
    ledger.steps_per_round = job.settings.steps_per_round(job.data.num_train)
    ledger.noise_multiplier = calibrate(
        ledger.target_epsilon,
        ledger.delta,
        ledger.sample_rate,
        ledger.steps_per_round * ledger.participations,
        ledger.accountant,
        prefix=ledger.history,
    )


# -- client-level (central) DP through Flower's wrappers ---------------------------------------------
DP_WEIGHT = "dp-weight"  # every client's (equal) aggregation weight under central DP


def central_dp_refusal(cls: type) -> str | None:
    """Why strategy class `cls` cannot run under central DP (None: it can). Flower's DP
    wrappers add noise of std z C / m to the *equally weighted* average of m clipped updates;
    that is only the stated guarantee when the strategy's aggregate is that average. Read
    from the capabilities the class declares (strategies.base.FedappStrategyMixin)."""
    name = cls.__name__
    if getattr(cls, "schedules_rounds", False):
        return f"{name} schedules its own rounds (event-driven); the per-round release is not fixed"
    if getattr(cls, "extra_array_records", ()):
        return f"{name} sends more than the model ({list(cls.extra_array_records)}), which would not be clipped"
    rule = getattr(cls, "aggregation_rule", "weighted_mean")
    if rule == "server_optimizer":
        return (
            f"{name}'s server optimizer makes the new model a non-linear function of the "
            "plaintext mean and of state from earlier rounds, not the average itself"
        )
    if rule != "weighted_mean":
        return f"{name} aggregates with its own rule ({rule}), not FedAvg's average"
    return None


def check_combination(cfg: DictConfig) -> None:
    """Refuse, before any work, a privacy mode the configured strategy cannot honour."""
    from hydra.utils import get_class

    spec = PrivacySpec.from_config(cfg.get("privacy"))
    if spec.name == "sample_dp" and str(cfg.train.get("precision", "fp32")) == "fp16":
        raise PrivacyError(
            "privacy=sample_dp cannot be combined with train.precision=fp16: fp16's loss "
            "scaling scales the per-sample gradients DP-SGD clips. Use train.precision=bf16 "
            "or fp32."
        )
    if spec.name == "sample_dp":
        cls = get_class(str(cfg.strategy._target_))
        needed = sorted(set(getattr(cls, "required_metrics", ())) & set(WITHHELD))
        if needed:
            raise PrivacyError(
                f"privacy=sample_dp cannot be combined with strategy={cfg.strategy.name}: its "
                f"aggregation needs each client's {', '.join(needed)}, a statistic of the "
                "client's rows that DP-SGD does not cover, so sample_dp does not send it. "
                "Use another strategy (e.g. fedavg or fedprox)."
            )
        why = getattr(cls, "sample_dp_refusal", "")  # declared (strategies.base)
        if why:
            raise PrivacyError(
                f"privacy=sample_dp cannot be combined with strategy={cfg.strategy.name}: {why}"
            )
    if spec.name != "central_dp":
        return

    compression = cfg.get("compression")
    if compression is not None and compression.get("name", "none") != "none":
        raise PrivacyError(
            "privacy=central_dp cannot be combined with compression: Flower's wrapper clips "
            "the updates as sent, which would be the encoded ones; use compression=none"
        )
    why = central_dp_refusal(get_class(str(cfg.strategy._target_)))
    if why:
        raise PrivacyError(
            f"privacy=central_dp cannot be combined with strategy={cfg.strategy.name}: {why}; "
            "the noise is calibrated to an equally weighted average of clipped updates. "
            "Use strategy=fedavg, fedprox or moon, or privacy=sample_dp."
        )


def with_privacy(strategy, cfg: DictConfig, num_sampled: int):
    """The strategy as the run's privacy mode needs it: unchanged, or (central_dp) with a
    `CentralDP` release mechanism plugged into its round loop (`strategy.release`, the
    interface fedapp.core.plugins.ReleaseMechanism). Refused combinations raise PrivacyError."""
    spec = PrivacySpec.from_config(cfg.get("privacy"))
    if spec.name != "central_dp":
        return strategy
    check_combination(cfg)
    strategy.weighted_by_key = DP_WEIGHT
    strategy.release = CentralDP(strategy, spec, num_sampled)
    return strategy


class CentralDP:
    """Central DP around a strategy's training rounds: one of Flower's fixed-clipping DP
    wrappers (`DifferentialPrivacyServerSideFixedClipping` or `...ClientSideFixedClipping`,
    by `privacy.clipping`) wraps the strategy, and the strategy's own round loop sends the
    wrapper's training messages and keeps its noised aggregate (`release`, a
    fedapp.core.plugins.ReleaseMechanism); evaluation, records and everything else stay the
    strategy's. Flower's own accountant requires the unmodified `FedAvg.aggregate_train`,
    which fedapp's screening replaces; the same Gaussian releases are accounted here with
    Opacus' RDP/PRV accountant: each aggregated round is one Gaussian mechanism with noise
    multiplier z on the average (sensitivity clipping_norm / m for add/remove one client, m
    fixed), composed without amplification by client sampling."""

    def __init__(self, strategy, spec: PrivacySpec, num_sampled: int) -> None:
        from flwr.serverapp.strategy import (
            DifferentialPrivacyClientSideFixedClipping,
            DifferentialPrivacyServerSideFixedClipping,
        )

        wrapper = (
            DifferentialPrivacyServerSideFixedClipping
            if spec.clipping == "server"
            else DifferentialPrivacyClientSideFixedClipping
        )
        self.strategy = strategy
        self.flower = wrapper(strategy, spec.noise_multiplier, spec.clipping_norm, num_sampled)
        self.spec = spec
        self.releases = 0

    @property
    def num_sampled_clients(self) -> int:
        return int(self.flower.num_sampled_clients)

    def bind(self) -> None:
        """After the strategy is bound: the noise is calibrated to m clients, so a round with
        fewer accepted updates (a larger sensitivity) releases nothing."""
        self.strategy.min_replies = max(self.strategy.min_replies, self.num_sampled_clients)

    def privacy_epsilon(self, releases: int | None = None) -> float:
        n = self.releases if releases is None else releases
        history = [(self.spec.noise_multiplier, 1.0, n)] if n else []
        return epsilon_of(history, self.spec.delta, self.spec.accountant)

    def stop_reason(self) -> str | None:
        """Why no further round may start: another release would spend more than the target."""
        spent = self.privacy_epsilon(self.releases + 1)
        if spent <= self.spec.target_epsilon:
            return None
        return (
            f"central DP budget: another round would spend epsilon > {self.spec.target_epsilon:g}"
        )

    def resumed(self) -> None:
        """A resumed run: the dead server may have aggregated one more round after its last
        checkpoint and sent that model to evaluation clients; count that release too (an
        upper bound: the epsilon reported never understates what was released)."""
        self.releases += 1

    def configure_train(self, server_round, arrays, config, grid):
        return self.flower.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        with secret_numpy_noise(int(server_round)):  # Flower's wrapper draws np.random.normal
            arrays, metrics = self.flower.aggregate_train(server_round, replies)
        if arrays is not None:
            self.releases += 1
            rec = self.strategy.round_log(server_round)
            accepted = list(rec.accepted("train").values())
            for client in accepted:
                client.weight = 1.0 / len(accepted)
        return arrays, metrics


@contextlib.contextmanager
def secret_numpy_noise(reproducible: int):
    """Run a block that draws DP noise from numpy's global generator (Flower's central-DP
    wrappers do) with that generator seeded from fresh OS entropy; the seeded state of
    before is put back after it, so that everything else stays reproducible and a checkpoint
    of numpy's state never predicts the noise. (In the seeded test mode the noise comes from
    a generator seeded by the round instead.)"""
    saved = np.random.get_state()
    if seeded_noise():
        seed = noise_seed(reproducible * 0xCD9)
        words = [(seed >> (32 * i)) & 0xFFFFFFFF for i in range(2)]
    else:
        words = [secrets.randbits(32) for _ in range(4)]
    try:
        np.random.seed(words)
        yield
    finally:
        np.random.set_state(saved)


class CentralDPClient(ClientUnit):
    """Under central DP a client reports an equal aggregation weight (`dp-weight`)."""

    stage = "privacy"

    @classmethod
    def wanted(cls, job: TrainJob) -> bool:
        return PrivacySpec.from_config(job.cfg.get("privacy")).name == "central_dp"

    def after_train(self, job: TrainJob) -> None:
        job.reply_metrics[DP_WEIGHT] = 1


def central_clipping_mod(msg, context, call_next):
    """Flower's `fixedclipping_mod`, for training messages that ask for it (central DP with
    client-side clipping sends `clipping_norm`); every other message passes through."""
    config = msg.content.config_records.get("config")
    if config is None or "clipping_norm" not in config:
        return call_next(msg, context)
    from flwr.clientapp.mod import fixedclipping_mod

    return fixedclipping_mod(msg, context, call_next)


# -- fedapp-ledger: what an institution has spent ---------------------------------------------------
def ledger_report(path: Path) -> list[dict[str, Any]]:
    """One row per ledger file (`<institution>.dp-ledger.json`) under `path` (a file or a
    node's ledger-dir): its lifetime target, what it has spent and what is left."""
    files = [path] if path.is_file() else sorted(path.glob("*.dp-ledger.json"))
    rows = []
    for f in files:
        ledger = Ledger.from_json(f.read_text())
        spent = ledger.epsilon()
        rows.append(
            {
                "institution": f.name.removesuffix(".dp-ledger.json"),
                "target_epsilon": ledger.target_epsilon,
                "spent_epsilon": spent,
                "left_epsilon": max(ledger.target_epsilon - spent, 0.0),
                "delta": ledger.delta,
                "accountant": ledger.accountant,
                "steps": sum(int(n) for *_, n in ledger.history),
                "last_run": ledger.run,
            }
        )
    return rows


def ledger_main(argv: Sequence[str] | None = None) -> int:
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog="fedapp-ledger",
        description="What an institution has spent of its differential-privacy budget, over "
        "every run: its node's ledger-dir (or one ledger file).",
    )
    parser.add_argument("path", type=Path)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if not args.path.exists():
        print(f"fedapp-ledger: {args.path} does not exist", file=sys.stderr)
        return 2
    rows = ledger_report(args.path)
    if not rows:
        print(f"fedapp-ledger: no *.dp-ledger.json in {args.path}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    for r in rows:
        print(
            f"{r['institution']}: spent epsilon {r['spent_epsilon']:.3f} of {r['target_epsilon']:g} "
            f"(left {r['left_epsilon']:.3f}) at delta {r['delta']:g}, {r['steps']} steps, "
            f"{r['accountant']} accountant"
        )
    return 0
