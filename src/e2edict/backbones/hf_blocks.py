"""A Hugging Face model's blocks called one after the other, outside the model's own forward.

With hooks on the residual stream alone (block inputs and outputs, the paper's positions) a run
needs nothing of the model's forward but the arguments it gives each block after the hidden
states: masks, position ids, rotary embeddings. Those depend on the sequence length, dtype and
device alone (e2edict passes no mask and no position ids), so `BlockCalls` records them once by
one forward of batch 1 without a graph and then calls the blocks itself. No hook is registered,
no exception ends a run, and the model's mask building is not entered: a compiler sees one
straight function (`HFBackbone._run_plain`; whether it equals the model's forward is checked on
load, `HFBackbone._check_plain`).

Every forward of the model that e2edict itself runs goes through `passes`: GPT-2's GELU as one
kernel (`e2edict.backbones.activations`), and transformers' packed-sequence check answered
without a read-back. That check (`masking_utils.find_packed_sequence_indices`) reads a value to
the host on every forward to learn whether the position ids pack several sequences into a row.
e2edict never passes position ids, so the model's own are one ``arange`` per row and the answer
is "not packed".
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from e2edict.backbones.activations import swapped
from e2edict.backbones.in_turn import HookFn, blocks_in_turn

Call = tuple[tuple, dict]  # a block's positional arguments after the hidden states, and its keywords
MAX_LENGTHS = 4  # recordings kept: a few sequence lengths at most (training's, evaluation's)


def _not_packed(position_ids: torch.Tensor) -> None:
    """transformers' packed-sequence answer for position ids that are one ``arange`` per row."""
    return None


@contextlib.contextmanager
def unpacked() -> Iterator[None]:
    """transformers' packed-sequence check answered without reading the device (see the module
    docstring); the library's own function again afterwards."""
    from transformers import masking_utils

    found = getattr(masking_utils, "find_packed_sequence_indices", None)
    if found is None:  # a transformers without the check
        yield
        return
    masking_utils.find_packed_sequence_indices = _not_packed
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = found


@contextlib.contextmanager
def passes(gelus: list) -> Iterator[None]:
    """What every forward of the model that e2edict runs runs under: GPT-2's GELU as one kernel,
    no packing read-back."""
    with swapped(gelus), unpacked():
        yield


def first_tensor(x):
    """A module's output tensor: the first element where it returns a tuple."""
    return x[0] if isinstance(x, (tuple, list)) and x and isinstance(x[0], torch.Tensor) else x


class BlockCalls:
    """The model's blocks called in turn with the arguments its forward gives them."""

    def __init__(self, model: nn.Module, blocks: nn.ModuleList, embed_dim: int, gelus: list):
        self.model, self.blocks, self.embed_dim, self.gelus = model, blocks, embed_dim, gelus
        self._recorded: dict[tuple, list[Call]] = {}  # by (sequence length, dtype, device)

    def lengths(self) -> set[int]:
        """The sequence lengths recorded (kept: the newest `MAX_LENGTHS`)."""
        return {key[0] for key in self._recorded}

    def clear(self) -> None:
        self._recorded.clear()

    def arguments(self, resid: torch.Tensor) -> list[Call]:
        """Each block's arguments for sequences of ``resid``'s length, dtype and device; recorded
        by one forward of batch 1 the first time (do it outside a compiled region: the
        backbone's `embed_to` does), then reused for any batch."""
        key = (resid.shape[1], resid.dtype, resid.device)
        calls = self._recorded.get(key)
        if calls is not None:
            return calls
        got: dict[int, Call] = {}

        def record(i):
            def fn(module, args, kwargs):
                rest = args[1:] if args else ()
                got[i] = (rest, {k: v for k, v in kwargs.items() if not (k == "hidden_states" and not args)})

            return fn

        handles = [b.register_forward_pre_hook(record(i), with_kwargs=True) for i, b in enumerate(self.blocks)]
        embeds = torch.zeros((1, resid.shape[1], self.embed_dim), dtype=resid.dtype, device=resid.device)
        try:
            with torch.no_grad(), passes(self.gelus):
                self.model(inputs_embeds=embeds, use_cache=False)
        finally:
            for h in handles:
                h.remove()
        if len(self._recorded) >= MAX_LENGTHS:
            self._recorded.pop(next(iter(self._recorded)))
        self._recorded[key] = calls = [got[i] for i in range(len(self.blocks))]
        return calls

    def run(
        self,
        resid: torch.Tensor,
        first: int,
        pre: dict[int, HookFn],
        post: dict[int, HookFn],
        stop_early: bool,
        inside: Iterable[int] = (),
        recompute=None,
    ) -> torch.Tensor | None:
        """Blocks ``first..`` in turn, ``pre[i]`` before block i and ``post[i]`` after it: the
        last block's output, or None where ``stop_early`` ends the run after the last hook (or
        after block i for each i in ``inside``, the blocks with kept hooks within them)."""
        calls = self.arguments(resid)

        def call(i: int, x: torch.Tensor) -> torch.Tensor:
            args, kwargs = calls[i]
            return first_tensor(self.blocks[i](x, *args, **kwargs))

        with swapped(self.gelus):
            return blocks_in_turn(resid, first, len(self.blocks), call, pre, post, stop_early, inside, recompute)
