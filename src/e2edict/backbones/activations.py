"""GPT-2's tanh GELU as one kernel while a backbone runs.

Both TransformerLens (``gelu_new``) and transformers (``NewGELUActivation``) compute GPT-2's GELU
as the Python formula ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``: eight elementwise
passes over [tokens, d_mlp] and, in the spliced run, eight saved tensors and backward nodes per
block. ``F.gelu(x, approximate="tanh")`` is the same function in one kernel (equal to 2.4e-7 in
fp32 on the embedded model's activations; each backbone checks it on a probe before using it).
On the embedded model's CPU step the formula's forwards and backward were ~7% of the step.

The swap lasts only while the backbone runs (`swapped`): the model object a user holds computes
as its library wrote it outside e2edict's own passes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F


def tanh_gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def same_function(fn: Callable[[torch.Tensor], torch.Tensor]) -> bool:
    """Whether ``fn`` computes `tanh_gelu` (to fp32 rounding) on a probe spanning GELU's range."""
    x = torch.linspace(-8.0, 8.0, 4097)
    with torch.no_grad():
        return bool(torch.allclose(fn(x), tanh_gelu(x), atol=1e-6, rtol=1e-5))


def checked(targets: list[tuple[object, str]]) -> list[tuple[object, str]]:
    """``targets`` (``(object, attribute)`` pairs holding the formula) where the first computes
    `tanh_gelu` (`same_function`), else none: what the backbone's passes may swap (`swapped`)."""
    return targets if targets and same_function(getattr(*targets[0])) else []


@contextlib.contextmanager
def swapped(targets: list[tuple[object, str]]) -> Iterator[None]:
    """Each ``(object, attribute)`` set to `tanh_gelu` on the instance for the duration, then
    what it was (an instance attribute restored, one that shadowed the class's removed).

    Nothing is swapped inside a region torch.compile traces: the compiler fuses the formula's
    elementwise ops into one kernel itself, and it cannot replay a module's ``forward`` being
    set and removed again."""
    if torch.compiler.is_compiling():
        yield
        return
    saved = [(obj, name, obj.__dict__.get(name, _ABSENT)) for obj, name in targets]
    for obj, name, _ in saved:
        setattr(obj, name, tanh_gelu)
    try:
        yield
    finally:
        for obj, name, old in saved:
            if old is _ABSENT:
                delattr(obj, name)
            else:
                setattr(obj, name, old)


_ABSENT = object()
