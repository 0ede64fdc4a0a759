"""The convergence benchmark's arithmetic: tokens to reach a CE-loss increase, log-linear between budgets."""

import math
import sys

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
from convergence import tokens_to_reach  # noqa: E402


def rows(*pairs):
    return [{"tokens": t, "ce_loss_increase": c} for t, c in pairs]


def test_tokens_to_reach_interpolates_in_log_tokens():
    r = rows((100_000, 0.4), (400_000, 0.2))
    # halfway in CE between the budgets is halfway in log(tokens): sqrt(1e5 * 4e5) = 2e5
    assert tokens_to_reach(r, 0.3) == pytest.approx(math.sqrt(100_000 * 400_000))
    assert tokens_to_reach(r, 0.2) == pytest.approx(400_000)
    assert tokens_to_reach(r, 0.5) == 100_000  # reached at the first budget already
    assert tokens_to_reach(r, 0.1) is None  # never reached
    assert tokens_to_reach(list(reversed(r)), 0.3) == pytest.approx(200_000)  # order of rows does not matter
