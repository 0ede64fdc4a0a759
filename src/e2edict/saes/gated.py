"""Gated SAE (Rajamanoharan et al. 2024): a gate path decides which latents are active, a
magnitude path (the same encoder directions, rescaled per latent by ``exp(r_mag)``) how strongly.

``c = 1[x W + b_gate > 0] · ReLU(x (W ⊙ exp(r_mag)) + b_mag)``. The sparsity term penalises the
gate's ReLU pre-activations; in local training an auxiliary loss reconstructs the input from the
gate path alone through a frozen copy of the decoder, so that the gate learns although the step
function has no gradient.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from e2edict.losses import mse_loss, sparsity_loss
from e2edict.saes.base import SAE, affine, check_tensor, decoder_rows


class GatedSAE(SAE):
    architecture = "gated"
    saelens_architecture = "gated"

    def __init__(
        self, d_in: int, d_sae: int, hook_name: str = "", orthogonal_init: bool = True, apply_b_dec_to_input: bool = False
    ):
        super().__init__(d_in, d_sae, hook_name)
        self.apply_b_dec_to_input = apply_b_dec_to_input
        self.W_enc = nn.Parameter(torch.empty(d_in, d_sae))
        nn.init.kaiming_uniform_(self.W_enc.T, a=math.sqrt(5))
        bound = 1 / math.sqrt(d_in)
        self.b_gate = nn.Parameter(torch.empty(d_sae).uniform_(-bound, bound))
        self.b_mag = nn.Parameter(torch.empty(d_sae).uniform_(-bound, bound))
        self.r_mag = nn.Parameter(torch.zeros(d_sae))
        self._init_decoder(orthogonal_init)

    @classmethod
    def from_config(cls, d_in: int, d_sae: int, hook_name: str, cfg: Any, writes=None) -> GatedSAE:
        return cls(d_in, d_sae, hook_name, orthogonal_init=cfg.orthogonal_init)

    def _pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gate and magnitude pre-activations from one GEMM: the magnitude path's encoder is
        ``W ⊙ exp(r_mag)``, a per-latent scale, so ``x (W ⊙ exp(r_mag)) = (x W) ⊙ exp(r_mag)``. The
        training forward keeps the gate's for the sparsity and auxiliary terms of the same input."""
        pre = affine(self.centered(x), self.W_enc)
        gate = pre + self.b_gate.to(pre.dtype)
        mag = torch.addcmul(self.b_mag.to(pre.dtype), pre, self.r_mag.exp().to(pre.dtype))
        self._pre_cache = (x, gate) if torch.is_grad_enabled() else None
        return gate, mag

    def gate_pre(self, x: torch.Tensor) -> torch.Tensor:
        """The gate's pre-activations: those of the last training forward when ``x`` is its input."""
        cached = self._pre_cache
        return cached[1] if cached is not None and cached[0] is x else self._pre(x)[0]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        gate, mag = self._pre(x)
        return (gate > 0) * torch.relu(mag)

    def sparsity_loss(self, x: torch.Tensor, c: torch.Tensor, p: float) -> torch.Tensor:
        return sparsity_loss(torch.relu(self.gate_pre(x)), self.d_in, p)

    def aux_loss(self, x: torch.Tensor, x_hat: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        recon = affine(torch.relu(self.gate_pre(x)), self.normalized_decoder().detach(), self.b_dec.detach())
        return mse_loss(recon, x)

    def saelens_tensors(self) -> dict[str, torch.Tensor]:
        return {
            "W_enc": self.W_enc,
            "b_gate": self.b_gate,
            "b_mag": self.b_mag,
            "r_mag": self.r_mag,
            "W_dec": self.normalized_decoder(),
            "b_dec": self.b_dec,
        }

    def saelens_cfg(self) -> dict[str, Any]:
        return {"apply_b_dec_to_input": self.apply_b_dec_to_input}

    @property
    def dictionary(self) -> torch.Tensor:
        return self.normalized_decoder()

    @classmethod
    def from_saelens(cls, tensors: dict[str, torch.Tensor], cfg: dict[str, Any]) -> GatedSAE:
        d_in, d_sae = cfg["d_in"], cfg["d_sae"]
        sae = cls(d_in, d_sae, apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", False)))
        W_dec = check_tensor(tensors, "W_dec", (d_sae, d_in)).float()
        unit, norms, zero = decoder_rows(W_dec)
        with torch.no_grad():
            # the gate only sees signs, so scaling a latent by its decoder norm changes the magnitude path alone
            sae.W_enc.copy_(check_tensor(tensors, "W_enc", (d_in, d_sae)).float())
            sae.b_gate.copy_(check_tensor(tensors, "b_gate", (d_sae,)).float())
            sae.r_mag.copy_(check_tensor(tensors, "r_mag", (d_sae,)).float() + norms.log())
            sae.b_mag.copy_(check_tensor(tensors, "b_mag", (d_sae,)).float() * norms)
            sae.W_dec.copy_(unit)
            sae.b_dec.copy_(check_tensor(tensors, "b_dec", (d_in,)).float())
        if zero.any():  # latents that write nothing
            sae.decoder_scale = (~zero).float()
        return sae
