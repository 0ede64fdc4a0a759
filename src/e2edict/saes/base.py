"""The interface every SAE architecture implements (`SAE`), the registry of architectures by
name, and the numeric helpers they share (`affine`, `decoder_rows`, `check_tensor`). The on-disk
format is `e2edict.saes.saelens_format`'s; each architecture maps its tensors to it.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from e2edict.errors import E2EDictError
from e2edict.precision import is_full
from e2edict.saes.sparse import GatherDecode, Pairs

registry: dict[str, type[SAE]] = {}

# Take the sparse path (active pairs only) when fewer than this fraction of the latents is active:
# a ReLU SAE's active fraction, a JumpReLU SAE's (with θ's window; TopK: `TOPK_GATHER_FRACTION`). A
# whole SAE step on the 2-core CPU breaks even near 2% (benchmarks/sparse_decode.py).
SPARSE_DECODE_FRACTION = 1 / 64
# A TopK SAE takes its k-gather path (`TopKSAE._forward_fixed_k`) below this k / d_sae: its
# crossover with the dense path lay between 1/32 and 1/8 at the embedded model's SAE (128 x 1,024,
# 2,048 tokens) and near 1/12 at GPT-2's (768 x 24,576, 512 tokens) (benchmarks/sparse_decode.py).
TOPK_GATHER_FRACTION = 1 / 16


def affine(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """``x W + b`` over the last dimension, computed in ``x``'s dtype.

    The SAE's weights are fp32 masters; under a bf16 model its activations are bf16, so the
    weights are cast to bf16 here (the gradient flows back to the fp32 master through the cast)
    and the bias joins the GEMM (`torch.addmm`): adding an fp32 bias to a bf16 product would
    promote every [tokens, d_sae] code and [tokens, d] reconstruction to fp32. Explicit casts,
    not autocast, so the step computes the same dtypes on every device. In fp32 and fp64 it is
    ``x @ W + b`` as written, so those results are bit for bit what they always were."""
    if is_full(x.dtype) and W.dtype == x.dtype:
        out = x @ W
        return out if b is None else out + b
    x2 = x.reshape(-1, x.shape[-1])
    W = W.to(x.dtype)
    out = x2 @ W if b is None else torch.addmm(b.to(x.dtype), x2, W)
    return out.view(*x.shape[:-1], W.shape[-1])


def sparse_path_allowed(x: torch.Tensor) -> bool:
    """Whether the automatic choice may take the sparse path for input ``x``: on a CPU only, in fp32 or fp64.

    The ragged kernels size their work from the data (how many pairs are active), which on a GPU
    is a read back to the host every step and a new shape for every compiled graph; there the
    dense GEMMs run on tensor cores at these sizes anyway. ``sparse_decode=True`` still forces it."""
    return x.device.type == "cpu" and is_full(x.dtype)


@dataclass(frozen=True)
class Writes:
    """What a transcoder writes instead of reconstructing its input, given when it is built: a
    ``d_out``-wide prediction of the activation at ``hook_name_out``; with ``skip``, plus a linear
    path ``x W_skip^T`` (``W_skip [d_out, d_in]``, zero at the start)."""

    d_out: int
    hook_name_out: str
    skip: bool = False

    @property
    def kind(self) -> str:
        return "skip_transcoder" if self.skip else "transcoder"


class Options(BaseModel):
    """An architecture's own ``saes`` keys: none here. Each architecture that has keys subclasses
    this in its own file (a field per key, with its default, bounds and description) and names it
    as its `SAE.options_schema`. A config writes them flat beside the shared keys (``saes.k: 32``)
    or under ``saes.options``; `e2edict.config_sections.SAEsConfig` validates them by the
    configured architecture's schema while the config is read, into ``cfg.saes.options``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def option_owners(key: str) -> list[str]:
    """The registered architectures that have ``key`` among their options."""
    return sorted(a for a, c in registry.items() if key in c.options_schema.model_fields)


