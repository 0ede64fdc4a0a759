"""Convert a checkpoint of the reference implementation (Apollo Research's ``e2e_sae``) into
SAELens-layout folders that e2edict and SAELens load.

The reference saves its SAEs' state dict (``samples_N.pt``) with, per position (dots replaced by
hyphens), ``encoder.0.weight [n_dict, d_in]``, ``encoder.0.bias``, ``decoder.weight [d_in, n_dict]``
(normalised column-wise on every forward) and ``decoder.bias``, plus a ``final_config.yaml``. The
checkpoint is read with ``torch.load(weights_only=True)``: anything but tensors is refused.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml

from e2edict.errors import E2EDictError
from e2edict.saes.relu import ReLUSAE
from e2edict.saes.saelens_format import save_sae

_KEY = re.compile(
    r"^(?:saes\.)?(?P<pos>[A-Za-z0-9_-]+)\.(?P<param>encoder\.0\.weight|encoder\.0\.bias|decoder\.weight|decoder\.bias)$"
)
_HOOK = re.compile(r"^blocks\.\d+\.[A-Za-z0-9_.]+$")


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError, AttributeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise E2EDictError(f"{str(path)!r} is not a tensors-only checkpoint ({first})") from None
    if isinstance(state, dict) and "model_state_dict" in state and isinstance(state["model_state_dict"], dict):
        state = state["model_state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise E2EDictError(f"{str(path)!r} does not hold a state dict of tensors")
    return state


def convert(checkpoint: str | Path, config: str | Path, out: str | Path) -> dict[str, Path]:
    """Write one SAE folder per position under ``out``; return ``{hook_name: folder}``."""
    checkpoint, config, out = Path(checkpoint), Path(config), Path(out)
    try:
        cfg: dict[str, Any] = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise E2EDictError(f"cannot read the reference config {str(config)!r}: {' '.join(str(e).split())}") from None
    if not isinstance(cfg, dict):
        raise E2EDictError(f"{str(config)!r} is not a mapping")
    state = _load_state(checkpoint)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        m = _KEY.match(key)
        if m:
            groups.setdefault(m.group("pos"), {})[m.group("param")] = value.float()
    if not groups:
        raise E2EDictError(f"{str(checkpoint)!r} holds no e2e_sae SAE weights (keys like <pos>.encoder.0.weight)")
    sae_cfg = cfg.get("saes") if isinstance(cfg.get("saes"), dict) else {}
    loss_cfg = cfg.get("loss") if isinstance(cfg.get("loss"), dict) else {}
    data_cfg = cfg.get("train_data") if isinstance(cfg.get("train_data"), dict) else {}
    written = {}
    for pos, p in sorted(groups.items()):
        missing = {"encoder.0.weight", "encoder.0.bias", "decoder.weight", "decoder.bias"} - set(p)
        if missing:
            raise E2EDictError(f"SAE {pos!r} in {str(checkpoint)!r} lacks {', '.join(sorted(missing))}")
        hook = pos.replace("-", ".")
        if not _HOOK.match(hook):
            raise E2EDictError(f"SAE position {pos!r} does not name a block hook")
        W_e, b_e, W_d, b_d = p["encoder.0.weight"], p["encoder.0.bias"], p["decoder.weight"], p["decoder.bias"]
        n_dict, d_in = W_e.shape
        shapes_ok = b_e.shape == (n_dict,) and W_d.shape == (d_in, n_dict) and b_d.shape == (d_in,)
        if W_e.dim() != 2 or not shapes_ok:
            raise E2EDictError(f"SAE {pos!r}: inconsistent shapes {tuple(W_e.shape)}, {tuple(W_d.shape)}")
        sae = ReLUSAE(d_in, n_dict, hook)
        with torch.no_grad():
            sae.W_enc.copy_(W_e.T)
            sae.b_enc.copy_(b_e)
            sae.W_dec.copy_(F.normalize(W_d, dim=0).T)  # the reference's dictionary: unit columns
            sae.b_dec.copy_(b_d)
        meta = {
            "model_name": cfg.get("tlens_model_name") or "",
            "hook_name": hook,
            "context_size": data_cfg.get("n_ctx"),
            "prepend_bos": True,
            "e2edict_imported_from": f"e2e_sae:{checkpoint.name}",
            "e2edict_coefficients": {k: v for k, v in loss_cfg.items() if isinstance(v, (dict, int, float))},
            "e2edict_dict_ratio": sae_cfg.get("dict_size_to_input_ratio"),
        }
        folder = out / hook
        save_sae(sae, folder, meta)
        written[hook] = folder
    return written
