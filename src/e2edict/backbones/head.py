"""A model's output head as one GEMM on the final hidden states, for the fused KL
(`e2edict.losses.head_kl_loss`): no [tokens, vocab] logits are kept for training's KL."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from e2edict.precision import no_autocast

VOCAB_ALIGN = 64  # GEMM-friendly vocabulary width (Hopper's fast bf16 kernels want multiples of 8; 64 for tiles)
PAD_LOGIT = -1.0e9  # a padded column's logit: exp() of it is exactly 0 in fp32, and it stays finite


@dataclass(frozen=True)
class Head:
    """A model's output head as ``logits = cap·tanh((h W + b) / cap) + mask`` on the final hidden
    states ``h`` (after the final norm), with the vocabulary padded to a multiple of `VOCAB_ALIGN`.

    ``W`` is [d_model, V_pad] (contiguous, so ``h @ W`` is a plain GEMM), ``bias`` [V_pad] or None,
    ``mask`` [V_pad]: 0 on the ``n_vocab`` real columns, `PAD_LOGIT` on the padding, so padded
    columns carry no probability and no gradient. Built once per dtype by the backbone."""

    W: torch.Tensor
    bias: torch.Tensor | None
    mask: torch.Tensor
    n_vocab: int
    softcap: float = 0.0

    @classmethod
    def padded(cls, W: torch.Tensor, bias: torch.Tensor | None, softcap: float = 0.0) -> Head:
        """From an unpadded [d_model, vocab] unembedding and its bias."""
        d, v = W.shape
        vp = -(-v // VOCAB_ALIGN) * VOCAB_ALIGN
        Wp = W.new_zeros(d, vp)
        Wp[:, :v] = W
        bp = None
        if bias is not None:
            bp = bias.new_zeros(vp)
            bp[:v] = bias
        mask = torch.zeros(vp, dtype=torch.float32, device=W.device)
        mask[v:] = PAD_LOGIT
        return cls(Wp, bp, mask, v, float(softcap or 0.0))

    def to(self, dtype: torch.dtype) -> Head:
        """This head with its weights in ``dtype`` (itself when they already are)."""
        if self.W.dtype == dtype:
            return self
        bias = None if self.bias is None else self.bias.to(dtype)
        return Head(self.W.to(dtype), bias, self.mask, self.n_vocab, self.softcap)

    def to_device(self, device: torch.device) -> Head:
        """This head on ``device``."""
        bias = None if self.bias is None else self.bias.to(device)
        return Head(self.W.to(device), bias, self.mask.to(device), self.n_vocab, self.softcap)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Logits [rows, V_pad] in fp32 of hidden states [rows, d_model], padding masked.

        An fp32 GEMM on fp32 weights, whatever ``h``'s dtype: a KL near 1e-3 is a difference of
        logits of a few hundredths, which bf16 logits (8 significant bits, ±0.06 at a logit of 18)
        drown. With TF32 on a GPU the weights here hold the model's fp32 values, rounded by the
        tensor cores to 10 bits of mantissa, still 8 times finer than bf16."""
        with no_autocast(h.device):
            h = h.to(self.W.dtype)
            raw = torch.addmm(self.bias, h, self.W) if self.bias is not None else h @ self.W
        if self.softcap > 0:
            raw = torch.tanh(raw.div_(self.softcap)).mul_(self.softcap)
        # without padding the mask is all zeros: skip a pass over [rows, vocab]
        return raw.add_(self.mask) if self.W.shape[1] > self.n_vocab else raw

    def softcap_grad(self, logits: torch.Tensor) -> torch.Tensor | None:
        """d logits / d raw from the capped logits (``1 - (y / cap)^2``); None without a cap."""
        if self.softcap <= 0:
            return None
        return 1 - (logits / self.softcap).square()


class FusedHead:
    """A backbone's built `Head`, cached: the part of `e2edict.backbones.base.Backbone` that builds,
    pins (under `Backbone.cast`), moves and forgets it. A backbone gives `unembed` and `_build_head`."""

    head_ok = True  # whether the logits are the fused head of the final hidden states (a backbone that probes sets it)

    def head(self) -> Head | None:
        """The output head for the fused KL (`e2edict.losses.head_kl_loss`), or None where the
        logits are not exactly ``head.logits(final hidden states)`` (`head_ok`); then `run_from`
        gives logits. Built by `_build_head` once per device, always from fp32 weights: under `cast`
        the head keeps the model's original fp32 unembedding, so the KL's logits are fp32 GEMMs."""
        if not self.head_ok:
            return None
        W = self.unembed()
        cache = getattr(self, "_head_cache", None)
        dtype = torch.promote_types(W.dtype, torch.float32)
        pinned = self._head_pinned  # under `cast`: built from the original weights
        if cache is None or cache.W.device != W.device or (not pinned and cache.W.dtype != dtype):
            built = self._build_head()
            self._head_cache = cache = None if built is None else built.to(dtype)
        return cache

    _head_pinned = False  # the head was built before `cast` and is kept until `restore_dtype`

    def _build_head(self) -> Head | None:
        """The padded head of this model (`Head.padded`), or None where it has no fused head."""
        return None

    def drop_head_cache(self) -> None:
        """Forget the built head unless `cast` pinned it (a sharded model's head is built again
        from the gathered weights: no whole copy is kept between steps)."""
        if not self._head_pinned:
            self._head_cache = None

    def move_head(self, device: torch.device) -> None:
        """The built head (a pinned one: `cast`) moved to ``device`` with the model."""
        cache = getattr(self, "_head_cache", None)
        if cache is not None:
            self._head_cache = cache.to_device(device)
