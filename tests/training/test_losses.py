"""Each loss term against a hand computation on small tensors."""

import math

import pytest
import torch

from e2edict.losses import downstream_loss, kl_loss, mean_l0, mse_loss, next_token_ce, sparsity_loss


def test_sparsity_l1_scaled_by_d_in():
    c = torch.tensor([[[1.0, 0.0, 2.0], [0.0, 0.0, 3.0]]])  # 2 tokens, 3 latents
    # token L1 norms: 3 and 3 -> mean 3, divided by d_in = 4
    assert sparsity_loss(c, d_in=4).item() == pytest.approx(0.75)


def test_sparsity_is_lp_norm_not_power_sum():
    c = torch.tensor([[3.0, 4.0]])
    assert sparsity_loss(c, d_in=1, p=2.0).item() == pytest.approx(5.0)  # not 25
    assert sparsity_loss(c, d_in=5, p=0.5).item() == pytest.approx((math.sqrt(3) + 2) ** 2 / 5)


def test_mse_is_mean_over_all_elements():
    x = torch.zeros(2, 3, 4)
    x_hat = torch.zeros(2, 3, 4)
    x_hat[0, 0, 0] = 2.0
    assert mse_loss(x_hat, x).item() == pytest.approx(4.0 / 24)


def test_kl_direction_and_value():
    p = torch.tensor([0.7, 0.2, 0.1])
    q = torch.tensor([0.3, 0.3, 0.4])
    clean, spliced = p.log()[None, None], q.log()[None, None]
    expected = sum(pi * math.log(pi / qi) for pi, qi in zip(p.tolist(), q.tolist(), strict=True))
    reverse = sum(qi * math.log(qi / pi) for pi, qi in zip(p.tolist(), q.tolist(), strict=True))
    assert kl_loss(clean, spliced).item() == pytest.approx(expected, rel=1e-5)
    assert abs(expected - reverse) > 1e-2  # the test can tell the directions apart
    # logits shifted by a constant give the same distribution: KL 0, unlike cross-entropy
    assert kl_loss(clean + 3.0, clean).item() == pytest.approx(0.0, abs=1e-6)


def test_kl_mean_over_tokens():
    a = torch.tensor([[0.0, 0.0], [0.0, 0.0]])[None]
    b = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])[None]
    kl2 = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert kl_loss(a, b).item() == pytest.approx(kl2 / 2, rel=1e-5)


def test_downstream_total_over_k():
    clean = {"a": torch.zeros(1, 2, 2), "b": torch.zeros(1, 2, 2)}
    spliced = {"a": torch.ones(1, 2, 2), "b": torch.full((1, 2, 2), 3.0)}
    # mse a = 1, mse b = 9; (2.5 / 2) * 10
    assert downstream_loss(spliced, clean, 2.5).item() == pytest.approx(12.5)


def test_next_token_ce_hand():
    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 2] = math.log(3.0)  # p(2) = 3/6
    tokens = torch.tensor([[0, 2, 1]])
    ce = next_token_ce(logits, tokens)
    assert ce.shape == (1, 2)
    assert ce[0, 0].item() == pytest.approx(-math.log(0.5))
    assert ce[0, 1].item() == pytest.approx(math.log(4.0))


def test_presets_table():
    from e2edict.presets import PRESETS

    assert PRESETS["local"].coefficients() == {"local": 1.0, "kl": 0.0, "downstream": 0.0}
    assert PRESETS["e2e"].coefficients() == {"local": 0.0, "kl": 1.0, "downstream": 0.0}
    assert PRESETS["e2e+ds"].coefficients() == {"local": 0.0, "kl": 0.5, "downstream": 2.5}


def test_chunked_kl_value_and_gradient_match_the_plain_formula(monkeypatch):
    import torch.nn.functional as F

    from e2edict import losses

    monkeypatch.setattr(losses, "KL_CHUNK_ELEMENTS", 7 * 30)  # 7 rows of 30 per chunk: a ragged last one
    torch.manual_seed(0)
    clean = torch.randn(2, 25, 30, dtype=torch.float64)
    spliced = torch.randn(2, 25, 30, dtype=torch.float64, requires_grad=True)
    ours = kl_loss(clean, spliced)
    (g_ours,) = torch.autograd.grad(ours, spliced)
    lc, ls = F.log_softmax(clean, -1), F.log_softmax(spliced, -1)
    ref = (lc.exp() * (lc - ls)).sum(-1).mean()
    (g_ref,) = torch.autograd.grad(ref, spliced)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-12)
    torch.testing.assert_close(g_ours, g_ref, atol=1e-12, rtol=1e-10)


def test_mean_l0_counts_active_latents_and_shares_the_sparsity_kernel_when_compiled():
    """L0 against a count per token; compiled (inductor), L0 and the L1 sparsity term are one
    fused kernel: the codes are read once for both, not once each."""
    from torch._inductor.utils import run_and_get_code

    c = torch.relu(torch.randn(6, 10, 64, generator=torch.Generator().manual_seed(0)))
    assert mean_l0(c).item() == pytest.approx((c > 0).sum(-1).float().mean().item())
    odd = torch.tensor([[0.0, -0.0, float("nan"), -2.0, 1e-30, 0.0]])  # -0.0 is zero; NaN and negatives count
    strided = torch.cat([odd, odd]).T.contiguous().T  # [2, 6] stored column by column
    assert not strided.is_contiguous()
    assert mean_l0(odd).item() == 3.0 and mean_l0(strided).item() == 3.0
    torch._dynamo.reset()
    (got_s, got_l0), codes = run_and_get_code(torch.compile(lambda x: (sparsity_loss(x, 16), mean_l0(x))), c)
    torch.testing.assert_close(got_s, sparsity_loss(c, 16))
    torch.testing.assert_close(got_l0, mean_l0(c))
    kernels = [line for line in codes[0].splitlines() if "async_compile.cpp_pybinding(" in line]
    assert len(kernels) == 1 and "count_nonzero" in kernels[0] and "sum" in kernels[0], kernels
