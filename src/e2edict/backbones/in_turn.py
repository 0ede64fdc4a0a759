"""Blocks called one after the other with the hooks applied between them, and the lasting
hooks for positions inside a block: the forward a compiler sees as one straight function
(`blocks_in_turn`, `KeptHooks`), used by both backbones' plain runs."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

HookFn = Callable[[torch.Tensor], torch.Tensor | None]


class StopForward(Exception):
    """Raised by a hook to end a forward pass early (local training runs nothing past the last SAE)."""


def replaced(fn: HookFn, act: torch.Tensor) -> torch.Tensor:
    """What a hook leaves: its replacement, or the activation where it returns None."""
    new = fn(act)
    return act if new is None else new


def blocks_in_turn(
    resid: torch.Tensor,
    first: int,
    n_layers: int,
    call_block: Callable[[int, torch.Tensor], torch.Tensor],
    pre: dict[int, HookFn],
    post: dict[int, HookFn],
    stop_early: bool,
    inside: Iterable[int] = (),
    recompute: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> torch.Tensor | None:
    """Blocks ``first..`` called one after the other (``call_block(i, x)``), each block input's
    hook (``pre[i]``) before it and each output's (``post[i]``) after: the last residual stream,
    or None where ``stop_early`` ends the run after the last hook (or a hook raised
    `StopForward`); ``inside``: blocks with hooks within them (`KeptHooks`), which the run must
    finish. No hook is registered and no exception ends the run, so a compiler sees one straight
    function (the backbones' `_run_plain`).

    With ``recompute`` (activation checkpointing) each block run with a graph keeps only its
    input for backward and is run again there, under the context ``recompute()`` gives (the one
    the forward ran under, so the same kernels give the same values); blocks with hooks inside
    are not, as running them again would run their hooks (an SAE) again."""
    inside = list(inside)
    # positions in forward order: block i's input is 2i, its output 2i + 1
    ends = [*(2 * i for i in pre), *(2 * i + 1 for i in post), *(2 * i + 1 for i in inside)]
    stop = max(ends) if stop_early else None
    try:
        for i in range(first, n_layers):
            if i in pre:
                resid = replaced(pre[i], resid)
            if stop == 2 * i:
                return None
            resid = _call(call_block, i, resid, None if i in inside else recompute)
            if i in post:
                resid = replaced(post[i], resid)
            if stop == 2 * i + 1:
                return None
    except StopForward:
        return None
    return resid


def _call(call_block, i: int, x: torch.Tensor, recompute) -> torch.Tensor:
    if recompute is None or not torch.is_grad_enabled():
        return call_block(i, x)
    contexts = lambda: (contextlib.nullcontext(), recompute())  # noqa: E731  (forward, recomputation)
    return checkpoint(call_block, i, x, use_reentrant=False, context_fn=contexts)


class KeptHooks:
    """Hooks registered once for the positions inside a block, each calling what the current run
    put in its slot (`active`), and doing nothing between runs.

    Blocks called in turn (`blocks_in_turn`) apply block input and output hooks themselves; a hook
    inside a block (an MLP's output, a transcoder's input) has to be a module hook. Registering and
    removing it per run ends a compiled graph there, and `torch.compile` does not see a module hook
    added after it compiled. So each is registered before the first run and stays."""

    def __init__(self, register: Callable[[str, HookFn], Any]):
        self._register = register  # (hook name, fn) -> a handle with .remove()
        self._handles: list[Any] = []  # never read by a traced run (dynamo cannot represent a handle)
        self.names: frozenset[str] = frozenset()
        self.active: dict[str, HookFn] = {}

    def keep(self, names: Iterable[str]) -> None:
        for name in names:
            if name not in self.names:
                self._handles.append(self._register(name, partial(self._fire, name)))
                self.names = self.names | {name}

    def covers(self, name: str) -> bool:
        return name in self.names

    def _fire(self, name: str, act: torch.Tensor) -> torch.Tensor | None:
        fn = self.active.get(name)
        return None if fn is None else fn(act)

    def run(self, hooks: dict[str, HookFn], body: Callable[[], torch.Tensor | None]) -> torch.Tensor | None:
        """``body()`` with ``hooks`` in their slots (empty again afterwards, whatever happens)."""
        self.active = hooks
        try:
            return body()
        finally:
            self.active = {}

    def release(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self.names = [], frozenset()


def chain(first: HookFn, then: HookFn) -> HookFn:
    """One hook: ``first``, then ``then`` on the activation ``first`` left (its replacement, if any)."""

    def both(act: torch.Tensor):
        return replaced(then, replaced(first, act))

    return both
