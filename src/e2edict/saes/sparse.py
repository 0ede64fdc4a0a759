"""Sparse SAE kernels: decode and encoder backwards that touch only the active (token, latent) pairs.

Codes are held as `Pairs` (the ragged layout of a sparse [tokens, d_sae] matrix: for each pair its
token and latent, in token order) with one value per pair. A TopK SAE has k pairs per token; a
ReLU SAE at low L0 has exactly its active latents, so the work follows the mean L0, not the
largest. The dense encoder product that finds the active latents stays dense; everything after it
(the gather decode, the decoder's gradient, the encoder's gradient) reads and writes whole rows
per pair: the decoder ``W_dec [d_sae, d_in]`` and the encoder ``W_enc_T [d_sae, d_in]`` both keep
one latent per row, so a pair's update is one contiguous row.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch.nn import functional as F

GATHER_CHUNK_ELEMENTS = 1 << 22  # elements of a [pairs, d] temporary in the sparse backwards
# Rows are gathered with ``index_select``: on a CPU about twice as fast as ``t[ids]`` at these sizes.


def _chunks(n: int, d: int) -> list[slice]:
    """Slices of n rows such that a [rows, d] temporary holds at most the budget."""
    step = max(1, GATHER_CHUNK_ELEMENTS // max(1, d))
    return [slice(i, min(n, i + step)) for i in range(0, n, step)]


@dataclass(frozen=True)
class Pairs:
    """The (token, latent) pairs of a sparse code over ``n_tokens`` tokens, in token order."""

    tok: torch.Tensor  # [P] token of each pair
    lat: torch.Tensor  # [P] latent of each pair
    n_tokens: int

    @cached_property
    def offsets(self) -> torch.Tensor:
        """Where each token's pairs start (``embedding_bag``'s bags; a token may have none); computed
        once, read by the decode's forward and the encoder's backward."""
        counts = torch.bincount(self.tok, minlength=self.n_tokens)
        return torch.cumsum(counts, 0) - counts

    @classmethod
    def of_mask(cls, active: torch.Tensor) -> Pairs:
        """The True entries of a [tokens, d_sae] mask. A mask held latent-major (the transposed view
        of a contiguous [d_sae, tokens] tensor) is read in that layout and its pairs put in token
        order by a stable sort: ``nonzero`` over the strided view took ~9x as long."""
        if not active.is_contiguous() and active.T.is_contiguous():
            lat, tok = active.T.nonzero(as_tuple=True)
            tok, order = torch.sort(tok, stable=True)
            return cls(tok, lat[order], active.shape[0])
        tok, lat = active.nonzero(as_tuple=True)
        return cls(tok, lat, active.shape[0])

    @classmethod
    def of_rows(cls, idx: torch.Tensor, keep: torch.Tensor | None = None) -> tuple[Pairs, torch.Tensor]:
        """The entries of [tokens, k] latent ids (those where ``keep``, if given) and their
        positions in the flattened [tokens * k]."""
        n, k = idx.shape
        if keep is None:  # every entry: the ids as they are, no gather
            pos = torch.arange(n * k, device=idx.device)
            return cls(torch.div(pos, k, rounding_mode="floor"), idx.reshape(-1), n), pos
        pos = keep.reshape(-1).nonzero().squeeze(1)
        return cls(torch.div(pos, k, rounding_mode="floor"), idx.reshape(-1)[pos], n), pos


class GatherDecode(torch.autograd.Function):
    """``out_t = sum_(t, i) v_ti W[i] / ||W[i]||`` over the pairs of each token: [tokens, d_in].

    The normalisation is folded into the per-pair weights, so the normalised dictionary is never
    built, and with fewer pairs than dictionary rows only the rows used are read for their norms
    (`_pair_norms`). The backward makes one pass over the pairs, in chunks: each pair's row of the
    dictionary's gradient is ``(v / n) g_t - (v (g_t . W_i) / n^3) W_i`` (the direct term and the
    term through the row's norm), added into one dense buffer; nothing else of the dictionary's
    size is allocated or read."""

    @staticmethod
    def forward(ctx, vals: torch.Tensor, pairs: Pairs, W: torch.Tensor) -> torch.Tensor:
        n_sel = _pair_norms(W, pairs.lat)
        ctx.save_for_backward(vals, W, n_sel)
        ctx.pairs = pairs
        weights = vals.to(W.dtype) / n_sel
        return F.embedding_bag(pairs.lat, W, pairs.offsets, mode="sum", per_sample_weights=weights)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        vals, W, n_sel = ctx.saved_tensors
        tok, lat = ctx.pairs.tok, ctx.pairs.lat
        v = vals.to(W.dtype)
        g = g.to(W.dtype)
        need_W = ctx.needs_input_grad[2]
        grad_W = torch.zeros_like(W) if need_W else None
        dots = torch.empty_like(v)  # g_t . W[i] per pair
        for c in _chunks(len(lat), W.shape[1]):  # [pairs, d] temporaries stay within a fixed budget
            g_rows, W_rows = g.index_select(0, tok[c]), W.index_select(0, lat[c])
            dots[c] = (W_rows * g_rows).sum(-1)
            if need_W:
                direct = (v[c] / n_sel[c]).unsqueeze(1)
                via_norm = (-(v[c] * dots[c]) / n_sel[c].pow(3)).unsqueeze(1)
                grad_W.index_add_(0, lat[c], g_rows.mul_(direct).add_(W_rows.mul_(via_norm)))
        grad_vals = (dots / n_sel).to(vals.dtype) if ctx.needs_input_grad[0] else None
        return grad_vals, None, grad_W


def _pair_norms(W: torch.Tensor, lat: torch.Tensor) -> torch.Tensor:
    """``||W[lat_p]||`` for each pair: from the rows used where there are fewer pairs than rows
    (in chunks), else from every row's norm, whichever reads less."""
    if len(lat) >= W.shape[0]:
        return W.norm(dim=1)[lat]
    out = torch.empty(len(lat), dtype=W.dtype, device=W.device)
    for c in _chunks(len(lat), W.shape[1]):
        out[c] = torch.linalg.vector_norm(W.index_select(0, lat[c]), dim=1)
    return out


