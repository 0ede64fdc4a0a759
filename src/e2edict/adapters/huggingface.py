"""LoRA on a Hugging Face model through peft.

The adapted modules are the linear layers (``nn.Linear``, GPT-2's ``Conv1D``) inside each chosen
block whose path names the attention (``attn``, ``attention``) or the MLP (``mlp``,
``feed_forward``, ``ffn``): GPT-2's ``attn.c_attn``, ``attn.c_proj``, ``mlp.c_fc``, ``mlp.c_proj``;
Llama's, Gemma's and Qwen's ``self_attn.{q,k,v,o}_proj`` and ``mlp.{gate,up,down}_proj``; Pythia's
``attention.query_key_value``, ``attention.dense``, ``mlp.dense_h_to_4h``, ``mlp.dense_4h_to_h``.
They are listed by full module path in peft's ``target_modules``, and peft injects its LoRA layers
into the backbone's model in place (`peft.get_peft_model`), so the backbone's hooks and shared
prefix work unchanged. The files are peft's own (``save_pretrained``): ``PeftModel.from_pretrained``
on the same base model loads them.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from e2edict.adapters.base import ADAPTER_CONFIG, Adapter, check_rank
from e2edict.errors import E2EDictError

_GROUPS = {"attn": ("attn", "attention"), "mlp": ("mlp", "feed_forward", "ffn")}


def _linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """(d_in, d_out) of a linear layer peft can adapt, None for anything else."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    return None


def _group(path: str) -> str | None:
    parts = path.lower().split(".")
    for group, words in _GROUPS.items():
        if any(w in part for part in parts[:-1] for w in words):
            return group
    return None


def resolve_targets(backbone, blocks: list[int], modules: list[str], rank: int) -> tuple[list[str], bool]:
    """The module paths to adapt, and whether they are GPT-2 ``Conv1D`` layers (peft's fan_in_fan_out)."""
    from transformers.pytorch_utils import Conv1D

    targets, conv = [], False
    for i in blocks:
        found = dict.fromkeys(modules, 0)
        for name, mod in backbone.blocks[i].named_modules():
            shape = _linear_shape(mod)
            group = _group(name) if shape is not None else None
            if group not in found:
                continue
            full = f"{backbone.blocks_path}.{i}.{name}"
            check_rank(rank, full, *shape)
            targets.append(full)
            found[group] += 1
            conv = conv or isinstance(mod, Conv1D)
        missing = [g for g, n in found.items() if n == 0]
        if missing:
            raise E2EDictError(
                f"adapter.modules: block {i} of model {backbone.name!r} has no {missing[0]!r} linear layers to adapt"
            )
    return targets, conv


class PeftLoRA(Adapter):
    """peft's LoRA layers inside a backbone's model."""

    def __init__(self, backbone, peft_model, rank: int, alpha: float, blocks: list[int], targets: list[str], base):
        from peft.tuners.lora import LoraLayer

        super().__init__(rank, alpha, blocks, targets, base)
        self.peft_model = peft_model
        model = backbone.model
        self.layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
        self._named = [(n, p) for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n]
        self._dropouts = [d for layer in self.layers for d in layer.lora_dropout.values()]
        model.eval()  # peft's new modules start in training mode; dropout is on only while training (`train`)

    @classmethod
    def attach(cls, backbone, rank: int, alpha: float, dropout: float, blocks: list[int], modules: list[str]) -> PeftLoRA:
        from peft import LoraConfig, get_peft_model

        targets, conv = resolve_targets(backbone, blocks, modules, rank)
        base = [p for p in backbone.model.parameters() if not p.requires_grad]
        config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                            fan_in_fan_out=conv, bias="none")  # fmt: skip
        peft_model = get_peft_model(backbone.model, config)
        peft_model.peft_config["default"].base_model_name_or_path = backbone.name
        return cls(backbone, peft_model, rank, alpha, blocks, targets, base)

    @classmethod
    def load(cls, backbone, folder: Path, doc: dict) -> PeftLoRA:
        from peft import PeftModel

        targets = doc.get("target_modules")
        if not isinstance(targets, list) or not targets:
            raise E2EDictError(f"adapter {str(folder)!r}: {ADAPTER_CONFIG} lists no target modules by path")
        blocks = sorted({backbone.block_of(t) for t in targets})
        base = [p for p in backbone.model.parameters() if not p.requires_grad]
        try:
            peft_model = PeftModel.from_pretrained(backbone.model, str(folder), is_trainable=False)
        except Exception as e:  # peft raises ValueError, KeyError, RuntimeError for a mismatched base model
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise E2EDictError(f"adapter {str(folder)!r} does not fit model {backbone.name!r}: {first}") from None
        return cls(backbone, peft_model, int(doc["r"]), float(doc["lora_alpha"]), blocks, targets, base)

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return self._named

    def _switch(self, on: bool) -> None:
        for layer in self.layers:
            layer.enable_adapters(on)

    def _set_dropout(self, on: bool) -> None:
        for d in self._dropouts:
            d.train(on)

    def _write(self, folder: Path, base_model: str) -> None:
        """peft's ``save_pretrained`` (adapter_config.json, adapter_model.safetensors, its README.md)."""
        # no embedding layer is ever adapted (and peft's check for one would read the base model's files)
        self.peft_model.save_pretrained(str(folder), safe_serialization=True, save_embedding_layers=False)
        doc = json.loads((folder / ADAPTER_CONFIG).read_text())
        doc["base_model_name_or_path"] = base_model
        (folder / ADAPTER_CONFIG).write_text(json.dumps(doc, indent=2) + "\n")
