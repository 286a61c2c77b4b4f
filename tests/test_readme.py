"""The documentation's statements that code can check: the support table of strategies x
privacy, encryption and compression (docs/reference/support.md) is what `compose` accepts and
refuses; the attack table names tests that exist."""

from __future__ import annotations

import re

import pytest
from hydra.utils import get_class

from fedapp.checks import compose
from fedapp.core.config import PROJECT_ROOT, ConfigError
from fedapp.core.config import compose as settings_only

COLUMNS = {
    1: ["secure=ckks"],
    2: ["compression=fp16", "compression=int8", "compression=topk"],
    3: ["privacy=sample_dp"],
    4: ["privacy=central_dp"],
}


def _table() -> dict[str, list[str]]:
    text = (PROJECT_ROOT / "docs" / "reference" / "support.md").read_text()
    block = text.split("<!-- support-table -->")[1].split("<!-- /support-table -->")[0]
    rows = [r for r in block.strip().splitlines()[2:] if r.startswith("|")]
    table = {}
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        for name in re.findall(r"`([a-z_]+)`", cells[0]):
            table[name] = cells
    return table


def test_the_table_lists_every_strategy_once():
    strategies = sorted(p.stem for p in (PROJECT_ROOT / "conf" / "strategy").glob("*.yaml"))
    assert sorted(_table()) == strategies


def _prerequisites(strategy: str) -> str:
    """The strategy with the settings of the task's model it declares it needs
    (`task_requires`: FedBN's task.norm=batch, FENDA's task.fenda=true)."""
    cls = get_class(str(settings_only(f"strategy={strategy}").strategy._target_))
    needs = getattr(cls, "task_requires", {})
    return " ".join(
        [f"strategy={strategy}"]
        + [f"task.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in needs.items()]
    )


@pytest.mark.parametrize("strategy", sorted(_table()))
def test_each_cell_is_what_the_code_accepts(strategy):
    cells = _table()[strategy]
    base = _prerequisites(strategy)
    compose(base)  # the strategy itself runs
    for column, overrides in COLUMNS.items():
        claimed = cells[column].split(":")[0]
        assert claimed in ("yes", "no"), cells[column]
        for override in overrides:
            try:
                compose(f"{base} {override}")
                accepted = "yes"
            except ConfigError:
                accepted = "no"
            assert accepted == claimed, f"support.md says {claimed} for {strategy} x {override}"


def test_the_attack_table_names_tests_that_exist():
    """docs/trust-boundary-attacks.md: every test it names is a test function of that file."""
    text = (PROJECT_ROOT / "docs" / "trust-boundary-attacks.md").read_text()
    named = re.findall(r"`(tests/[\w/]+\.py)::(test_\w+)`", text)
    assert len(named) >= 25
    for path, name in named:
        source = (PROJECT_ROOT / path).read_text()
        assert re.search(rf"^def {name}\(", source, re.M), f"{path}::{name} does not exist"
