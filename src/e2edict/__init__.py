"""e2edict: end-to-end sparse dictionary learning.

The data flow, one module a step: `config` -> `backbones` (model) + `saes` -> `data` ->
`splice` (the shared-prefix forward) and `losses` -> `trainer` -> run directory -> `evaluation`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "evaluate", "load_config", "load_model", "load_saes", "train"]


def load_model(name_or_path: str = "tiny", device: str = "cpu", backend: str = "transformer_lens"):
    """A frozen model: ``"tiny"`` (the embedded model), a model folder, or a hub name.

    ``backend="transformer_lens"`` gives a `HookedTransformer` (folders must hold a GPT-2-architecture
    model); ``backend="huggingface"`` gives the ``transformers`` causal LM itself."""
    from e2edict.run import open_backbone

    # TransformerLens's own attention: the fused path stays inside e2edict's training and evaluation
    kw = {"fused_attention": False} if backend == "transformer_lens" else {}
    return open_backbone(name_or_path, backend, device, **kw).model


def load_saes(path: str | Path, device: str = "cpu") -> dict[str, Any]:
    """``{hook_name: SAE}`` from a run directory (its ``saes/`` folder) or from one SAE folder."""
    from e2edict.errors import E2EDictError
    from e2edict.saes import load_sae
    from e2edict.saes.base import CFG_FILE

    path = Path(path)
    if (path / CFG_FILE).is_file():
        sae = load_sae(path, device)
        return {sae.hook_name or path.name: sae}
    folder = path / "saes"
    if not folder.is_dir():
        raise E2EDictError(f"{str(path)!r} is neither an SAE folder (with {CFG_FILE}) nor a run directory (with saes/)")
    out = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        sae = load_sae(sub, device)
        out[sae.hook_name or sub.name] = sae
    if not out:
        raise E2EDictError(f"run directory {str(path)!r} has no SAEs in saes/")
    return out


def evaluate(model, saes: dict[str, Any], tokens, batch_size: int = 16, alive_tokens: int | None = None) -> dict[str, Any]:
    """The metrics of method §5 (eval.json's shape) for ``saes`` spliced into ``model`` (a
    `HookedTransformer` or a ``transformers`` causal LM) on ``tokens`` ([N, n_ctx] token ids)."""
    import torch

    from e2edict.backbones import HFBackbone, TLBackbone
    from e2edict.evaluation import evaluate_backbone

    tokens = torch.as_tensor(tokens)
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [N, n_ctx], got shape {tuple(tokens.shape)}")
    if hasattr(model, "cfg") and hasattr(model, "run_with_hooks"):
        from e2edict.backbones.tl_attention import fused_attention_inside

        with fused_attention_inside(model):  # the user's model object is handed back as it came
            backbone = TLBackbone(model, model.cfg.model_name)
            return evaluate_backbone(backbone, saes, tokens, batch_size=batch_size, alive_tokens=alive_tokens)
    backbone = HFBackbone(model, None, getattr(model.config, "name_or_path", type(model).__name__))  # hooks by module path
    return evaluate_backbone(backbone, saes, tokens, batch_size=batch_size, alive_tokens=alive_tokens)


def load_config(path: str | Path, overrides: list[str] | None = None):
    from e2edict.config import load_config as _load

    return _load(path, overrides)


def train(config, out: str | Path | None = None, overwrite: bool = False, progress: bool = True) -> Path:
    """Train from a `Config`, a mapping, or a YAML path; return the run directory."""
    from e2edict.config import Config, config_from_dict
    from e2edict.config import load_config as _load
    from e2edict.trainer import train as _train

    if isinstance(config, (str, Path)):
        config = _load(config)
    elif not isinstance(config, Config):
        config = config_from_dict(dict(config))
    return _train(config, out=out, overwrite=overwrite, progress=progress)
