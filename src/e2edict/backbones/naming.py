"""The two namings of a model's hooks, in one table: TransformerLens's (``blocks.N.hook_resid_pre``)
and module paths (``transformer.h.N:input``, the Hugging Face backbone's).

Only the positions both backends expose at the same place map: the residual stream entering a
block, leaving it, and an MLP's output. Each backbone holds one `HookNames`; it answers, for a
name written in the other naming, this backbone's own name (None where there is no unambiguous
one), so SAEs trained on either backend load on the other.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from e2edict.errors import E2EDictError

INPUT_SUFFIX = ":input"  # a module path's first input (`e2edict.backbones.huggingface`)
# TransformerLens hook -> the module-path tail after ``<blocks>.N``
TABLE = {"hook_resid_pre": INPUT_SUFFIX, "hook_resid_post": "", "hook_mlp_out": ".mlp"}
_TL_OF_TAIL = {tail: hook for hook, tail in TABLE.items()}
_TL = re.compile(rf"^blocks\.(\d+)\.({'|'.join(TABLE)})$")
_MODULE = re.compile(r"^(?:[A-Za-z_]\w*\.)+(\d+)(:input|\.mlp|)$")  # transformer.h.2:input, model.layers.3.mlp


class HookNames:
    """One backbone's naming: ``native`` is ``"transformer_lens"`` or ``"module"``. A module-path
    backbone gives its block list's path and ``mlp_of(block path)``, its MLP module's path under a
    block (None where it has no single one)."""

    def __init__(self, native: str, blocks_path: str | None = None, mlp_of: Callable[[str], str | None] | None = None):
        self.native, self.blocks_path, self.mlp_of = native, blocks_path, mlp_of

    def own(self, name: str) -> str | None:
        """This backbone's name for ``name`` written in the other naming; None if it has none."""
        if self.native == "transformer_lens":
            m = _MODULE.match(name)
            if m is None:
                return None
            return f"blocks.{m.group(1)}.{_TL_OF_TAIL[m.group(2)]}"
        m = _TL.match(name)
        if m is None or self.blocks_path is None:
            return None
        block = f"{self.blocks_path}.{m.group(1)}"
        if m.group(2) != "hook_mlp_out":
            return block + TABLE[m.group(2)]
        return self.mlp_of(block) if self.mlp_of is not None else None

    def adopt(self, saes: dict, shapes: dict, model_name: str) -> dict:
        """``saes`` keyed by this backbone's hook names (``shapes``' keys): names of the other
        naming mapped where the mapping is unambiguous, a one-line error naming both otherwise."""
        out = {}
        for name, sae in saes.items():
            if name in shapes:
                out[name] = sae
                continue
            mapped = self.own(name)
            if mapped is None or mapped not in shapes:
                raise E2EDictError(
                    f"SAE hook {name!r} is not a hook of model {model_name!r} and has no unambiguous counterpart "
                    "(residual stream and MLP output hooks map between TransformerLens and Hugging Face names)"
                )
            if getattr(sae, "hook_name_out", None) is not None:
                raise E2EDictError(f"transcoder at {name!r}: its hooks are in the other backend's naming; they are not mapped")
            out[mapped] = sae
        return out
