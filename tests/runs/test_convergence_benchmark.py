"""The benchmarks' arithmetic: tokens to reach a CE-loss increase (log-linear between budgets), and
the short-budget benchmark's choice of a preset's optimizer and rate."""

import math
import sys

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
from convergence import tokens_to_reach  # noqa: E402
from short_budget import summary  # noqa: E402


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


def test_short_budget_choice_is_the_best_worst_run():
    """A rate that helps one source a lot and hurts the other does not win on its mean."""

    def row(preset, opt, lr, source, gap):
        return {"preset": preset, "optimizer": opt, "lr": lr, "source": source, "tokens": 30000, "gap_closed": gap}

    rows = [
        row("finetune", "schedulefree", 3e-3, "relu", 0.40), row("finetune", "schedulefree", 3e-3, "topk", 0.15),
        row("finetune", "schedulefree", 1e-3, "relu", 0.35), row("finetune", "schedulefree", 1e-3, "topk", 0.18),
        row("finetune", "adamw-linear", 1e-3, "relu", 0.30), row("finetune", "adamw-linear", 1e-3, "topk", 0.17),
        row("adapter", "adamw-linear", 1e-2, "relu", 0.50), row("adapter", "adamw-linear", 1e-2, "topk", 0.20),
    ]  # fmt: skip
    text, best = summary(rows)
    # mean 0.265 < 0.275, but worst 0.18 > 0.15
    assert (best["finetune"]["optimizer"], best["finetune"]["lr"]) == ("schedulefree", 1e-3)
    assert best["finetune"]["worst_gap_closed"] == pytest.approx(0.18)
    assert best["finetune"]["mean_gap_closed"] == pytest.approx(0.265)
    assert best["adapter"]["lr"] == 1e-2
    assert "| finetune | schedulefree | 0.003 | +27.5% | +15.0% | 2 |" in text
