"""The paper's SAE (method §2): ReLU code, unit-norm dictionary as a reparametrisation."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn

from e2edict.errors import E2EDictError
from e2edict.saes.base import (
    SAE,
    SPARSE_DECODE_FRACTION,
    Writes,
    affine,
    check_tensor,
    decoder_rows,
    sparse_path_allowed,
)
from e2edict.saes.saelens_format import load_skip, writes_from_saelens
from e2edict.saes.sparse import Pairs, SparseEncode


class ReLUSAE(SAE):
    """``c = ReLU(a W_enc + b_enc)``, ``a_hat = c D + b_dec`` with ``D = W_dec / ||W_dec||_row``.

    The raw decoder rows are normalised on every forward, so gradients flow through the
    normalisation (not a projection after the step, as some codebases do)."""

    architecture = "relu"
    saelens_architecture = "standard"
    transcoder_ok = True
    # A foreign file's decoder rows may have any norm. ReLU (and a JumpReLU threshold) commutes
    # with a positive scale, so the norms fold into the encoder: the same reconstruction with a
    # unit-norm dictionary. Where a selection depends on the pre-activations' sizes (TopK) they
    # stay a fixed `decoder_scale` instead, and the encoder is kept as it is.
    folds_decoder_norms: ClassVar[bool] = True

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        hook_name: str = "",
        orthogonal_init: bool = True,
        apply_b_dec_to_input: bool = False,
        writes: Writes | None = None,
    ):
        super().__init__(d_in, d_sae, hook_name, writes)
        if apply_b_dec_to_input and writes is not None:
            raise E2EDictError("a transcoder cannot subtract b_dec from its input (b_dec lives in the output space)")
        self.apply_b_dec_to_input = apply_b_dec_to_input
        self.sparse_decode: bool | None = None  # None: gather-decode when codes are sparse enough
        # Kaiming-uniform encoder and biases, as torch's nn.Linear initialises them.
        W_enc = torch.empty(d_in, d_sae)
        nn.init.kaiming_uniform_(W_enc.T, a=math.sqrt(5))
        # Stored one row per latent (nn.Linear's layout); `W_enc` is the [d_in, d_sae] view. The
        # sparse backwards then read and write whole contiguous rows per active latent (a column
        # scatter into [d_in, d_sae] was ~20x slower), and the parameter stays contiguous, as torch's
        # fused Adam needs (a strided one costs it a copy per step and mismatches restored state).
        self.W_enc_T = nn.Parameter(W_enc.T.contiguous())
        self.b_enc = nn.Parameter(torch.empty(d_sae).uniform_(-1 / math.sqrt(d_in), 1 / math.sqrt(d_in)))
        self._init_decoder(orthogonal_init)

    @property
    def W_enc(self) -> torch.Tensor:
        """The encoder as [d_in, d_sae] (SAELens's layout): a view of ``W_enc_T``."""
        return self.W_enc_T.T

    @classmethod
    def from_config(cls, d_in: int, d_sae: int, hook_name: str, cfg: Any, writes: Writes | None = None) -> ReLUSAE:
        return cls(d_in, d_sae, hook_name, orthogonal_init=cfg.orthogonal_init, writes=writes)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(affine(self.centered(x), self.W_enc, self.b_enc))

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if type(self).encode is not ReLUSAE.encode:  # a subclass with other codes and no forward of its own
            return super()._forward(x)
        if self.sparse_decode is False or not self._sparse_ok(x):
            c = self.encode(x)
            return self.decode(c), c
        xin = self.centered(x).reshape(-1, self.d_in)
        c = self._rectified_product(xin)
        active = c.detach().bool()  # ``c > 0``: as a cast to bool ~2.5x faster on a CPU than the comparison
        if not (self.sparse_decode or int(torch.count_nonzero(active)) < active.numel() * SPARSE_DECODE_FRACTION):
            c = c.view(*x.shape[:-1], self.d_sae)
            return self.decode(c), c
        # Sparse codes: only the active (token, latent) pairs take part from here on (ReLU zeroes the rest).
        return self._decode_active(xin, c.detach(), Pairs.of_mask(active), x.shape[:-1])

    def _rectified_product(self, xin: torch.Tensor) -> torch.Tensor:
        """``ReLU(x W_enc + b_enc)``, [tokens, d_sae], rectified in place: the sparse path reads the
        pre-activations only where they are positive, which ReLU leaves as they are.

        Under autograd (training) the product is formed as [d_sae, tokens] and the codes are its
        transposed view: with a few hundred tokens that GEMM runs ~15% faster on a CPU (66 against
        76 ms at the GPT-2 shape, 256 tokens, 46,080 latents), and `Pairs.of_mask` reads such a
        mask in its own layout. Without a graph (evaluation, a user's analysis) the codes stay a
        contiguous [tokens, d_sae] tensor."""
        if torch.is_grad_enabled():
            return torch.relu_(torch.addmm(self.b_enc.unsqueeze(1), self.W_enc_T, xin.T)).T
        return torch.relu_(torch.addmm(self.b_enc, xin, self.W_enc))

    def _sparse_ok(self, x: torch.Tensor) -> bool:
        """Whether the sparse path may run: chosen automatically (`sparse_path_allowed`), or forced
        (``sparse_decode=True``) with an input in the weights' dtype (the ragged kernels have no casts)."""
        if self.sparse_decode is None:
            return sparse_path_allowed(x)
        return bool(self.sparse_decode) and x.dtype == self.W_dec.dtype

    def _decode_active(
        self, xin: torch.Tensor, codes: torch.Tensor, pairs: Pairs, lead: torch.Size
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruction and dense codes from the rectified [tokens, d_sae] pre-activations ``codes``
        (computed without a graph; zero outside ``pairs``): the decode gathers the pairs' directions,
        and the backward (`SparseEncode`, `GatherDecode`) touches only them."""
        if not torch.is_grad_enabled():
            return self.decode_pairs(codes[pairs.tok, pairs.lat], pairs).view(*lead, self.d_out), codes.view(*lead, self.d_sae)
        vals = SparseEncode.apply(xin, self.W_enc_T, self.b_enc, codes, pairs)
        # ``codes`` already holds the dense codes; writing the pairs' values back (the same numbers)
        # gives them their graph, without a second [tokens, d_sae] tensor.
        c = codes.index_put_((pairs.tok, pairs.lat), vals).view(*lead, self.d_sae)
        return self.decode_pairs(vals, pairs).view(*lead, self.d_out), c

    def sparsity_loss(self, x: torch.Tensor, c: torch.Tensor, p: float) -> torch.Tensor:
        if p == 1:  # codes are >= 0, so the L1 norm is their sum, whose backward allocates nothing
            return c.sum(-1, dtype=torch.promote_types(c.dtype, torch.float32)).mean() / self.d_in
        return super().sparsity_loss(x, c, p)

    def saelens_tensors(self) -> dict[str, torch.Tensor]:
        return {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.normalized_decoder(), "b_dec": self.b_dec}

    def saelens_cfg(self) -> dict[str, Any]:
        return {"apply_b_dec_to_input": self.apply_b_dec_to_input}

    @classmethod
    def _empty_from_saelens(cls, cfg: dict[str, Any], writes: Writes | None = None) -> ReLUSAE:
        return cls(cfg["d_in"], cfg["d_sae"], apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", False)), writes=writes)

    @classmethod
    def from_saelens(cls, tensors: dict[str, torch.Tensor], cfg: dict[str, Any]) -> ReLUSAE:
        d_in, d_sae = cfg["d_in"], cfg["d_sae"]
        writes = writes_from_saelens(tensors, cfg)  # a keyword only for transcoders, as `from_config`'s
        sae = cls._empty_from_saelens(cfg) if writes is None else cls._empty_from_saelens(cfg, writes=writes)
        load_skip(sae, tensors)
        W_enc = check_tensor(tensors, "W_enc", (d_in, d_sae)).float()
        b_enc = check_tensor(tensors, "b_enc", (d_sae,)).float()
        W_dec = check_tensor(tensors, "W_dec", (d_sae, sae.d_out)).float()
        b_dec = check_tensor(tensors, "b_dec", (sae.d_out,)).float()
        unit, norms, zero = decoder_rows(W_dec)
        fold = norms if cls.folds_decoder_norms else torch.ones_like(norms)
        with torch.no_grad():
            sae.W_enc.copy_(W_enc * fold)
            sae.b_enc.copy_(b_enc * fold)
            sae.W_dec.copy_(unit)
            sae.b_dec.copy_(b_dec)
        scale = torch.ones_like(norms) if cls.folds_decoder_norms else norms.clone()
        scale[zero] = 0.0  # latents that write nothing
        if not torch.all(scale == 1):
            sae.decoder_scale = scale
        sae._folded_norms = fold
        return sae