def _encoder_grads(ctx, x: torch.Tensor, W_T: torch.Tensor, pairs: Pairs, gv: torch.Tensor):
    """Gradients of ``pre[t, i] = x_t . W_T[i] + b_i`` at the pairs, given each pair's gradient."""
    gv = gv.to(W_T.dtype)
    grad_x = grad_W = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = F.embedding_bag(pairs.lat, W_T, pairs.offsets, mode="sum", per_sample_weights=gv).to(x.dtype)
    if ctx.needs_input_grad[1]:
        grad_W = torch.zeros_like(W_T)
        for c in _chunks(len(pairs.lat), W_T.shape[1]):  # [pairs, d_in] temporaries stay within a fixed budget
            grad_W.index_add_(0, pairs.lat[c], x.index_select(0, pairs.tok[c]).to(W_T.dtype).mul_(gv[c].unsqueeze(1)))
    if ctx.needs_input_grad[2]:
        grad_b = torch.zeros(W_T.shape[0], dtype=W_T.dtype, device=W_T.device).index_add_(0, pairs.lat, gv)
    return grad_x, grad_W, grad_b


class SparseEncode(torch.autograd.Function):
    """The pre-activations ``x_t . W_T[i] + b_i`` at the active pairs, taken from the caller's dense
    product ``pre`` (computed without a graph), whose backward touches only those pairs.

    Autograd's backward of the dense pre-activation costs two full [tokens, d_sae, d_in] products
    although only the active entries carry gradient; here the weight gradient is one row
    ``index_add`` per pair and the input gradient a gather (``embedding_bag``) of the same rows.
    Nothing of size tokens x d_sae is kept for backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, W_T: torch.Tensor, b: torch.Tensor, pre: torch.Tensor, pairs: Pairs):
        ctx.save_for_backward(x, W_T)
        ctx.pairs = pairs
        return pre[pairs.tok, pairs.lat]

    @staticmethod
    def backward(ctx, grad_vals: torch.Tensor):
        x, W_T = ctx.saved_tensors
        return (*_encoder_grads(ctx, x, W_T, ctx.pairs, grad_vals), None, None)


class TopKEncode(torch.autograd.Function):
    """A TopK encoder's k largest pre-activations per token and their latents: ``x W_T^T + b``
    (one dense product, without a graph), then ``topk``; [tokens, k] values and ids.

    Every token has exactly k pairs, so there is no ragged layout to build (`Pairs`): the ids are
    the bags of ``embedding_bag`` as they are. The backward touches only those pairs: the input's
    gradient is a gather of k encoder rows per token, weighted by the values' gradients
    (``embedding_bag``), and the encoder's is that gather's own weight gradient with the input as
    its output gradient (one row update per pair); autograd's dense backward would instead scatter
    into [tokens, d_sae] and run two [tokens, d_sae, d_in] products."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, W_T: torch.Tensor, b: torch.Tensor, k: int):
        pre = torch.addmm(b, x, W_T.T)
        top, idx = pre.topk(k, dim=-1, sorted=False)
        ctx.save_for_backward(x, W_T, idx)
        ctx.mark_non_differentiable(idx)
        return top, idx

    @staticmethod
    def backward(ctx, grad_top: torch.Tensor, _grad_idx):
        x, W_T, idx = ctx.saved_tensors
        gv = grad_top.contiguous().to(W_T.dtype)
        with torch.enable_grad():
            W = W_T.detach().requires_grad_(True)
            grad_x = F.embedding_bag(idx, W, mode="sum", per_sample_weights=gv)
            (grad_W,) = torch.autograd.grad(grad_x, W, grad_outputs=x.to(W.dtype)) if ctx.needs_input_grad[1] else (None,)
        grad_b = None
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(W_T.shape[0], dtype=W_T.dtype, device=W_T.device).index_add_(0, idx.reshape(-1), gv.reshape(-1))
        grad_x = grad_x.detach().to(x.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, grad_W, grad_b, None
