"""Adapters around SAEs: low-rank updates of the model, trained so the model with its SAEs spliced
in keeps the original model's output (`docs/adapters.md`). `attach_adapter` builds one from a
config on either backbone; `load_adapter` reads a saved one back onto a backbone."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from e2edict.adapters.base import ADAPTER_CONFIG, ADAPTER_WEIGHTS, Adapter, resolve_blocks
from e2edict.errors import E2EDictError

__all__ = ["Adapter", "attach_adapter", "load_adapter", "ADAPTER_CONFIG", "ADAPTER_WEIGHTS"]


def attach_adapter(backbone, cfg, first_sae: str, seed: int) -> Adapter:
    """An adapter of ``cfg`` (`e2edict.config.AdapterConfig`) on ``backbone``, on from now on
    (`Backbone.adapter`); ``first_sae`` is the earliest SAE hook (``layers: after``). Its A
    matrices are drawn from ``seed``; every check runs before the model is touched."""
    from e2edict.backbones import HFBackbone, TLBackbone

    if backbone.adapter is not None:
        raise E2EDictError("the model already carries an adapter")
    blocks = resolve_blocks(cfg.layers, backbone.n_layers, first_sae, backbone)
    devices = {p.device for p in backbone.model.parameters()}
    with torch.random.fork_rng(devices=[d for d in devices if d.type == "cuda"]):
        torch.manual_seed(seed)
        if isinstance(backbone, TLBackbone):
            from e2edict.adapters.transformer_lens import TLLoRA, resolve_targets

            if cfg.dropout > 0:
                raise E2EDictError(
                    "adapter.dropout: the TransformerLens backbone adapts the weights themselves, which leaves no input "
                    "to drop out; use 0 or model.backend: huggingface"
                )
            adapter = TLLoRA(backbone, cfg.rank, cfg.alpha, blocks, resolve_targets(backbone.model, blocks, cfg.modules))
        elif isinstance(backbone, HFBackbone):
            from e2edict.adapters.huggingface import PeftLoRA

            adapter = PeftLoRA.attach(backbone, cfg.rank, cfg.alpha, cfg.dropout, blocks, cfg.modules)
        else:
            raise E2EDictError(f"adapters are not supported on {type(backbone).__name__}")
    backbone.adapter = adapter
    return adapter


def load_adapter(backbone, folder: str | Path) -> Adapter:
    """A saved adapter (`Adapter.save`) attached to ``backbone``: peft's files on a Hugging Face
    backbone, e2edict's TransformerLens layout on a TransformerLens one."""
    from e2edict.backbones import HFBackbone, TLBackbone

    folder = Path(folder)
    try:
        doc = json.loads((folder / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise E2EDictError(f"adapter {str(folder)!r}: cannot read {ADAPTER_CONFIG} ({e})") from None
    if not (folder / ADAPTER_WEIGHTS).is_file():
        raise E2EDictError(f"adapter {str(folder)!r} has no {ADAPTER_WEIGHTS}")
    if backbone.adapter is not None:
        raise E2EDictError("the model already carries an adapter")
    from e2edict.adapters.transformer_lens import FORMAT, TLLoRA

    is_tl = isinstance(doc, dict) and doc.get("format") == FORMAT
    if isinstance(backbone, TLBackbone) and is_tl:
        adapter = TLLoRA.load(backbone, folder, doc)
    elif isinstance(backbone, HFBackbone) and isinstance(doc, dict) and doc.get("peft_type") == "LORA":
        from e2edict.adapters.huggingface import PeftLoRA

        adapter = PeftLoRA.load(backbone, folder, doc)
    else:
        made = "TransformerLens" if is_tl else "peft (Hugging Face)"
        raise E2EDictError(f"adapter {str(folder)!r} is a {made} adapter; it does not load onto a {type(backbone).__name__}")
    backbone.adapter = adapter
    return adapter
