"""Matryoshka BatchTopK SAEs (Bussmann et al. 2025; Nabeshima 2024).

The dictionary is split into nested prefixes (say the first 1/16, 1/4, 1/2 and all of the
latents), and every prefix is trained to do the job alone: its reconstruction
``c[:, :m] D[:m] + b_dec`` is judged as the whole SAE's would be. General features then settle in
the early latents, and feature absorption drops. The code is BatchTopK's (one selection over the
whole dictionary); only the losses see the prefixes:

- local: the sum over prefixes of each prefix's reconstruction MSE;
- e2e / e2e+ds: each prefix's reconstruction spliced in and judged by the KL (and the downstream
  terms), summed over prefixes. How the prefixes share a step is ``e2e_prefixes``
  (``saes.matryoshka_e2e``): ``"all"`` asks the splice for P stacked copies of the batch
  (`spliced_copies`) and decodes copy i with prefix i (one spliced suffix over P x the batch,
  one clean run); ``"drawn"`` decodes each step with the next prefix in turn. The SAE sets its
  own ``prefix_mode`` inside `training_splice` and `using_nested` (evaluation's per-prefix
  figures); outside them it decodes with the whole dictionary.

On disk it is BatchTopK's inference form (a JumpReLU with one threshold), which SAELens loads;
the prefix sizes travel in the metadata.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Literal

import torch
from pydantic import Field

from e2edict.errors import E2EDictError
from e2edict.losses import mse_loss
from e2edict.saes.base import affine
from e2edict.saes.topk import BatchTopKOptions, BatchTopKSAE

DEFAULT_PREFIXES = (1 / 16, 1 / 4, 1 / 2, 1.0)


def resolve_prefixes(spec, d_sae: int) -> list[int]:
    """Prefix sizes as latent counts from fractions of ``d_sae`` (floats in (0, 1]) or counts
    (ints): strictly increasing, the last one ``d_sae``; a one-line error otherwise."""
    spec = list(DEFAULT_PREFIXES if spec is None else spec)
    if not spec:
        raise E2EDictError("saes.matryoshka_prefixes is empty")
    sizes = []
    for v in spec:
        if isinstance(v, bool) or not isinstance(v, int | float) or v <= 0:
            raise E2EDictError(f"saes.matryoshka_prefixes: {v!r} is not a positive fraction or count")
        if isinstance(v, float) and v > 1:
            raise E2EDictError(f"saes.matryoshka_prefixes: fraction {v} is larger than 1 (write counts as integers)")
        sizes.append(round(v * d_sae) if isinstance(v, float) else v)
    if any(b <= a for a, b in zip(sizes, sizes[1:], strict=False)) or sizes[0] < 1:
        raise E2EDictError(f"saes.matryoshka_prefixes {spec} give sizes {sizes}: they must increase strictly from 1")
    if sizes[-1] > d_sae:
        raise E2EDictError(f"saes.matryoshka_prefixes: {sizes[-1]} latents is larger than d_sae={d_sae}")
    if sizes[-1] != d_sae:
        raise E2EDictError(f"saes.matryoshka_prefixes: the last prefix must be the whole dictionary ({d_sae}), not {sizes[-1]}")
    return sizes


class MatryoshkaOptions(BatchTopKOptions):
    matryoshka_prefixes: list[int | float] | None = Field(
        None, description="nested prefix sizes: fractions of d_sae or counts, increasing, the last all (null: 1/16 1/4 1/2 1)"
    )
    matryoshka_e2e: Literal["all", "drawn"] = Field(
        "drawn", description="e2e: one prefix per step in turn, or every prefix each step (stacked)"
    )


class MatryoshkaBatchTopKSAE(BatchTopKSAE):
    architecture = "matryoshka_batchtopk"
    saelens_architecture = "jumprelu"
    transcoder_ok = False
    options_schema = MatryoshkaOptions

    def __init__(self, d_in: int, d_sae: int, hook_name: str = "", k: int = 32, prefixes=None, **kw: Any):
        super().__init__(d_in, d_sae, hook_name, k, **kw)
        self.prefix_mode: int | str | None = None
        self.e2e_prefixes = "drawn"
        # "drawn": one prefix per training forward, in turn (a counter on the device: no read-back,
        # and it is saved with the SAE's state, so a resumed run draws what an uninterrupted one would)
        self.register_buffer("prefix_draws", torch.zeros((), dtype=torch.long))
        self.set_prefixes(prefixes)

    def set_prefixes(self, spec) -> None:
        self.prefixes = resolve_prefixes(spec, self.d_sae)
        self.register_buffer("prefix_sizes", torch.tensor(self.prefixes, device=self.b_dec.device), persistent=False)

    @classmethod
    def from_config(cls, d_in: int, d_sae: int, hook_name: str, cfg: Any, writes=None) -> MatryoshkaBatchTopKSAE:
        sae = super().from_config(d_in, d_sae, hook_name, cfg, writes)  # BatchTopK's settings
        sae.set_prefixes(cfg.options.matryoshka_prefixes)
        return sae

    @classmethod
    def validate_config(cls, cfg: Any) -> None:
        super().validate_config(cfg)
        if cfg.options.matryoshka_prefixes == []:
            raise ValueError("saes.matryoshka_prefixes is empty")

    @classmethod
    def check_sizes(cls, cfg: Any, d_sae: dict[str, int]) -> None:
        for n in d_sae.values():  # sizes checked against each dictionary before anything is written
            resolve_prefixes(cfg.options.matryoshka_prefixes, n)
        super().check_sizes(cfg, d_sae)

    def configure_training(self, cfg: Any) -> None:
        self.e2e_prefixes = cfg.options.matryoshka_e2e

    def check_config(self, cfg: Any, where: str) -> None:
        super().check_config(cfg, where)
        prefixes = cfg.options.matryoshka_prefixes
        if prefixes is not None and resolve_prefixes(prefixes, self.d_sae) != self.prefixes:
            raise E2EDictError(f"{where} has prefixes {self.prefixes}, not saes.matryoshka_prefixes")

    def spliced_copies(self) -> int:
        return len(self.prefixes) if self.e2e_prefixes == "all" else 1

    def training_splice(self, on: bool) -> None:
        self.prefix_mode = ("batched" if self.e2e_prefixes == "all" else "drawn") if on else None

    def nested(self) -> list[int]:
        return list(self.prefixes) if len(self.prefixes) > 1 else []

    @contextmanager
    def using_nested(self, i: int):
        self.prefix_mode = i
        try:
            yield self
        finally:
            self.prefix_mode = None

    def decode_nested(self, c: torch.Tensor, i: int, D: torch.Tensor | None = None) -> torch.Tensor:
        return self.decode_prefix(c, i, D)

    def decode_prefix(self, c: torch.Tensor, i: int, D: torch.Tensor | None = None) -> torch.Tensor:
        """The reconstruction of prefix ``i``: its latents alone (``c[..., :m] D[:m] + b_dec``);
        ``D``: the normalised dictionary, when the caller has it already."""
        m = self.prefixes[i]
        D = self.normalized_decoder()[:m] if D is None else D[:m]
        return affine(c[..., :m], D, self.b_dec)

    def prefix_recons(self, c: torch.Tensor) -> list[torch.Tensor]:
        """Every prefix's reconstruction, built cumulatively (one pass over the dictionary)."""
        D = self.normalized_decoder()
        out, acc, lo = [], self.b_dec.to(c.dtype), 0
        for m in self.prefixes:
            acc = acc + affine(c[..., lo:m], D[lo:m])
            out.append(acc)
            lo = m
        return out

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.encode(x)
        self._track_dead(c)
        mode = self.prefix_mode
        if mode is None:
            return self.decode(c), c
        if mode == "batched":  # P stacked copies of the batch: copy i decoded with prefix i
            D = self.normalized_decoder()  # once for every copy
            chunks = c.chunk(len(self.prefixes), dim=0)
            return torch.cat([self.decode_prefix(ci, i, D) for i, ci in enumerate(chunks)]), c
        if mode == "drawn":  # the next prefix in turn, chosen on the device
            # index_select, not indexing by a 0-dim tensor (which reads it back to the host)
            m = self.prefix_sizes.index_select(0, (self.prefix_draws % len(self.prefixes)).view(1))
            if self.training:
                self.prefix_draws += 1
            keep = torch.arange(self.d_sae, device=c.device) < m
            return self.decode(c * keep), c
        return self.decode_prefix(c, int(mode)), c

    def local_loss(self, x_hat: torch.Tensor, target: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Sum over prefixes of each prefix's reconstruction MSE (the paper's objective)."""
        if self.prefix_mode is not None:
            return mse_loss(x_hat, target)
        return torch.stack([mse_loss(r, target) for r in self.prefix_recons(c)]).sum()

    def saelens_metadata(self) -> dict[str, Any]:
        return {**super().saelens_metadata(), "e2edict_matryoshka_prefixes": self.prefixes}

    @classmethod
    def _empty_from_saelens(cls, cfg: dict[str, Any], writes=None) -> MatryoshkaBatchTopKSAE:
        base = super()._empty_from_saelens(cfg)
        meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
        prefixes = meta.get("e2edict_matryoshka_prefixes")
        if not isinstance(prefixes, list) or not all(isinstance(p, int) and not isinstance(p, bool) for p in prefixes):
            raise E2EDictError(f"a matryoshka_batchtopk SAE's metadata needs e2edict_matryoshka_prefixes, got {prefixes!r}")
        return cls(cfg["d_in"], cfg["d_sae"], k=base.k, prefixes=prefixes, apply_b_dec_to_input=base.apply_b_dec_to_input)
