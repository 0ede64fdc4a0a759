"""Each loss term of method §3 as a small function, and the presets as a table of coefficients.

Scalings are exactly the paper's, so its coefficients carry over:
sparsity ``mean_t ||c_t||_p / d_in``; MSE the mean over all elements; KL the forward
KL(p_clean || p_spliced) in nats per token; downstream ``(total / K) sum_k mse_k``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# preset -> (local out_to_in, logits_kl, downstream in_to_orig total)
PRESETS: dict[str, dict[str, float]] = {
    "local": {"local": 1.0, "kl": 0.0, "downstream": 0.0},
    "e2e": {"local": 0.0, "kl": 1.0, "downstream": 0.0},
    "e2e+ds": {"local": 0.0, "kl": 0.5, "downstream": 2.5},
}


def sparsity_loss(c: torch.Tensor, d_in: int, p: float = 1.0) -> torch.Tensor:
    """``mean_t ||c_t||_p / d_in``: the Lp *norm* of each token's code (not ``sum |c|^p``)."""
    return torch.linalg.vector_norm(c, ord=p, dim=-1).mean() / d_in


def mse_loss(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mean over all B*T*d elements of the squared difference."""
    return F.mse_loss(x_hat, x, reduction="mean")


def kl_loss(logits_clean: torch.Tensor, logits_spliced: torch.Tensor) -> torch.Tensor:
    """Forward KL(p_clean || p_spliced) in nats, averaged over tokens."""
    logp_clean = F.log_softmax(logits_clean.float(), dim=-1)
    logp_spliced = F.log_softmax(logits_spliced.float(), dim=-1)
    per_token = (logp_clean.exp() * (logp_clean - logp_spliced)).sum(-1)
    return per_token.mean()


def downstream_loss(spliced: dict[str, torch.Tensor], clean: dict[str, torch.Tensor], total_coeff: float) -> torch.Tensor:
    """``(total_coeff / K) sum_k mse(a_k^spliced, a_k^clean)`` over the K downstream hooks."""
    terms = [mse_loss(spliced[k], clean[k]) for k in spliced]
    return total_coeff / len(terms) * torch.stack(terms).sum()


def next_token_ce(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Per-sequence-position cross-entropy (nats) of predicting ``tokens[:, 1:]``; shape [B, T-1]."""
    lp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    return -lp.gather(-1, tokens[:, 1:, None]).squeeze(-1)
