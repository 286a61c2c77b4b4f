"""The synthetic-data feature's settings and message contract: `strategy.generator` and the
`augment` group (`GeneratorSpec`, `AugmentSpec`), the record keys a generator and synthetic rows
travel under, and which runs may ask a client for either (`check_generator_message`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from fedapp.core.config import ConfigError
from fedapp.core.policy import PolicyRefusal, registered_strategy

GEN_KEY = "fedapp.generator"  # the generator's ArrayRecord in augment's training messages

GEN_CACHE_KEY = "fedapp.generator-cache"  # a client's copy of it (augment), in its state

GEN_DIGEST = "generator-digest"  # round config (augment): the generator a client must use

ROW_KEYS = ("numeric", "codes", "y")  # a synthetic rows reply's ArrayRecord


class SyntheticError(ConfigError):
    """Invalid synthetic-data settings or an unusable task; the message says what to set."""


@dataclass(frozen=True)
class GeneratorSpec:
    """`strategy.generator` (strategy=synthetic) or `augment.generator` (augment=rare_class)."""

    rounds: int = 0  # federated rounds of the generator before it is used (0: local only)
    latent_dim: int = 8
    hidden: int = 64
    epochs: int = 2  # local epochs per generator round
    finetune_epochs: int = 10  # strategy=synthetic: local epochs before sampling
    batch_size: int = 256
    lr: float = 0.05
    momentum: float = 0.9
    zclip: float = 5.0  # numeric features are modelled (and generated) within +-zclip std
    epsilon_share: float = 1.0  # share of each client's target epsilon the generator may spend
    refine: str = "none"  # none | discriminator (strategy=synthetic: `refine_rows`)
    refine_epochs: int = 5  # the discriminator's local epochs
    refine_candidates: int = 4  # candidates drawn per row sent
    refine_share: float = 0.3  # of the generator's epsilon, for the discriminator

    @property
    def vae_share(self) -> float:
        """The share of the generator's epsilon the VAE itself may spend."""
        return 1.0 - self.refine_share if self.refine == "discriminator" else 1.0

    @classmethod
    def from_config(cls, raw: Mapping[str, Any] | DictConfig | None) -> GeneratorSpec:
        if raw is None:
            return cls()
        if isinstance(raw, DictConfig):
            raw = OmegaConf.to_container(raw, resolve=True)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise SyntheticError(f"generator: unknown keys {unknown}; known: {sorted(known)}")
        defaults = cls()
        spec = cls(**{k: type(getattr(defaults, k))(v) for k, v in raw.items()})
        spec.validate()
        return spec

    def validate(self) -> None:
        if self.rounds < 0 or self.epochs < 1 or self.finetune_epochs < 0:
            raise SyntheticError("generator: rounds and finetune_epochs >= 0, epochs >= 1")
        if min(self.latent_dim, self.hidden, self.batch_size) < 1 or not self.lr > 0:
            raise SyntheticError("generator: latent_dim, hidden, batch_size and lr must be > 0")
        if not 0 < self.epsilon_share <= 1:
            raise SyntheticError(f"generator.epsilon_share={self.epsilon_share} must be in (0, 1]")
        if not self.zclip > 0:
            raise SyntheticError("generator.zclip must be > 0")
        if self.refine not in ("none", "discriminator"):
            raise SyntheticError(f"generator.refine={self.refine!r}: use none or discriminator")
        if self.refine_epochs < 1 or self.refine_candidates < 2:
            raise SyntheticError("generator: refine_epochs >= 1 and refine_candidates >= 2")
        if not 0 < self.refine_share < 1:
            raise SyntheticError(f"generator.refine_share={self.refine_share} must be in (0, 1)")


def shares_rows(cfg: DictConfig) -> bool:
    """Whether the run's strategy shares synthetic rows (it declares `shares_synthetic_rows`:
    strategy=synthetic), read from its registered class, never from its name."""
    cls = get_class(registered_strategy(str(cfg.strategy._target_)))
    return bool(cls.shares_synthetic_rows)


def generator_spec(cfg: DictConfig) -> GeneratorSpec:
    """The run's generator settings: strategy=synthetic's, else augment's."""
    if shares_rows(cfg):
        return GeneratorSpec.from_config(cfg.strategy.get("generator"))
    return AugmentSpec.from_config(cfg.get("augment")).generator


def check_generator_message(cfg: DictConfig, policy, sharing: bool) -> None:
    """A client trains a generator only when the run it joined declared one (strategy=
    synthetic, or augment=rare_class for the generator rounds), and sends synthetic rows
    only under strategy=synthetic; never under its `require-secure` policy (the generator and
    the rows travel unencrypted). Anything else is refused (PolicyRefusal): a server cannot
    make a client spend its budget, or send rows, on a phase it did not announce."""
    strategy = str(cfg.strategy.get("name"))
    kind = "train.synthesize (synthetic rows)" if sharing else "train.generator"
    declared = shares_rows(cfg) or (not sharing and augment_active(cfg))
    if not declared:
        raise PolicyRefusal(
            f"{kind}: the run configuration (strategy={strategy}, augment="
            f"{OmegaConf.select(cfg, 'augment.name', default='none')}) has no synthetic-data phase"
        )
    if policy.require_secure:
        raise PolicyRefusal(
            f"{kind}: this institution requires secure=ckks, and a generator or synthetic rows "
            "would leave it unencrypted"
        )


def augment_active(cfg: DictConfig) -> bool:
    augment = cfg.get("augment")
    return augment is not None and str(augment.get("name", "none")) != "none"


@dataclass(frozen=True)
class AugmentSpec:
    """The `augment` config group."""

    name: str = "none"
    target_fraction: float = 0.3  # the minority class's share of local training after augmenting
    generator: GeneratorSpec = GeneratorSpec(
        rounds=3, epochs=3, finetune_epochs=0, epsilon_share=0.3
    )

    @classmethod
    def from_config(cls, cfg: DictConfig | None) -> AugmentSpec:
        if cfg is None:
            return cls()
        raw = OmegaConf.to_container(cfg, resolve=True)
        assert isinstance(raw, dict)
        unknown = sorted(set(raw) - {"name", "target_fraction", "generator"})
        if unknown:
            raise SyntheticError(f"augment: unknown keys {unknown}")
        name = str(raw.get("name", "none"))
        if name not in ("none", "rare_class"):
            raise SyntheticError(f"augment={name}: use none or rare_class")
        frac = float(raw.get("target_fraction", 0.3))
        if not 0 < frac < 1:
            raise SyntheticError(f"augment.target_fraction={frac} must be in (0, 1)")
        return cls(name, frac, GeneratorSpec.from_config(raw.get("generator")))
