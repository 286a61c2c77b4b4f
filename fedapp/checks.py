"""The one home of cross-feature checks: combinations of settings a run cannot honour.

`fedapp.core.config.compose` checks each setting by itself (ranges, types, partitions): it sits in
the core layer and knows no feature. Whether privacy, encryption, synthetic data and the
strategy can run together is asked here, a composition root above the features, which each
answer from their own spec and the capabilities strategy classes declare
(`strategies.base.FedappStrategyMixin`):

- the launchers and the ServerApp compose with `compose` below (settings, then combinations);
- every ClientApp message passes `combination_mod` (fedapp.client_app), so a node refuses a
  combination on its own composition of the run's config, whatever the server checked.

Adding a feature with a combination rule: write its `check_combination(cfg)` in the feature's
module and list it in `CHECKS`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from flwr.app import Context, Message
from omegaconf import DictConfig

from fedapp.core import config
from fedapp.core.node import node_cfg
from fedapp.features import privacy, secure, synthetic
from strategies import personal

__all__ = ["CHECKS", "check_all", "combination_mod", "compose"]


def _personal(cfg: DictConfig) -> None:
    """strategies.personal's refusals (a strategy module cannot raise the config layer's
    error), as a ConfigError."""
    try:
        personal.check_combination(cfg)
    except personal.PersonalError as err:
        raise config.ConfigError(str(err)) from err


# (feature, its check): run in this order, the first refusal is reported
CHECKS: tuple[tuple[str, Callable[[DictConfig], None]], ...] = (
    ("privacy", privacy.check_combination),
    ("secure", secure.check_combination),
    ("synthetic", synthetic.check),
    ("strategy", _personal),
)


def check_all(cfg: DictConfig) -> None:
    """Raise the first feature's refusal (a ConfigError subclass) of this configuration."""
    for group, check in CHECKS:
        if group == "synthetic" or cfg.get(group) is not None:
            check(cfg)


def compose(overrides: str | Sequence[str] | None = None) -> DictConfig:
    """`conf/config.yaml` with Hydra overrides, each setting and every combination checked."""
    cfg = config.compose(overrides)
    try:
        check_all(cfg)
    except config.ConfigError:
        raise
    except (ValueError, TypeError) as err:  # a conversion a feature's spec did not foresee
        ovr = " ".join(config.parse_overrides(overrides)) or "none"
        raise config.ConfigError(f"a setting has the wrong type ({err}); overrides: {ovr}") from err
    return cfg


# configs already checked, by identity (fedapp.core.node caches one DictConfig per set of
# overrides); holding them keeps their ids from being reused
_CHECKED: dict[int, DictConfig] = {}


# messages that spend nothing and release nothing of a client's data: which partition a node
# holds (the server maps clients before it can name one) and liveness
UNCHECKED = ("query", "query.heartbeat")


def combination_mod(msg: Message, context: Context, call_next) -> Message:
    """ClientApp mod: refuse a message whose run configuration (as this node composes it from
    its own conf/ and the overrides its policy accepts) combines features that cannot run
    together. Raising makes Flower answer with an error reply, as a refused policy does.
    Discovery and heartbeats pass (`UNCHECKED`): they use no feature."""
    if msg.metadata.message_type not in UNCHECKED:
        cfg = node_cfg(context)
        if id(cfg) not in _CHECKED:
            check_all(cfg)
            if len(_CHECKED) >= 64:
                _CHECKED.clear()
            _CHECKED[id(cfg)] = cfg
    return call_next(msg, context)
