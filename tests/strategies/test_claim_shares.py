"""Where the claim caps fall short, in numbers (docs/how-to/attacks.md quotes them): without a
statistics count only the median rule applies, so one liar among k equal clients weighs
max_examples_ratio / (max_examples_ratio + k - 1) of the round."""

from __future__ import annotations

import pytest

from strategies.claims import ClaimPolicy, claim_caps


@pytest.mark.parametrize(("k", "share"), [(4, 0.77), (20, 0.34)])
def test_one_liar_without_statistics_counts_takes_this_share(k, share):
    claims = {p: 100.0 for p in range(k - 1)} | {k - 1: 1e12}
    caps = claim_caps(claims, {}, {}, ClaimPolicy())
    weights = {p: min(v, caps[p][0]) for p, v in claims.items()}
    liar = weights[k - 1] / sum(weights.values())
    assert liar == pytest.approx(10 / (10 + k - 1))
    assert round(liar, 2) == share
    # with the client's own statistics count, the liar is held to its rows
    counted = claim_caps(claims, dict.fromkeys(claims, 100.0), {}, ClaimPolicy())
    assert counted[k - 1] == (100.0, "stats")