class SAE(nn.Module, ABC):
    """An SAE at one hook point: ``forward(a) -> (a_hat, c)``."""

    architecture: ClassVar[str]  # e2edict's name, used in configs
    saelens_architecture: ClassVar[str]  # the name written to cfg.json
    transcoder_ok: ClassVar[bool] = False  # whether it can be a transcoder (saes.kind)
    options_schema: ClassVar[type[BaseModel]] = Options  # its own keys, read into ``cfg.saes.options``

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if "architecture" in cls.__dict__:
            registry[cls.architecture] = cls

    def __init__(self, d_in: int, d_sae: int, hook_name: str = "", writes: Writes | None = None):
        super().__init__()
        if d_in <= 0 or d_sae <= 0:
            raise E2EDictError(f"SAE sizes must be positive, got d_in={d_in}, d_sae={d_sae}")
        self.d_in, self.d_sae, self.hook_name = d_in, d_sae, hook_name
        # A transcoder (``writes``) writes another activation than it reads: d_out wide, at hook_name_out.
        self.d_out, self.hook_name_out, self.kind = d_in, None, "sae"
        self.register_parameter("W_skip", None)
        if writes is not None:
            if isinstance(writes.d_out, bool) or not isinstance(writes.d_out, int) or writes.d_out <= 0:
                raise E2EDictError(f"a transcoder's d_out must be a positive integer, got {writes.d_out!r}")
            self.d_out, self.hook_name_out, self.kind = writes.d_out, writes.hook_name_out, writes.kind
            if writes.skip:
                self.W_skip = nn.Parameter(torch.zeros(writes.d_out, d_in))
        # A fixed length per dictionary row (None: unit rows, the paper's dictionary). Set where a
        # loaded file's rows have other norms that cannot be folded into the encoder (TopK: the
        # selection would change), so the SAE computes exactly the latents its source does.
        self.register_buffer("decoder_scale", None)

    @abstractmethod
    def encode(self, x: torch.Tensor) -> torch.Tensor: ...

    def _init_decoder(self, orthogonal_init: bool) -> None:
        """The paper's dictionary: raw ``W_dec [d_sae, d_out]`` (orthogonal init: its d_out columns are
        orthonormal) and ``b_dec``; the rows are normalised on every forward."""
        self.W_dec = nn.Parameter(torch.empty(self.d_sae, self.d_out))
        if orthogonal_init:
            nn.init.orthogonal_(self.W_dec)
        else:
            nn.init.kaiming_uniform_(self.W_dec.T, a=math.sqrt(5))
        bound = 1 / math.sqrt(self.d_sae)
        self.b_dec = nn.Parameter(torch.empty(self.d_out).uniform_(-bound, bound))

    def decoder_row_norms(self) -> torch.Tensor:
        """What each raw row is divided by to give the dictionary: its norm (over `decoder_scale`)."""
        norms = self.W_dec.norm(dim=1)
        return norms if self.decoder_scale is None else norms / self.decoder_scale

    # --- decoder_norm: project (`e2edict.config.SAEsConfig.decoder_norm`) ---
    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Remove from each raw decoder row's gradient its component along the row:
        ``g_i <- g_i - (g_i . w_i) w_i / ||w_i||^2``, so a step moves the row along the sphere
        (to first order) and not its length."""
        g = self.W_dec.grad
        if g is None:
            return
        W = self.W_dec.detach()
        coef = (g * W).sum(1, keepdim=True) / W.square().sum(1, keepdim=True)
        g.sub_(coef * W)

    @torch.no_grad()
    def renormalize_decoder(self) -> None:
        """Scale each raw decoder row back to unit norm (after an optimizer step)."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True))

    def gather_decode(self, vals: torch.Tensor, idx: torch.Tensor, zero_is_inactive: bool = False) -> torch.Tensor:
        """``sum_i vals_i D[idx_i]`` for [..., k] values and latent ids, reading only those rows
        (`e2edict.saes.sparse.GatherDecode`). ``zero_is_inactive``: the values are ReLU outputs,
        whose gradient is zero where they are zero, so those entries are left out altogether."""
        shape, k = vals.shape[:-1], idx.shape[-1]
        flat_vals = vals.reshape(-1, k)
        pairs, pos = Pairs.of_rows(idx.reshape(-1, k), flat_vals.detach() != 0 if zero_is_inactive else None)
        return self.decode_pairs(flat_vals.reshape(-1)[pos], pairs, with_bias=False).view(*shape, self.d_out)

    def decode_pairs(self, vals: torch.Tensor, pairs: Pairs, with_bias: bool = True) -> torch.Tensor:
        """[tokens, d_out] reconstructions from a sparse code held as (token, latent) pairs."""
        if self.decoder_scale is not None:
            vals = vals * self.decoder_scale[pairs.lat].to(vals.dtype)
        out = GatherDecode.apply(vals, pairs, self.W_dec)
        return out + self.b_dec if with_bias else out

    def normalized_decoder(self) -> torch.Tensor:
        """The dictionary ``D``: unit rows (times `decoder_scale` where one is set)."""
        D = self.W_dec / self.W_dec.norm(dim=1, keepdim=True)
        return D if self.decoder_scale is None else D * self.decoder_scale[:, None]

    def decode(self, c: torch.Tensor) -> torch.Tensor:
        """``c D + b_dec``. With fewer tokens than ``d_out`` the codes are scaled by the inverse
        row norms instead of building ``D`` (``(c / n) W = c (W / n)``): the cheaper of the two."""
        if c.numel() // self.d_sae < self.d_out:
            return affine(c / self.decoder_row_norms().to(c.dtype), self.W_dec, self.b_dec)
        return affine(c, self.normalized_decoder(), self.b_dec)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(output, codes)``: the reconstruction (a transcoder's prediction of its output
        activation, plus ``x W_skip^T`` for a skip transcoder) and the sparse code."""
        out, c = self._forward(x)
        if self.W_skip is not None:
            out = out + affine(x, self.W_skip.T)
        return out, c

    def centered(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's input: ``x - b_dec`` where the SAE subtracts ``b_dec`` first (``apply_b_dec_to_input``)."""
        return x - self.b_dec.to(x.dtype) if getattr(self, "apply_b_dec_to_input", False) else x

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The architecture's encode and decode (its fast paths override this)."""
        c = self.encode(x)
        return self.decode(c), c

    @classmethod
    def from_config(cls, d_in: int, d_sae: int, hook_name: str, cfg: Any, writes: Writes | None = None) -> SAE:
        """Build from the ``saes`` block of a run config (`e2edict.config.SAEsConfig`)."""
        return cls(d_in, d_sae, hook_name)

    # --- the architecture's rules for the ``saes`` block: its keys are ``cfg.options`` (`options_schema`) ---
    @classmethod
    def validate_config(cls, cfg: Any) -> None:
        """Checks that need no model (run while the config is read, after ``cfg.options`` is
        validated by `options_schema`); raise ValueError."""
        if cfg.kind != "sae" and not cls.transcoder_ok:
            ok = [a for a, c in registry.items() if c.transcoder_ok]
            raise ValueError(
                f"saes.kind={cfg.kind!r}: transcoders take {', '.join(ok[:-1])} or {ok[-1]}, not {cls.architecture!r}"
            )

    @classmethod
    def check_sizes(cls, cfg: Any, d_sae: dict[str, int]) -> None:
        """Checks against each position's dictionary size (once the model is loaded)."""

    def configure_training(self, cfg: Any) -> None:
        """Take the ``saes`` block's training-only settings (built or loaded SAEs alike)."""

    def check_config(self, cfg: Any, where: str) -> None:
        """An SAE loaded to train on (``saes.init_from``) must agree with the config's keys for its
        architecture; a one-line error naming both otherwise. The base checks the architecture."""
        if self.architecture != cfg.architecture:
            raise E2EDictError(f"{where} is a {self.architecture} SAE but saes.architecture is {cfg.architecture!r}")

    # Whether the SAE trains with a sparsity penalty (False where k fixes L0): what a fine-tune keeps.
    has_sparsity_term: ClassVar[bool] = True

    # The sparsity coefficient the SAE was trained with, where the file it was loaded from says so
    # (`load_sae`); None for SAEs built here or files that do not say.
    source_lambda: float | None = None

    # What the last training forward kept for its own loss terms (JumpReLU's and Gated's
    # pre-activations, so the encoder GEMM runs once per step): ``(input, tensors)`` or None.
    _pre_cache: tuple | None = None

    def release_forward(self) -> None:
        """Drop what the last forward kept for its loss terms; the splice calls it once they are
        computed, so nothing of one step stays alive into the next."""
        self._pre_cache = None

    # --- how the splice and evaluation run this SAE: an architecture with several decodings of
    # one code (Matryoshka's nested prefixes) overrides these; the splice names no architecture.
    def spliced_copies(self) -> int:
        """Stacked copies of the batch a training spliced run gives this SAE (1: the batch itself)."""
        return 1

    def training_splice(self, on: bool) -> None:
        """Switch this SAE's behaviour for a training spliced run on, or back to the usual one
        (plain calls, not a context manager, so a compiled step traces them)."""

    def nested(self) -> list[int]:
        """Sizes of nested sub-dictionaries that evaluation judges one by one (none: [])."""
        return []

    @contextmanager
    def using_nested(self, i: int):
        """Inside: the SAE decodes with nested sub-dictionary ``i`` alone."""
        raise E2EDictError(f"a {self.architecture} SAE has no nested dictionaries")
        yield self

    def decode_nested(self, c: torch.Tensor, i: int, D: torch.Tensor | None = None) -> torch.Tensor:
        raise E2EDictError(f"a {self.architecture} SAE has no nested dictionaries")

    def sparsity_loss(self, x: torch.Tensor, c: torch.Tensor, p: float) -> torch.Tensor:
        """The sparsity term before its coefficient: ``mean_t ||c_t||_p / d_in`` (method §3)."""
        from e2edict.losses import sparsity_loss

        return sparsity_loss(c, self.d_in, p)

    def local_loss(self, x_hat: torch.Tensor, target: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The local reconstruction term: the MSE of the output against its target (an
        architecture may judge more than one reconstruction, e.g. Matryoshka's prefixes)."""
        from e2edict.losses import mse_loss

        return mse_loss(x_hat, target)

    def aux_loss(self, x: torch.Tensor, x_hat: torch.Tensor, c: torch.Tensor) -> torch.Tensor | None:
        """An architecture's auxiliary loss for local training (None: it has none)."""
        return None

    @abstractmethod
    def saelens_tensors(self) -> dict[str, torch.Tensor]:
        """The weights in SAELens's layout and meaning (dictionary normalisation folded in)."""

    def saelens_cfg(self) -> dict[str, Any]:
        """Architecture-specific cfg.json keys (beyond the common ones)."""
        return {}

    def saelens_metadata(self) -> dict[str, Any]:
        """Architecture-specific keys for cfg.json's metadata (e2edict's own)."""
        return {}

    @classmethod
    @abstractmethod
    def from_saelens(cls, tensors: dict[str, torch.Tensor], cfg: dict[str, Any]) -> SAE: ...

    @property
    def dictionary(self) -> torch.Tensor:
        """The decoder directions as rows, [d_sae, d_out]."""
        return self.saelens_tensors()["W_dec"]


@contextmanager
def eval_mode(saes: dict[str, SAE]):
    """Inference behaviour inside (e.g. BatchTopK's threshold instead of batch selection)."""
    modes = {h: s.training for h, s in saes.items()}
    for s in saes.values():
        s.eval()
    try:
        yield saes
    finally:
        for h, s in saes.items():
            s.train(modes[h])


def decoder_rows(W_dec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A loaded decoder as ``(unit rows, norms, zero)``: each row divided by its norm (exactly 1 for
    e2edict's own files, which are kept as saved), the norms to fold into the encoder or keep as a
    `decoder_scale`, and which rows are all zero. A zero row is a latent that writes nothing
    (sparsify starts a transcoder's decoder at zero; a latent that never fired stays so): its norm
    is reported as 1, its unit row is the first basis vector, and the loader gives it a
    `decoder_scale` of 0."""
    norms = W_dec.norm(dim=1)
    zero = norms == 0
    if torch.allclose(norms, torch.ones_like(norms), atol=1e-4):
        norms = torch.ones_like(norms)  # keep the latents exactly as saved
    else:
        norms = torch.where(zero, torch.ones_like(norms), norms)
    W = W_dec / norms[:, None]
    if zero.any():
        W[zero] = torch.nn.functional.one_hot(torch.zeros((), dtype=torch.long), W.shape[1]).to(W.dtype)
    return W, norms, zero


def check_tensor(tensors: dict[str, torch.Tensor], name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Fetch one tensor, with a clear error when it is missing or has the wrong shape."""
    if name not in tensors:
        raise E2EDictError(f"SAE weights lack tensor {name!r}")
    t = tensors[name]
    if tuple(t.shape) != shape:
        raise E2EDictError(f"SAE tensor {name!r} has shape {tuple(t.shape)}, expected {shape}")
    if not torch.isfinite(t).all():
        raise E2EDictError(f"SAE tensor {name!r} contains NaN or Inf")
    return t
