"""SAEs saved by EleutherAI's sparsify (``eai-sparsify``), read through its own loader.

A sparsify folder per hook point holds ``cfg.json`` (``d_in``, ``k``, ``num_latents`` or
``expansion_factor``, ``activation``, ``transcode``, ``skip_connection``) and ``sae.safetensors``
(``encoder.weight [d_sae, d_in]``, ``encoder.bias``, ``W_dec [d_sae, d_in]``, ``b_dec``, and
``W_skip [d_in, d_in]`` with a skip connection). sparsify's SAE subtracts ``b_dec`` before
encoding (a transcoder does not), keeps ReLU then the top k, and decodes with the rows as saved,
which need not have unit norm: as e2edict's `TopKSAE` that is ``apply_b_dec_to_input`` and a
fixed ``decoder_scale`` (`e2edict.saes.relu.ReLUSAE.from_saelens`), the same latents exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

from e2edict.errors import E2EDictError
from e2edict.saes.base import SAE
from e2edict.saes.topk import TopKSAE

SPARSIFY_CFG, SPARSIFY_WEIGHTS = "cfg.json", "sae.safetensors"


def is_sparsify_folder(folder: str | Path) -> bool:
    folder = Path(folder)
    return (folder / SPARSIFY_CFG).is_file() and (folder / SPARSIFY_WEIGHTS).is_file()


def load_sparsify(folder: str | Path, hook_name: str = "", hook_name_out: str | None = None) -> SAE:
    """The sparsify SAE or transcoder in ``folder`` as an e2edict `TopKSAE` (``hook_name``: the
    backbone's name for where it reads; a transcoder's ``hook_name_out``: where it writes)."""
    folder = Path(folder)
    if not is_sparsify_folder(folder):
        raise E2EDictError(f"{str(folder)!r} is not a sparsify SAE folder (it needs {SPARSIFY_CFG} and {SPARSIFY_WEIGHTS})")
    try:
        cfg = json.loads((folder / SPARSIFY_CFG).read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise E2EDictError(f"{str(folder / SPARSIFY_CFG)!r} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise E2EDictError(f"{str(folder / SPARSIFY_CFG)!r} is not a JSON object")
    if cfg.get("activation", "topk") != "topk":
        raise E2EDictError(f"{str(folder)!r}: sparsify activation {cfg.get('activation')!r} is not supported (topk is)")
    coder = _sparsify_coder(folder)
    transcoder = bool(coder.cfg.transcode)
    d_in, d_sae = coder.d_in, coder.num_latents
    tensors = {
        "W_enc": coder.encoder.weight.detach().T,
        "b_enc": coder.encoder.bias.detach(),
        "W_dec": coder.W_dec.detach(),
        "b_dec": coder.b_dec.detach(),
    }
    skip = coder.W_skip is not None
    if skip:
        tensors["W_skip"] = coder.W_skip.detach()
    saelens_cfg = {
        "d_in": d_in,
        "d_sae": d_sae,
        "k": int(coder.cfg.k),
        "apply_b_dec_to_input": not transcoder,
        "architecture": ("topk_skip_transcoder" if skip else "topk_transcoder") if transcoder else "topk",
        **({"d_out": d_in, "hook_name_out": hook_name_out or ""} if transcoder else {}),
    }
    if skip and not transcoder:
        raise E2EDictError(f"{str(folder)!r}: a sparsify SAE (not a transcoder) with a skip connection is not supported")
    sae = TopKSAE.from_saelens(tensors, saelens_cfg)
    sae.hook_name = hook_name
    return sae


def _sparsify_coder(folder: Path):
    try:
        from sparsify import SparseCoder
    except ImportError:
        raise E2EDictError(
            f"{str(folder)!r} is a sparsify folder; reading it needs EleutherAI's sparsify: pip install eai-sparsify"
        ) from None
    try:
        return SparseCoder.load_from_disk(folder, device="cpu")
    except Exception as e:  # sparsify's own errors (missing keys, shapes) become one line
        raise E2EDictError(f"sparsify could not load {str(folder)!r}: {type(e).__name__}: {e}") from None
