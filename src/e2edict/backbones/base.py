"""The interface the splice and the trainer need from a model: hook names and widths, run the
shared prefix up to a block, run the rest from there with hooks."""

from __future__ import annotations

import contextlib
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable

import torch

from e2edict.backbones.head import FusedHead
from e2edict.backbones.in_turn import HookFn, KeptHooks, StopForward, chain
from e2edict.backbones.naming import HookNames
from e2edict.errors import E2EDictError
from e2edict.precision import hold_weights, restore_weights

_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.")


class Backbone(FusedHead, ABC):
    """A frozen language model seen through its hook points."""

    name: str
    n_layers: int
    n_ctx: int
    d_vocab: int
    bos_token_id: int  # starts every sequence; separates documents in packed text
    tokenizer: object | None  # a `transformers` tokenizer, or None for models without one

    @abstractmethod
    def hook_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every hook point inside a block whose activation is [batch, pos, d], mapped to (d,)."""

    @abstractmethod
    def embed_to(self, tokens: torch.Tensor, layer: int) -> torch.Tensor:
        """The residual stream entering block ``layer`` (no graph)."""

    @abstractmethod
    def run_from(
        self, resid: torch.Tensor, layer: int, hooks: dict[str, HookFn], logits: bool = True, hidden: bool = False
    ) -> torch.Tensor | None:
        """Run blocks ``layer..`` (and the unembedding when ``logits``) with forward hooks.

        With ``hidden`` (only where `head` is not None) it returns the final hidden states, the
        head's input, instead of the logits. With neither, the run stops after the last hooked
        activation (`stop_after_last`) and returns None. A hook may return a tensor to replace
        the activation, or raise `StopForward`."""

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device  # type: ignore[attr-defined]

    def warm_up(self) -> None:
        """One tiny forward to the first block (a model sharded with FSDP2 settles its root there)."""
        with torch.no_grad():
            self.embed_to(torch.full((1, 1), self.bos_token_id, dtype=torch.long, device=self.device), 1)

    def cast(self, dtype: torch.dtype, keep_original: bool = True) -> None:
        """Hold the frozen weights in ``dtype`` (`e2edict.precision.hold_weights`; without
        ``keep_original`` for good), the fused head built first from the original weights and
        kept (pinned) in their precision."""
        if not self._head_pinned:
            self._head_cache = None
            self.head()
            self._head_pinned = True
        hold_weights(self, dtype, keep_original)

    def restore_dtype(self) -> None:
        """Undo `cast`: the original dtype and the original weights, bit for bit (where they were kept)."""
        if restore_weights(self):
            self._head_cache, self._head_pinned = None, False

    def _move_to(self, dtype: torch.dtype) -> None:
        self.model.to(dtype)  # type: ignore[attr-defined]

    # --- an adapter (`e2edict.adapters`) changes the model on the spliced side only -----------
    adapter = None  # the `e2edict.adapters.Adapter` attached to this model, or None

    def adapted_from(self) -> int | None:
        """The first block an adapter changes (None without one): the shared prefix ends there."""
        return None if self.adapter is None else self.adapter.first_block

    def original(self):
        """A context in which the model runs without its adapter (the clean run); a no-op without one."""
        return contextlib.nullcontext() if self.adapter is None else self.adapter.disabled()

    def is_block_input(self, hook_name: str) -> bool:
        """Whether ``hook_name`` is its block's input (the residual stream entering it)."""
        return hook_name.endswith(".hook_resid_pre")

    @abstractmethod
    def unembed(self) -> torch.Tensor:
        """The unembedding matrix [d_model, d_vocab] (for the logit effect of a direction)."""

    def stop_after_last(self, hooks: dict[str, HookFn]) -> dict[str, HookFn]:
        """``hooks`` with the one latest in the forward pass ending the run after it has run."""
        if not hooks:
            return hooks
        last = self.last_position(list(hooks))
        fn = hooks[last]

        def then_stop(act: torch.Tensor):
            fn(act)
            raise StopForward

        return {**hooks, last: then_stop}

    def block_of(self, hook_name: str) -> int:
        """The block whose input the shared prefix stops at for this hook."""
        m = _BLOCK_RE.match(hook_name)
        if not m:
            raise E2EDictError(f"hook {hook_name!r} is not inside a transformer block")
        return int(m.group(1))

    def next_block_input(self, hook_name: str) -> str | None:
        """The next block's input hook where ``hook_name`` is a block's output that is the same
        tensor (every block but the last, where the backbone knows it); else None."""
        return None

    def start_block(self, hook_name: str) -> int:
        """The first block a run must execute for this hook to fire: the shared prefix runs the blocks
        before it once. A block's output hook fires at the next block's input (`at_block_inputs`),
        so neither the clean nor the spliced run repeats the block that computed it."""
        return self.block_of(self.next_block_input(hook_name) or hook_name)

    def at_block_inputs(self, hooks: dict[str, HookFn]) -> dict[str, HookFn]:
        """``hooks`` with each block output's hook at the next block's input (`next_block_input`),
        so a run may start there; where that input has a hook too, the output's runs first."""
        if not any(self.next_block_input(h) for h in hooks):
            return hooks
        moved: dict[str, HookFn] = {}
        for name, fn in hooks.items():
            at = self.next_block_input(name) or name
            if at not in moved:
                moved[at] = fn
            elif name == at:  # the input's own hook, after the moved output's
                moved[at] = chain(moved[at], fn)
            else:
                moved[at] = chain(fn, moved[at])
        return moved

    _kept: KeptHooks | None = None  # the backbones that call their blocks in turn set one
    plain = True  # whether the blocks may be called in turn (the Hugging Face backbone probes it on load)
    checkpoint_blocks = False  # train.activation_checkpointing: blocks called in turn recompute in backward

    def runs_blocks_in_turn(self) -> bool:
        """Whether training's runs call the blocks in turn (`blocks_in_turn`), as checkpointing needs:
        without the fused head (`head_ok`) the KL runs the model's own forward (`HFBackbone.run_from`)."""
        return self._kept is not None and self.plain and self.head_ok

    def _recompute_context(self):
        """The context blocks run under (activation kernels, cached weights), entered again to recompute one."""
        return contextlib.nullcontext()

    def _boundary(self, hook_name: str) -> tuple[int, bool] | None:
        """``(block, is input)`` for a block's input or output hook (`blocks_in_turn` applies those), else None."""
        return None

    def keep_hooks(self, names: Iterable[str]) -> None:
        """Register a lasting hook (`KeptHooks`) at each of ``names`` that sits inside a block (an
        MLP's output, a transcoder's input), for runs that call the blocks in turn: what the
        training step does before it first runs, so its compiled graph holds those hooks. A
        backbone without such runs keeps none, and its hooks are registered per run."""
        if self._kept is not None:
            self._kept.keep(n for n in names if self._boundary(n) is None and _inside_block(self, n))

    def release_hooks(self) -> None:
        """Remove the hooks `keep_hooks` registered: the model without any hook of e2edict's."""
        if self._kept is not None:
            self._kept.release()

    def _plain_hooks(self, hooks: dict[str, HookFn]) -> bool:
        """Whether the blocks called in turn can run ``hooks``: block inputs and outputs, and kept hooks."""
        return bool(hooks) and all(self._boundary(h) is not None or self._kept.covers(h) for h in hooks)

    def _in_turn(self, hooks: dict[str, HookFn], run: Callable[..., torch.Tensor | None]) -> torch.Tensor | None:
        """``run(pre, post, inside, recompute)`` (`blocks_in_turn`'s arguments) for ``hooks``: the
        block input and output hooks by block, the others in their kept slots while it runs; the
        recomputation context where blocks are checkpointed (`checkpoint_blocks`)."""
        pre: dict[int, HookFn] = {}
        post: dict[int, HookFn] = {}
        inner: dict[str, HookFn] = {}
        for name, fn in hooks.items():
            at = self._boundary(name)
            if at is None:
                inner[name] = fn
            else:
                (pre if at[1] else post)[at[0]] = fn
        inside = [self.block_of(n) for n in inner]
        recompute = self._recompute_context if self.checkpoint_blocks else None
        return self._kept.run(inner, lambda: run(pre, post, inside, recompute))

    def block_order(self, hook_name: str) -> int:
        """Position of a hook in the order of the forward pass."""
        return list(self.hook_shapes()).index(hook_name)

    def last_position(self, hooks: list[str]) -> str:
        """The hook latest in the forward pass (a loop, not ``max(key=)``, which breaks a compiled graph)."""
        order = self.block_order
        best = hooks[0]
        for h in hooks[1:]:
            if order(h) > order(best):
                best = h
        return best

    def check_hooks(self, names: list[str], what: str = "saes.positions") -> None:
        """Raise a one-line error naming every unknown hook and listing the valid ones."""
        shapes = self.hook_shapes()
        bad = [n for n in names if n not in shapes]
        if bad:
            raise E2EDictError(
                f"{what}: unknown hook name(s) {', '.join(map(repr, bad))} for model {self.name!r}; valid: {', '.join(shapes)}"
            )

    naming: HookNames = HookNames("transformer_lens")  # TransformerLens names here; a module-path backbone sets its own

    def adopt_saes(self, saes: dict) -> dict:
        """``saes`` keyed by this backbone's hook names (`HookNames.adopt`)."""
        return self.naming.adopt(saes, self.hook_shapes(), self.name)

    def check_saes(self, saes: dict) -> None:
        """SAEs loaded from files must sit at hooks of this model, with matching widths."""
        self.check_hooks(list(saes), "SAE hook")
        shapes = self.hook_shapes()
        for h, sae in saes.items():
            if sae.d_in != shapes[h][0]:
                raise E2EDictError(f"SAE at {h!r} has d_in={sae.d_in} but model {self.name!r} has width {shapes[h][0]} there")
            out = getattr(sae, "hook_name_out", None)
            if out is not None:
                self.check_pair(h, out, f"transcoder at {h!r}")
                if sae.d_out != shapes[out][0]:
                    raise E2EDictError(f"transcoder at {h!r} writes d_out={sae.d_out} but {out!r} has width {shapes[out][0]}")

    def check_pair(self, src: str, dst: str, what: str) -> None:
        """A transcoder's hooks: both known, the output after the input."""
        self.check_hooks([src, dst], what)
        if self.block_order(dst) <= self.block_order(src):
            raise E2EDictError(f"{what}: the output hook {dst!r} does not come after its input {src!r}")

    def mlp_pairs(self) -> dict[str, tuple[str, str]]:
        """Each MLP's short name mapped to its (input hook, output hook): what a transcoder replaces."""
        shapes = self.hook_shapes()
        pairs = {}
        for layer in range(self.n_layers):
            pair = (f"blocks.{layer}.ln2.hook_normalized", f"blocks.{layer}.hook_mlp_out")
            if all(h in shapes for h in pair):
                pairs[f"blocks.{layer}.mlp"] = pair
        return pairs

    def resid_hooks_after(self, hook_name: str) -> list[str]:
        """The residual-stream hooks strictly after ``hook_name``: every later ``hook_resid_pre``
        and the final ``hook_resid_post`` (which the reference code leaves out)."""
        layer = self.block_of(hook_name)
        first = layer + 2 if hook_name.endswith("hook_resid_post") else layer + 1
        hooks = [f"blocks.{j}.hook_resid_pre" for j in range(first, self.n_layers)]
        final = f"blocks.{self.n_layers - 1}.hook_resid_post"
        if final != hook_name:
            hooks.append(final)
        return hooks


def _inside_block(backbone: Backbone, hook_name: str) -> bool:
    try:
        backbone.block_of(hook_name)
    except E2EDictError:
        return False
    return True
