"""LoRA on a TransformerLens model, as a parametrization of its own weights.

Each adapted weight W (``W_Q``, ``W_K``, ``W_V``, ``W_O`` of the attention, ``W_in``, ``W_gate``,
``W_out`` of the MLP) becomes ``W + (alpha / r) · ΔW`` through `torch.nn.utils.parametrize`, so every
code path that reads the weight (TransformerLens's own and e2edict's fused attention) sees the
adapted one, and the base tensor itself is never written. ``ΔW = (B A)ᵀ`` is the update of the
weight seen as a map from its input to its output (peft's convention: A is [r, d_in], B is
[d_out, r], B starts at zero), laid out in TransformerLens's shape:

    W_Q, W_K, W_V  [heads, d_model, d_head]  d_in = d_model,         d_out = heads · d_head
    W_O            [heads, d_head, d_model]  d_in = heads · d_head,  d_out = d_model
    W_in, W_gate   [d_model, d_mlp]          W_out [d_mlp, d_model]

Files: ``adapter_config.json`` (format ``e2edict-lora-transformer-lens``) and
``adapter_model.safetensors`` with ``<weight>.lora_A`` and ``<weight>.lora_B`` for each weight named
``blocks.<i>.attn.W_Q`` and so on (`docs/adapters.md`). Input dropout has no weight form: refused.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils import parametrize

from e2edict.adapters.base import ADAPTER_CONFIG, ADAPTER_WEIGHTS, Adapter, check_rank
from e2edict.errors import E2EDictError

FORMAT = "e2edict-lora-transformer-lens"
WEIGHTS = {"attn": ("W_Q", "W_K", "W_V", "W_O"), "mlp": ("W_in", "W_gate", "W_out")}


def in_out(weight: str, shape: tuple[int, ...]) -> tuple[int, int]:
    """(d_in, d_out) of a TransformerLens weight seen as a linear map."""
    if len(shape) == 2:
        return shape[0], shape[1]
    heads, a, b = shape
    return (heads * a, b) if weight == "W_O" else (a, heads * b)


def to_layout(weight: str, delta: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``delta`` [d_in, d_out] in the weight's own TransformerLens shape."""
    if len(shape) == 2:
        return delta
    if weight == "W_O":
        return delta.reshape(shape)
    heads, d_model, d_head = shape
    return delta.reshape(d_model, heads, d_head).permute(1, 0, 2)


class LowRankUpdate(nn.Module):
    """The parametrization ``W -> W + scale · to_layout((B A)ᵀ)``; the identity while switched off."""

    def __init__(self, weight: str, base: torch.Tensor, rank: int, scale: float, switch: list[bool]):
        super().__init__()
        d_in, d_out = in_out(weight, tuple(base.shape))
        dtype = torch.promote_types(base.dtype, torch.float32)  # fp32 master weights (fp64 in a float64 model)
        self.lora_A = nn.Parameter(torch.empty(rank, d_in, dtype=dtype, device=base.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # peft's (and nn.Linear's) default
        self.lora_B = nn.Parameter(torch.zeros(d_out, rank, dtype=dtype, device=base.device))
        self.weight, self.shape, self.scale = weight, tuple(base.shape), scale
        self._switch = switch  # shared by every update of one adapter (a list: no module state)

    def forward(self, W: torch.Tensor) -> torch.Tensor:
        if not self._switch[0]:
            return W
        delta = (self.lora_B @ self.lora_A).t() * self.scale
        return W + to_layout(self.weight, delta, self.shape).to(W.dtype)


def resolve_targets(model, blocks: list[int], modules: list[str]) -> list[str]:
    """``blocks.<i>.<attn|mlp>.<W>`` for each chosen block and module that has the weight."""
    targets = []
    for i in blocks:
        block = model.blocks[i]
        for group in modules:
            owner = getattr(block, group, None)
            if owner is None:
                raise E2EDictError(f"adapter.modules: block {i} of the model has no {group!r} module")
            if group == "attn" and hasattr(owner, "_W_K"):
                raise E2EDictError(
                    "adapter: grouped-query attention keeps W_K and W_V per key-value head; the TransformerLens backbone "
                    "adapts plain W_Q/W_K/W_V/W_O only (use model.backend: huggingface)"
                )
            found = [w for w in WEIGHTS[group] if isinstance(getattr(owner, w, None), torch.Tensor)]
            if not found:
                raise E2EDictError(f"adapter.modules: block {i}'s {group!r} has none of {', '.join(WEIGHTS[group])}")
            targets += [f"blocks.{i}.{group}.{w}" for w in found]
    return targets


class TLLoRA(Adapter):
    """LoRA parametrizations on a `HookedTransformer` (see the module docstring)."""

    def __init__(self, backbone, rank: int, alpha: float, blocks: list[int], targets: list[str]):
        model = backbone.model
        owners = []
        for name in targets:
            path, _, weight = name.rpartition(".")
            owner = model.get_submodule(path)
            check_rank(rank, name, *in_out(weight, tuple(getattr(owner, weight).shape)))
            owners.append((name, owner, weight))
        super().__init__(rank, alpha, blocks, targets, [p for p in model.parameters() if not p.requires_grad])
        self.switch = [True]
        self.updates: dict[str, LowRankUpdate] = {}
        for name, owner, weight in owners:  # every check passed: nothing is half attached
            update = LowRankUpdate(weight, getattr(owner, weight), rank, self.scale, self.switch)
            parametrize.register_parametrization(owner, weight, update)
            self.updates[name] = update

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(f"{n}.{k}", getattr(u, k)) for n, u in self.updates.items() for k in ("lora_A", "lora_B")]

    def _switch(self, on: bool) -> None:
        self.switch[0] = on

    def _write(self, folder: Path, base_model: str) -> None:
        tensors = {n: p.detach().cpu().contiguous() for n, p in self.named_parameters()}
        save_file(tensors, str(folder / ADAPTER_WEIGHTS))
        doc = {
            "format": FORMAT,
            "r": self.rank,
            "lora_alpha": self.alpha,
            "blocks": self.blocks,
            "target_weights": self.targets,
            "base_model_name_or_path": base_model,
            "update": "W + (lora_alpha / r) * (lora_B @ lora_A).T, reshaped to the TransformerLens weight's shape",
        }
        (folder / ADAPTER_CONFIG).write_text(json.dumps(doc, indent=2) + "\n")

    @classmethod
    def load(cls, backbone, folder: Path, doc: dict) -> TLLoRA:
        try:
            adapter = cls(backbone, int(doc["r"]), float(doc["lora_alpha"]), list(doc["blocks"]), list(doc["target_weights"]))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise E2EDictError(
                f"adapter {str(folder)!r}: {ADAPTER_CONFIG} does not describe this model's weights ({e})"
            ) from None
        adapter.load_tensors(load_file(str(folder / ADAPTER_WEIGHTS)), f"adapter {str(folder)!r}")
        return adapter
