"""The SAELens v6 on-disk layout, which e2edict writes and reads.

A folder holds ``cfg.json`` and ``sae_weights.safetensors`` (tensors ``W_enc [d_in, d_sae]``,
``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``, ``b_dec [d_in]`` plus any the architecture adds), so
``sae_lens.SAE.load_from_disk(folder)`` loads it unchanged. Both files are written to temporary
names and renamed (`e2edict.atomic`), so a crash never leaves a half-written SAE. Each
architecture gives its tensors and cfg keys (`SAE.saelens_tensors`, `SAE.saelens_cfg`,
`SAE.from_saelens`); this module writes, reads and checks the files. sparsify's layout is
`e2edict.saes.sparsify_format`'s.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from e2edict.atomic import write_atomic
from e2edict.errors import E2EDictError
from e2edict.saes.base import SAE, Writes, check_tensor, registry

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SAELENS_VERSION = "6.0.0"


def save_sae(sae: SAE, folder: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write ``sae`` to ``folder`` in the SAELens v6 layout."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in sae.saelens_tensors().items()}
    dtype = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    if sae.W_skip is not None:
        tensors["W_skip"] = sae.W_skip.detach().to("cpu").contiguous()
    transcoder = sae.hook_name_out is not None
    cfg = {
        "architecture": saelens_architecture(sae),
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        **({"d_out": sae.d_out, "hook_name_out": sae.hook_name_out} if transcoder else {}),
        "dtype": dtype,
        "device": "cpu",
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "reshape_activations": "none",
        **sae.saelens_cfg(),
        "metadata": {
            "sae_lens_version": SAELENS_VERSION,
            "sae_lens_training_version": SAELENS_VERSION,
            "hook_name": sae.hook_name,
            "e2edict_architecture": sae.architecture,
            **({"e2edict_kind": sae.kind, "hook_name_out": sae.hook_name_out} if transcoder else {}),
            **sae.saelens_metadata(),
            **(metadata or {}),
        },
    }
    write_atomic(folder / WEIGHTS_FILE, lambda p: save_file(tensors, str(p)))
    write_atomic(folder / CFG_FILE, lambda p: p.write_text(json.dumps(cfg, indent=2) + "\n"))
    return folder


_SAELENS_TO_E2EDICT = {
    "standard": "relu",
    "topk": "topk",
    "jumprelu": "jumprelu",
    "gated": "gated",
    "transcoder": "relu",
    "skip_transcoder": "relu",
    "jumprelu_transcoder": "jumprelu",
    "jumprelu_skip_transcoder": "jumprelu",
}


def saelens_architecture(sae: SAE) -> str:
    """The cfg.json architecture: SAELens's name for an SAE; for a transcoder SAELens's transcoder
    classes (``transcoder``, ``skip_transcoder``, ``jumprelu_transcoder``, ``jumprelu_skip_transcoder``).
    SAELens has no TopK transcoder: e2edict writes ``topk_transcoder`` / ``topk_skip_transcoder``,
    which e2edict loads and SAELens does not."""
    if sae.hook_name_out is None:
        return sae.saelens_architecture
    skip = "skip_" if sae.W_skip is not None else ""
    base = {"standard": "", "jumprelu": "jumprelu_", "topk": "topk_"}.get(sae.saelens_architecture)
    if base is None:
        raise E2EDictError(f"a {sae.architecture} SAE cannot be saved as a transcoder")
    return f"{base}{skip}transcoder"


def _file_d_out(cfg: dict[str, Any]) -> int | None:
    """A transcoder file's output width (its cfg.json names a transcoder architecture), else None."""
    return cfg.get("d_out", cfg["d_in"]) if "transcoder" in str(cfg.get("architecture", "")) else None


def writes_from_saelens(tensors: dict[str, torch.Tensor], cfg: dict[str, Any]) -> Writes | None:
    """What a file's SAE writes where its cfg.json names a transcoder (``d_out``, the output hook,
    a skip path when the file has its weights or names one); None for an SAE."""
    d_out = _file_d_out(cfg)
    if d_out is None:
        return None
    if isinstance(d_out, bool) or not isinstance(d_out, int) or d_out <= 0:
        raise E2EDictError(f"a transcoder's d_out must be a positive integer, got {d_out!r}")
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    out_hook = cfg.get("hook_name_out") or meta.get("hook_name_out") or ""
    return Writes(d_out, out_hook, skip="W_skip" in tensors or "skip" in str(cfg["architecture"]))


def load_skip(sae: SAE, tensors: dict[str, torch.Tensor]) -> None:
    """A skip transcoder's ``W_skip`` from the file's tensors."""
    if sae.W_skip is not None:
        with torch.no_grad():
            sae.W_skip.copy_(check_tensor(tensors, "W_skip", (sae.d_out, sae.d_in)).float())


def load_sae(folder: str | Path, device: str | torch.device = "cpu") -> SAE:
    """Load an SAE folder written by e2edict or by SAELens (architectures e2edict knows)."""
    folder = Path(folder)
    cfg_path, w_path = folder / CFG_FILE, folder / WEIGHTS_FILE
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise E2EDictError(f"SAE folder {str(folder)!r} has no {p.name}")
    try:
        cfg = json.loads(cfg_path.read_text())
        if not isinstance(cfg, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise E2EDictError(f"{str(cfg_path)!r} is not valid JSON ({e})") from None
    try:
        tensors = load_file(str(w_path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise E2EDictError(f"{str(w_path)!r} is not a readable safetensors file ({e})") from None
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    arch = meta.get("e2edict_architecture") or _SAELENS_TO_E2EDICT.get(str(cfg.get("architecture")))
    if arch not in registry:
        raise E2EDictError(f"{str(cfg_path)!r}: SAE architecture {cfg.get('architecture')!r} is not supported")
    for key in ("d_in", "d_sae"):
        if isinstance(cfg.get(key), bool) or not isinstance(cfg.get(key), int) or cfg[key] <= 0:
            raise E2EDictError(f"{str(cfg_path)!r}: {key} must be a positive integer, got {cfg.get(key)!r}")
    if cfg.get("normalize_activations", "none") != "none":
        raise E2EDictError(f"{str(cfg_path)!r}: normalize_activations={cfg['normalize_activations']!r} is not supported")
    # the sizes must match the file before anything of that size is allocated
    check_tensor(tensors, "W_dec", (cfg["d_sae"], _file_d_out(cfg) or cfg["d_in"]))
    sae = registry[arch].from_saelens(tensors, cfg)
    sae.hook_name = meta.get("hook_name") or cfg.get("hook_name") or ""
    sae.source_lambda = _trained_lambda(cfg, meta)
    return sae.to(device)


def _trained_lambda(cfg: dict[str, Any], meta: dict[str, Any]) -> float | None:
    """The sparsity coefficient a file's SAE was trained with, where its cfg.json says so
    (e2edict's metadata, or an ``l1_coefficient`` key): what ``loss.preset: finetune`` keeps."""
    coeffs = meta.get("e2edict_coefficients")
    value = coeffs.get("sparsity") if isinstance(coeffs, dict) else meta.get("l1_coefficient", cfg.get("l1_coefficient"))
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        return None
    return float(value)
