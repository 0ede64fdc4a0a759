"""Each loss term of method §3 as a small function (the presets' coefficients: `e2edict.presets`).

Scalings are exactly the paper's, so its coefficients carry over:
sparsity ``mean_t ||c_t||_p / d_in``; MSE the mean over all elements; KL the forward
KL(p_clean || p_spliced) in nats per token; downstream ``(total / K) sum_k mse_k``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from e2edict.precision import no_autocast


def kl_alpha(mse: torch.Tensor, kl: torch.Tensor) -> torch.Tensor:
    """``α = MSE / KL`` of this step under ``loss.kl_balance``, detached (no gradient flows through
    α), so the KL term weighs as much as the MSE term whatever their scales; KL is clamped away from 0."""
    return mse.detach() / kl.detach().clamp_min(1e-12)


def sparsity_loss(c: torch.Tensor, d_in: int, p: float = 1.0) -> torch.Tensor:
    """``mean_t ||c_t||_p / d_in``: the Lp *norm* of each token's code (not ``sum |c|^p``), at
    least in fp32 (a bf16 code's norms are accumulated and returned in fp32). For p = 1 the sum of
    absolute values, whose backward stays in the code's dtype; other p's backward runs in fp32."""
    if p == 1:
        return c.abs().sum(-1, dtype=_at_least_fp32(c)).mean() / d_in
    return torch.linalg.vector_norm(c, ord=p, dim=-1, dtype=_at_least_fp32(c)).mean() / d_in


def mean_l0(c: torch.Tensor) -> torch.Tensor:
    """Mean active latents per token (logged, no gradient): one count over the whole tensor, ~7x
    cheaper in eager mode than a count per token. Compiled, it shares the sparsity term's kernel,
    one read of the codes for both (`tests/test_losses.py`). The count runs over the codes cast to
    bool (the same entries: ``x != 0``, NaN included): on a CPU the cast and a count of bools took
    about half as long as a count of the floats (4 against 8 ms on [256, 46,080])."""
    return torch.count_nonzero(c.detach().bool()) / max(1, c.numel() // c.shape[-1])


def mse_loss(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mean over all B*T*d elements of the squared difference, at least in fp32 (bf16
    activations are d_model wide, so their fp32 copies are small; a bf16 mean would not be)."""
    dtype = _at_least_fp32(x_hat)
    return F.mse_loss(x_hat.to(dtype), x.to(dtype), reduction="mean")


def target_variance(x: torch.Tensor) -> torch.Tensor:
    """The mean over elements of ``x``'s squared deviation from its mean over tokens (detached):
    `mse_loss` divided by it is the fraction of variance unexplained (sparsify's loss)."""
    with torch.no_grad():
        flat = x.reshape(-1, x.shape[-1]).to(_at_least_fp32(x))
        return (flat - flat.mean(dim=0)).pow(2).mean().clamp(min=torch.finfo(flat.dtype).tiny)


def _at_least_fp32(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


KL_CHUNK_ELEMENTS = 1 << 22  # 16 MB of fp32 logits per chunk


def _chunk_rows(vocab: int) -> int:
    """Rows of [tokens, vocab] per chunk: a fixed memory budget, whatever the vocabulary."""
    return max(1, KL_CHUNK_ELEMENTS // max(1, vocab))


class _ChunkedKL(torch.autograd.Function):
    """Mean forward KL over tokens, computed a chunk of rows of [tokens, vocab] at a time.

    Nothing of size tokens x vocab is kept for backward: the gradient with respect to the spliced
    logits, ``(softmax(spliced) - softmax(clean)) / n_tokens``, is recomputed chunk by chunk from
    the logits themselves, which exist anyway."""

    @staticmethod
    def forward(ctx, clean: torch.Tensor, spliced: torch.Tensor) -> torch.Tensor:
        c2, s2 = clean.reshape(-1, clean.shape[-1]), spliced.reshape(-1, spliced.shape[-1])
        dtype = torch.promote_types(spliced.dtype, torch.float32)  # at least fp32, also under bf16
        total = torch.zeros((), dtype=torch.float64, device=spliced.device)
        n = _chunk_rows(c2.shape[-1])
        for i in range(0, len(c2), n):
            lc = F.log_softmax(c2[i : i + n].to(dtype), -1)
            ls = F.log_softmax(s2[i : i + n].to(dtype), -1)
            total += (lc.exp() * (lc - ls)).sum().double()
        ctx.save_for_backward(clean, spliced)
        return (total / len(c2)).to(dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        clean, spliced = ctx.saved_tensors
        c2, s2 = clean.reshape(-1, clean.shape[-1]), spliced.reshape(-1, spliced.shape[-1])
        out = torch.empty_like(s2)
        scale = grad / len(c2)
        dtype = torch.promote_types(spliced.dtype, torch.float32)
        n = _chunk_rows(c2.shape[-1])
        for i in range(0, len(c2), n):
            pc = F.softmax(c2[i : i + n].to(dtype), -1)
            ps = F.softmax(s2[i : i + n].to(dtype), -1)
            out[i : i + n] = ((ps - pc) * scale).to(out.dtype)
        return None, out.view_as(spliced)


def kl_loss(logits_clean: torch.Tensor, logits_spliced: torch.Tensor) -> torch.Tensor:
    """Forward KL(p_clean || p_spliced) in nats, averaged over tokens (no gradient to the clean side)."""
    return _ChunkedKL.apply(logits_clean.detach(), logits_spliced)


def downstream_loss(spliced: dict[str, torch.Tensor], clean: dict[str, torch.Tensor], total_coeff: float) -> torch.Tensor:
    """``(total_coeff / K) sum_k mse(a_k^spliced, a_k^clean)`` over the K downstream hooks."""
    terms = [mse_loss(spliced[k], clean[k]) for k in spliced]
    return total_coeff / len(terms) * torch.stack(terms).sum()


def next_token_ce(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Per-position cross-entropy (nats) of predicting ``tokens[:, 1:]``; shape [B, T-1].
    Computed a few sequences at a time, so no second [B, T, vocab] tensor is made."""
    rows = max(1, _chunk_rows(logits.shape[-1]) // max(1, logits.shape[1]))
    out = []
    for i in range(0, len(logits), rows):
        lg, tk = logits[i : i + rows, :-1], tokens[i : i + rows, 1:]
        ce = F.cross_entropy(
            lg.reshape(-1, lg.shape[-1]).to(torch.promote_types(lg.dtype, torch.float32)), tk.reshape(-1), reduction="none"
        )
        out.append(ce.view(tk.shape))
    return torch.cat(out)


HEAD_CHUNK_ELEMENTS_CUDA = 1 << 26  # 256 MB of fp32 logits per chunk on a GPU
HEAD_CHUNK_ELEMENTS_CPU = 1 << 24  # 64 MB: a few hundred rows, so the CPU's GEMMs are not starved
# ... and at most this many rows: the chunk's elementwise passes (two log-softmaxes, exp, the KL's
# product, the gradient) then run from the CPU's caches. At the embedded model's vocabulary (4,096)
# the fused head takes 63 ms for 2,048 tokens at 512 rows against 129 ms in one 2,048-row chunk;
# GPT-2's (50,257) stays at the budget's 333 rows (benchmarks in docs/performance.md).
HEAD_CHUNK_ROWS_CPU = 512


def _head_chunk_rows(vocab: int, device: torch.device) -> int:
    """Rows per chunk of the fused head, by a memory budget per [rows, vocab] tensor: larger than
    the logits path's (`KL_CHUNK_ELEMENTS`), because each chunk runs the head's GEMMs, which a
    chunk of a few dozen rows would starve; on a CPU capped at `HEAD_CHUNK_ROWS_CPU`."""
    if device.type == "cuda":
        return max(1, HEAD_CHUNK_ELEMENTS_CUDA // max(1, vocab))
    return max(1, min(HEAD_CHUNK_ROWS_CPU, HEAD_CHUNK_ELEMENTS_CPU // max(1, vocab)))


class _HeadKL(torch.autograd.Function):
    """Mean forward KL over tokens from the final hidden states, the unembedding fused in.

    Each chunk of rows computes the clean and spliced logits (fp32, padding masked), adds its
    share of the KL, and, when a gradient is wanted, its share of the gradient with respect to the
    spliced hidden states, ``(p_s - p_c) W^T / n`` (times the cap's derivative under a soft cap),
    while the logits are at hand. So the step runs three unembedding GEMMs (clean, spliced,
    gradient), keeps nothing of size tokens x vocab, and backward only scales a [tokens, d] tensor."""

    @staticmethod
    def forward(ctx, head, h_clean: torch.Tensor, h_spliced: torch.Tensor) -> torch.Tensor:
        # fp32 throughout (the head's weights are fp32, `Head.logits`); autocast would put the
        # vecdot and the gradient GEMM back in bf16
        with no_autocast(h_spliced.device):
            return _HeadKL._forward(ctx, head, h_clean, h_spliced)

    @staticmethod
    def _forward(ctx, head, h_clean: torch.Tensor, h_spliced: torch.Tensor) -> torch.Tensor:
        hc, hs = h_clean.reshape(-1, h_clean.shape[-1]), h_spliced.reshape(-1, h_spliced.shape[-1])
        n_tok = len(hc)
        want_grad = ctx.needs_input_grad[2]
        grad = torch.empty(hs.shape, dtype=head.W.dtype, device=hs.device) if want_grad else None
        total = torch.zeros((), dtype=torch.float64, device=hs.device)
        n = _head_chunk_rows(head.W.shape[1], hs.device)
        for i in range(0, n_tok, n):
            # three [rows, vocab] tensors at a time (four for a moment), in place where it can be
            lc = torch.log_softmax(head.logits(hc[i : i + n]), -1)  # log p_c
            zs = head.logits(hs[i : i + n])
            cap = head.softcap_grad(zs) if want_grad else None  # (one more only under a soft cap)
            ls = torch.log_softmax(zs, -1)  # log p_s
            del zs
            pc = lc.exp()
            total += torch.linalg.vecdot(pc, lc.sub_(ls)).sum().double()  # sum_v p_c (log p_c - log p_s)
            if want_grad:
                g = ls.exp_().sub_(pc)  # p_s - p_c, in ls's memory
                if cap is not None:
                    g.mul_(cap)
                grad[i : i + n] = g.to(head.W.dtype) @ head.W.T
        if want_grad:
            grad.div_(n_tok)  # on [tokens, d], not on [tokens, vocab]
        ctx.save_for_backward(grad if want_grad else None)
        ctx.shape, ctx.dtype = h_spliced.shape, h_spliced.dtype
        return (total / n_tok).to(torch.promote_types(h_spliced.dtype, torch.float32))

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (grad,) = ctx.saved_tensors
        if grad is None:
            return None, None, None
        return None, None, (grad * g).to(ctx.dtype).view(ctx.shape)


def head_kl_loss(head, h_clean: torch.Tensor, h_spliced: torch.Tensor) -> torch.Tensor:
    """KL(p_clean || p_spliced) in nats per token, from final hidden states and a `Head`: the same
    value as `kl_loss` of the two runs' logits, without materialising them."""
    return _HeadKL.apply(head, h_clean.detach(), h_spliced)
