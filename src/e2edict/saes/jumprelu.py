"""JumpReLU SAE: ``c = z · 1[z > θ]`` with a learned per-latent threshold θ.

The step function has zero gradient almost everywhere, so θ learns through a straight-through
estimator with a rectangle kernel of width ε (``saes.bandwidth``): the pseudo-derivative of
``H(z − θ)`` with respect to θ is ``−K((z − θ)/ε)/ε``, K the unit rectangle on [−½, ½]. The
sparsity term is an L0 penalty, scaled like the Lp term: ``λ · mean_t ||c_t||_0 / d_in``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import Field
from torch import nn

from e2edict.saes.base import SPARSE_DECODE_FRACTION, Options, Writes, affine, check_tensor
from e2edict.saes.relu import ReLUSAE
from e2edict.saes.sparse import Pairs


def _window(z: torch.Tensor, theta: torch.Tensor, eps: float) -> torch.Tensor:
    """``K((z - θ)/ε)`` as a mask: ``θ - ε/2 < z < θ + ε/2``. Compared against fp32 bounds, so
    the window keeps θ's precision when ``z`` is bf16, without a [tokens, d_sae] fp32 difference."""
    return (z > theta - eps / 2) & (z < theta + eps / 2)


def _theta_grad(window: torch.Tensor, grad: torch.Tensor, scale: torch.Tensor, d_sae: int) -> torch.Tensor:
    """``sum_tokens scale · K · grad`` per latent: the reduction in fp32, the scale after it."""
    return (window * grad).reshape(-1, d_sae).sum(0, dtype=torch.promote_types(grad.dtype, torch.float32)) * scale


class _JumpReLU(torch.autograd.Function):
    """``z · 1[z > θ]``: exact gradient to z where active, STE gradient to θ."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, theta: torch.Tensor, eps: float) -> torch.Tensor:
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return z * (z > theta)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        z, theta = ctx.saved_tensors
        grad_z = grad * (z > theta)
        grad_theta = _theta_grad(_window(z, theta, ctx.eps), grad, -(theta / ctx.eps), theta.shape[-1])
        return grad_z, grad_theta.to(theta.dtype), None


class _Step(torch.autograd.Function):
    """``1[z > θ]`` with no gradient to z and the STE gradient to θ (for the L0 penalty)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, theta: torch.Tensor, eps: float) -> torch.Tensor:
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        z, theta = ctx.saved_tensors
        scale = torch.full_like(theta, -1.0 / ctx.eps)
        grad_theta = _theta_grad(_window(z, theta, ctx.eps), grad, scale, theta.shape[-1])
        return None, grad_theta.to(theta.dtype), None  # no gradient to z: none flows back through the GEMM


class JumpReLUOptions(Options):
    bandwidth: float = Field(0.001, gt=0, description="width of the rectangle kernel of the STE")
    init_threshold: float = Field(0.001, gt=0, description="initial threshold")


class JumpReLUSAE(ReLUSAE):
    architecture = "jumprelu"
    saelens_architecture = "jumprelu"
    options_schema = JumpReLUOptions

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        hook_name: str = "",
        orthogonal_init: bool = True,
        apply_b_dec_to_input: bool = False,
        bandwidth: float = 0.001,
        init_threshold: float = 0.001,
        writes: Writes | None = None,
    ):
        super().__init__(d_in, d_sae, hook_name, orthogonal_init, apply_b_dec_to_input, writes)
        self.bandwidth = bandwidth
        self.log_threshold = nn.Parameter(torch.full((d_sae,), math.log(init_threshold)))

    @classmethod
    def from_config(cls, d_in: int, d_sae: int, hook_name: str, cfg: Any, writes: Writes | None = None) -> JumpReLUSAE:
        return cls(
            d_in,
            d_sae,
            hook_name,
            writes=writes,
            orthogonal_init=cfg.orthogonal_init,
            **cfg.options.model_dump(),
        )

    @property
    def threshold(self) -> torch.Tensor:
        return self.log_threshold.exp()

    def _pre(self, x: torch.Tensor) -> torch.Tensor:
        """ReLU pre-activations; the training forward keeps them for the L0 term of the same input
        (`sparsity_loss`), so the encoder GEMM runs once per step."""
        z = torch.relu(affine(self.centered(x), self.W_enc, self.b_enc))
        self._pre_cache = (x, z) if torch.is_grad_enabled() else None
        return z

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return _JumpReLU.apply(self._pre(x), self.threshold, self.bandwidth)

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self._pre(x)
        theta = self.threshold
        c = _JumpReLU.apply(z, theta, self.bandwidth)
        if self.sparse_decode is False or not self._sparse_ok(x):
            return self.decode(c), c
        # The support a sparse decode must cover: the active latents and those inside the
        # straight-through window around θ, whose (zero) codes still pass gradient to θ.
        support = ((z - theta).detach() > -self.bandwidth / 2).reshape(-1, self.d_sae)
        if not (self.sparse_decode or int(torch.count_nonzero(support)) < support.numel() * SPARSE_DECODE_FRACTION):
            return self.decode(c), c
        pairs = Pairs.of_mask(support)
        vals = c.reshape(-1, self.d_sae)[pairs.tok, pairs.lat]
        return self.decode_pairs(vals, pairs).view(*x.shape[:-1], self.d_out), c

    def sparsity_loss(self, x: torch.Tensor, c: torch.Tensor, p: float) -> torch.Tensor:
        cached = self._pre_cache
        z = cached[1] if cached is not None and cached[0] is x else self._pre(x)
        l0 = _Step.apply(z, self.threshold, self.bandwidth).sum(-1, dtype=torch.promote_types(z.dtype, torch.float32))
        return l0.mean() / self.d_in

    def saelens_tensors(self) -> dict[str, torch.Tensor]:
        return {**super().saelens_tensors(), "threshold": self.threshold}

    @classmethod
    def from_saelens(cls, tensors: dict[str, torch.Tensor], cfg: dict[str, Any]) -> JumpReLUSAE:
        sae = super().from_saelens(tensors, cfg)
        thr = check_tensor(tensors, "threshold", (cfg["d_sae"],)).float()
        norms = sae._folded_norms
        with torch.no_grad():
            # folding the decoder norms into the encoder scales the pre-activations, and the threshold with them
            sae.log_threshold.copy_((thr * norms).clamp_min(1e-12).log())
        return sae
