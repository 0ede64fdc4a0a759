"""TopK and BatchTopK SAEs: the paper's encoder and unit-norm dictionary, with L0 fixed by k.

TopK keeps each token's k largest pre-activations (then ReLU). BatchTopK keeps the k·N largest
ReLU pre-activations over the N tokens of a training batch, and learns a single threshold (a
running average of the smallest value kept) that replaces the batch-level selection at inference,
which makes it a JumpReLU SAE on disk. With k much smaller than the dictionary, decoding gathers
the k active directions (``embedding_bag``) instead of a dense matrix product.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from e2edict.errors import E2EDictError
from e2edict.saes.base import TOPK_GATHER_FRACTION, Options, Writes, affine, check_tensor, sparse_path_allowed
from e2edict.saes.relu import ReLUSAE
from e2edict.saes.sparse import Pairs, TopKEncode


class TopKOptions(Options):
    k: int | None = Field(None, ge=1, description="active latents per token (required; with saes.init_from: the source's)")
    auxk_coeff: float = Field(0.0, ge=0, description="local training: AuxK dead-latent loss (paper: 1/32); SAEs only")
    auxk_k: int | None = Field(None, ge=1, description="AuxK: dead latents used per token (null: d_in / 2)")
    dead_tokens: int = Field(1_000_000, ge=1, description="AuxK: tokens without firing after which a latent is dead")


class BatchTopKOptions(TopKOptions):
    threshold_momentum: float = Field(0.99, ge=0, lt=1, description="EMA momentum of the inference threshold")


class TopKSAE(ReLUSAE):
    architecture = "topk"
    saelens_architecture = "topk"
    folds_decoder_norms = False  # rescaled pre-activations would pick other latents: a fixed decoder_scale instead
    has_sparsity_term = False  # k fixes L0 (BatchTopK and Matryoshka alike)
    options_schema = TopKOptions

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        hook_name: str = "",
        k: int = 32,
        orthogonal_init: bool = True,
        apply_b_dec_to_input: bool = False,
        sparse_decode: bool | None = None,
        auxk_coeff: float = 0.0,
        auxk_k: int | None = None,
        dead_tokens: int = 1_000_000,
        writes: Writes | None = None,
    ):
        super().__init__(d_in, d_sae, hook_name, orthogonal_init, apply_b_dec_to_input, writes)
        if not 1 <= k <= d_sae:
            raise E2EDictError(f"k must lie in [1, d_sae={d_sae}], got {k}")
        self.k = k
        self.sparse_decode = sparse_decode  # None: the gather path where the input allows it (`_fixed_k_ok`)
        # AuxK (Gao et al. 2024): dead latents learn to explain the residual error
        self.auxk_coeff, self.auxk_k, self.dead_tokens = auxk_coeff, auxk_k or max(1, d_in // 2), dead_tokens
        self.register_buffer("tokens_since_fired", torch.zeros(d_sae, dtype=torch.long))

    @classmethod
    def from_config(cls, d_in: int, d_sae: int, hook_name: str, cfg: Any, writes: Writes | None = None) -> TopKSAE:
        return cls(
            d_in,
            d_sae,
            hook_name,
            writes=writes,
            orthogonal_init=cfg.orthogonal_init,
            **cfg.options.model_dump(),
        )

    @classmethod
    def validate_config(cls, cfg: Any) -> None:
        super().validate_config(cfg)
        if cfg.options.k is None:
            raise ValueError(f"saes.k is required for saes.architecture={cls.architecture!r}")
        if cfg.kind != "sae" and cfg.options.auxk_coeff > 0:
            raise ValueError(f"saes.auxk_coeff: AuxK is for SAEs (it reconstructs the input's error), not saes.kind={cfg.kind!r}")

    @classmethod
    def check_sizes(cls, cfg: Any, d_sae: dict[str, int]) -> None:
        k = cfg.options.k
        too_big = [h for h, n in d_sae.items() if k > n]
        if too_big:
            raise E2EDictError(f"saes.k={k} exceeds the dictionary size at {too_big[0]!r}")

    def check_config(self, cfg: Any, where: str) -> None:
        super().check_config(cfg, where)
        k = cfg.options.k
        if k is not None and self.k != k:
            raise E2EDictError(f"{where} has k={self.k} but saes.k is {k}")

    def _track_dead(self, c: torch.Tensor) -> None:
        if self.training and self.auxk_coeff > 0:  # only AuxK reads the counts
            with torch.no_grad():
                fired = (c.reshape(-1, self.d_sae) != 0).any(0)
                self.tokens_since_fired.add_(c.numel() // self.d_sae)
                self.tokens_since_fired.masked_fill_(fired, 0)  # no boolean indexing: that reads back a count

    def aux_loss(self, x: torch.Tensor, x_hat: torch.Tensor, c: torch.Tensor) -> torch.Tensor | None:
        """AuxK: the top ``auxk_k`` pre-activations among dead latents reconstruct ``x - x_hat``;
        ``auxk_coeff`` times its MSE, normalised by the error's own MSE (Gao et al. 2024)."""
        if self.auxk_coeff <= 0:
            return None
        # Static shapes, nothing read back: the top auxk_k of every latent with the live ones at
        # -inf (ReLU makes those 0, so fewer dead latents than auxk_k just add zeros), and the
        # term multiplied by whether any latent is dead.
        dead = self.tokens_since_fired >= self.dead_tokens
        pre = self.pre_activations(x).masked_fill(~dead, float("-inf"))
        vals, idx = pre.topk(min(self.auxk_k, self.d_sae), dim=-1)
        vals = torch.relu(vals)
        err = (x - x_hat).detach().reshape(-1, self.d_in).float()
        if sparse_path_allowed(x):
            err_hat = self.gather_decode(vals, idx, zero_is_inactive=True)
        else:  # on a GPU a dense decode of the scattered values (the gather's pair lists are data-sized)
            err_hat = affine(torch.zeros_like(pre).scatter(-1, idx, vals), self.normalized_decoder())
        mse = (err_hat.reshape(-1, self.d_in).float() - err).pow(2).mean() / err.pow(2).mean().clamp_min(1e-12)
        return self.auxk_coeff * mse * dead.any()

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        return affine(self.centered(x), self.W_enc, self.b_enc)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre_activations(x)
        vals, idx = pre.topk(self.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, idx, torch.relu(vals))

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._fixed_k_ok(x):
            x_hat, c = self._forward_fixed_k(x)
        else:
            c = self.encode(x)
            x_hat = self.decode(c)
        self._track_dead(c)
        return x_hat, c

    def _fixed_k_ok(self, x: torch.Tensor) -> bool:
        """The gather path (`_forward_fixed_k`): chosen automatically where the sparse paths may run
        (`sparse_path_allowed`: a CPU, fp32 or fp64) and k / d_sae is below `TOPK_GATHER_FRACTION`;
        ``sparse_decode`` True forces it (in the weights' dtype), False keeps the dense products."""
        if self.sparse_decode is None:
            small = self.k < self.d_sae * TOPK_GATHER_FRACTION
            return small and sparse_path_allowed(x) and x.dtype == self.W_dec.dtype
        return bool(self.sparse_decode) and x.dtype == self.W_dec.dtype

    def _forward_fixed_k(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Exactly k pairs per token: the encoder's k values and ids (`TopKEncode`), the decode a
        gather of those k dictionary rows (`decode_pairs`, whose backward touches only those rows,
        their norms' included); the dense code is their scatter."""
        lead = x.shape[:-1]
        xin = self.centered(x).reshape(-1, self.d_in)
        top, idx = TopKEncode.apply(xin, self.W_enc_T, self.b_enc, self.k)
        vals = torch.relu(top)
        pairs, _ = Pairs.of_rows(idx)
        x_hat = self.decode_pairs(vals.reshape(-1), pairs)
        c = torch.zeros(xin.shape[0], self.d_sae, dtype=vals.dtype, device=vals.device).scatter_(1, idx, vals)
        return x_hat.view(*lead, self.d_out), c.view(*lead, self.d_sae)

    def saelens_cfg(self) -> dict[str, Any]:
        return {**super().saelens_cfg(), "k": self.k, "rescale_acts_by_decoder_norm": False}

    @classmethod
    def _empty_from_saelens(cls, cfg: dict[str, Any], writes: Writes | None = None) -> TopKSAE:
        k = cfg.get("k")
        if not isinstance(k, int) or isinstance(k, bool):
            raise E2EDictError(f"a topk SAE's cfg.json needs an integer k, got {k!r}")
        if cfg.get("rescale_acts_by_decoder_norm"):
            raise E2EDictError("topk SAEs with rescale_acts_by_decoder_norm are not supported")
        b_dec_in = bool(cfg.get("apply_b_dec_to_input", False))
        return cls(cfg["d_in"], cfg["d_sae"], k=k, apply_b_dec_to_input=b_dec_in, writes=writes)


class BatchTopKSAE(TopKSAE):
    architecture = "batchtopk"
    saelens_architecture = "jumprelu"
    options_schema = BatchTopKOptions

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        hook_name: str = "",
        k: int = 32,
        orthogonal_init: bool = True,
        apply_b_dec_to_input: bool = False,
        momentum: float = 0.99,
        auxk_coeff: float = 0.0,
        auxk_k: int | None = None,
        dead_tokens: int = 1_000_000,
        writes: Writes | None = None,
    ):
        super().__init__(
            d_in,
            d_sae,
            hook_name,
            k,
            orthogonal_init,
            apply_b_dec_to_input,
            sparse_decode=False,
            auxk_coeff=auxk_coeff,
            auxk_k=auxk_k,
            dead_tokens=dead_tokens,
            writes=writes,
        )
        self.momentum = momentum
        self.register_buffer("threshold", torch.zeros(()))
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.long))

    @classmethod
    def from_config(cls, d_in: int, d_sae: int, hook_name: str, cfg: Any, writes: Writes | None = None) -> BatchTopKSAE:
        return cls(
            d_in,
            d_sae,
            hook_name,
            writes=writes,
            orthogonal_init=cfg.orthogonal_init,
            **cfg.options.model_dump(include=set(TopKOptions.model_fields)),
            momentum=cfg.options.threshold_momentum,
        )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.relu(self.pre_activations(x))
        if not self.training:
            return z * (z > self.threshold)
        flat = z.reshape(-1, self.d_sae)
        n_keep = min(self.k * flat.shape[0], flat.numel())
        vals, idx = flat.flatten().topk(n_keep, sorted=False)
        c = torch.zeros_like(flat).flatten().scatter_(0, idx, vals).view_as(z)
        with torch.no_grad():  # on the device, without reading anything back
            smallest = torch.where(vals > 0, vals, torch.full_like(vals, float("inf"))).min().float()
            seen = torch.isfinite(smallest)  # some kept value was positive
            ema = torch.where(
                self.threshold_updates == 0, smallest, self.threshold * self.momentum + (1 - self.momentum) * smallest
            )
            self.threshold.copy_(torch.where(seen, ema, self.threshold))
            self.threshold_updates.add_(seen.long())
        return c

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.encode(x)
        self._track_dead(c)
        return self.decode(c), c

    def saelens_tensors(self) -> dict[str, torch.Tensor]:
        return {**super().saelens_tensors(), "threshold": self.threshold.expand(self.d_sae)}

    def saelens_cfg(self) -> dict[str, Any]:
        return {"apply_b_dec_to_input": self.apply_b_dec_to_input}

    def saelens_metadata(self) -> dict[str, Any]:
        return {"e2edict_k": self.k, "e2edict_threshold_momentum": self.momentum}

    @classmethod
    def _empty_from_saelens(cls, cfg: dict[str, Any], writes: Writes | None = None) -> BatchTopKSAE:
        meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
        k = meta.get("e2edict_k")
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= cfg["d_sae"]:
            raise E2EDictError(f"a batchtopk SAE's metadata needs an integer e2edict_k in [1, d_sae], got {k!r}")
        b_dec_in = bool(cfg.get("apply_b_dec_to_input", False))
        return cls(cfg["d_in"], cfg["d_sae"], k=k, apply_b_dec_to_input=b_dec_in, writes=writes)

    @classmethod
    def from_saelens(cls, tensors: dict[str, torch.Tensor], cfg: dict[str, Any]) -> BatchTopKSAE:
        sae = super().from_saelens(tensors, cfg)
        thr = check_tensor(tensors, "threshold", (cfg["d_sae"],)).float()
        if not torch.all(thr == thr[0]):
            raise E2EDictError("a batchtopk SAE's threshold must be one value for every latent")
        with torch.no_grad():
            sae.threshold.copy_(thr[0])
            sae.threshold_updates.fill_(1)
        return sae
