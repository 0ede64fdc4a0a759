"""SAEs others trained, as a fine-tune's starting point (``saes.init_from``).

One string names the source:

- ``sae_lens:RELEASE/SAE_ID`` — a release in SAELens's registry (Gemma Scope, the paper's
  ``gpt2-small-res_*-ajt``, ...), fetched by sae_lens's own ``SAE.from_pretrained``; offline
  (``HF_HUB_OFFLINE=1``) it must be in the Hugging Face cache already.
- a folder EleutherAI's sparsify wrote: one folder per hook point (its module path, e.g.
  ``layers.6`` or ``h.2.mlp``) with ``cfg.json`` and ``sae.safetensors``, or one such folder.
- a run directory or an SAE folder in the SAELens layout (e2edict's own, or SAELens's).

Each comes back as ``{hook name as the source names it: SAE}``; mapping the names onto the
backbone's is the caller's (`e2edict.run`), since only the model knows its own names.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from e2edict.errors import E2EDictError
from e2edict.saes.base import SAE
from e2edict.saes.saelens_format import load_sae
from e2edict.saes.sparsify_format import is_sparsify_folder, load_sparsify

SAE_LENS_PREFIX = "sae_lens:"


def load_source(spec: str, what: str = "saes.init_from") -> tuple[dict[str, SAE], str]:
    """``({hook: SAE}, kind)`` for the source ``spec``; ``kind`` is ``sae_lens``, ``sparsify`` or
    ``saelens_layout`` (which `e2edict.run` uses to map hook names). ``what`` names the source in errors."""
    if spec.startswith(SAE_LENS_PREFIX):
        return load_sae_lens_release(spec[len(SAE_LENS_PREFIX) :], what), "sae_lens"
    path = Path(spec).expanduser()
    if is_sparsify_folder(path):
        return {path.name: load_sparsify(path, hook_name=path.name)}, "sparsify"
    if path.is_dir():
        subs = sorted(p for p in path.iterdir() if p.is_dir() and is_sparsify_folder(p))
        if subs:
            return {p.name: load_sparsify(p, hook_name=p.name) for p in subs}, "sparsify"
    from e2edict.rundir import load_saes

    if not path.exists():
        raise E2EDictError(f"{what} {spec!r} does not exist (a run directory, an SAE folder, or sae_lens:RELEASE/ID)")
    try:
        return load_saes(path), "saelens_layout"
    except E2EDictError as e:
        raise E2EDictError(
            f"{what} {spec!r} is neither a run directory, an SAE folder (SAELens layout) nor a sparsify folder ({e})"
        ) from None


def load_sae_lens_release(name: str, what: str = "saes.init_from") -> dict[str, SAE]:
    """``RELEASE/SAE_ID`` through sae_lens's registry and loader, converted by writing it in the
    SAELens layout and reading that back (`e2edict.saes.saelens_format.load_sae`), so e2edict reads exactly
    the file SAELens itself would write."""
    release, sep, sae_id = name.partition("/")
    if not sep or not release or not sae_id:
        raise E2EDictError(f"{what} 'sae_lens:{name}' must be sae_lens:RELEASE/SAE_ID")
    try:
        from sae_lens import SAE as SAELensSAE
    except ImportError:
        raise E2EDictError(f"{what} sae_lens:... needs SAELens: pip install sae-lens") from None
    try:
        loaded = SAELensSAE.from_pretrained(release, sae_id, device="cpu")
    except Exception as e:  # unknown release or id (ValueError), not cached offline (OSError, hub errors)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise E2EDictError(f"sae_lens could not load release {release!r}, SAE {sae_id!r}: {first}") from None
    sae = loaded[0] if isinstance(loaded, tuple) else loaded
    with tempfile.TemporaryDirectory() as tmp:
        sae.save_model(tmp)
        ours = load_sae(tmp).eval()
    hook = ours.hook_name or getattr(getattr(sae.cfg, "metadata", None), "hook_name", None) or sae_id
    ours.hook_name = hook
    return {hook: ours}
