"""What every adapter is: low-rank updates of a frozen model's weights, switched off for the clean run.

An adapter (Chen, Engels & Tegmark 2025) changes the model on the spliced side only: the objective
is KL(p_clean ‖ p_spliced+adapted), with the clean run on the original weights. So an adapter is
attached to the backbone (`Backbone.adapter`), on by default, and `disabled()` gives back the
original model for the clean run and for the "SAEs without adapter" evaluation. The frozen base
weights are never written: a fingerprint taken when the adapter is attached is checked at the end.
"""

from __future__ import annotations

import contextlib
import hashlib
from abc import ABC, abstractmethod
from pathlib import Path

import torch

from e2edict.atomic import write_folder_atomic
from e2edict.errors import E2EDictError

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"  # peft's file names


class Adapter(ABC):
    """LoRA updates ``W + (alpha / rank) B A`` on chosen weights of chosen blocks of a backbone."""

    kind = "lora"

    def __init__(self, rank: int, alpha: float, blocks: list[int], targets: list[str], base: list[torch.nn.Parameter]):
        self.rank, self.alpha = rank, float(alpha)
        self.blocks = sorted(blocks)
        self.targets = targets  # the adapted weights (TransformerLens) or modules (Hugging Face), by name
        self.enabled = True
        self._base = base
        self._fingerprint = fingerprint(base)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def first_block(self) -> int:
        """The earliest adapted block: the clean and spliced runs share the blocks before it."""
        return self.blocks[0]

    # --- parameters, for the optimizer and the checkpoint ------------------------------------
    @abstractmethod
    def named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The trainable tensors by stable name (A before B for each target)."""

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for _, p in self.named_parameters()]

    def state_dict(self, keep_vars: bool = False) -> dict[str, torch.Tensor]:
        """The adapter's tensors as a checkpoint stores them (`e2edict.checkpoint`)."""
        return {n: (p if keep_vars else p.detach()) for n, p in self.named_parameters()}

    def load_tensors(self, tensors: dict[str, torch.Tensor], what: str) -> None:
        """Copy ``tensors`` into the adapter; every name and shape must match."""
        with torch.no_grad():
            for name, p in self.named_parameters():
                t = tensors.get(name)
                if t is None or t.shape != p.shape:
                    raise E2EDictError(f"{what}: adapter tensor {name!r} is missing or misshapen")
                p.copy_(t)

    # --- on and off ---------------------------------------------------------------------------
    @abstractmethod
    def _switch(self, on: bool) -> None:
        """Turn the low-rank updates on or off in the model."""

    @contextlib.contextmanager
    def disabled(self):
        """The original model inside (the clean run); whatever state it was in after."""
        before = self.enabled
        self._switch(False)
        self.enabled = False
        try:
            yield
        finally:
            self._switch(before)
            self.enabled = before

    _training = False

    def train(self, mode: bool = True) -> None:
        """Training behaviour (dropout on) or inference behaviour (off)."""
        self._training = mode
        self._set_dropout(mode)

    def _set_dropout(self, on: bool) -> None:  # noqa: B027 (adapters without dropout have nothing to switch)
        """Adapters with dropout switch it here."""

    @contextlib.contextmanager
    def evaluating(self):
        """Inference behaviour inside (no dropout), the behaviour it had restored after."""
        self._set_dropout(False)
        try:
            yield
        finally:
            self._set_dropout(self._training)

    # --- files and checks ---------------------------------------------------------------------
    def save(self, folder: Path, base_model: str) -> None:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``folder`` (whole or
        not at all: `e2edict.atomic.write_folder_atomic`); ``base_model`` names the model."""
        write_folder_atomic(folder, lambda tmp: self._write(tmp, base_model))

    @abstractmethod
    def _write(self, folder: Path, base_model: str) -> None:
        """The adapter's two files, into an existing empty ``folder``."""

    def watch_frozen(self, params: list[torch.nn.Parameter]) -> None:
        """Check these frozen weights from now on (a sharded model's: each rank its own shards)."""
        self._base, self._fingerprint = params, fingerprint(params)

    def check_base_unchanged(self) -> None:
        """Raise when any frozen base weight differs, bit for bit, from when the adapter was attached."""
        if fingerprint(self._base) != self._fingerprint:
            raise E2EDictError("the model's frozen weights changed during training (they must never be written)")

    def describe(self) -> dict:
        """What eval.json records of the adapter."""
        n = sum(p.numel() for p in self.parameters())
        return {"kind": self.kind, "rank": self.rank, "alpha": self.alpha, "blocks": self.blocks,
                "targets": len(self.targets), "parameters": n}  # fmt: skip


def fingerprint(params: list[torch.nn.Parameter]) -> str:
    """A digest of the exact bytes of ``params`` (in their current dtype)."""
    h = hashlib.blake2b(digest_size=16)
    for p in params:
        t = p.detach()
        # a sharded weight: this rank's shard; a copy, as numpy's view would pin the weight's storage
        t = (t.to_local() if hasattr(t, "to_local") else t).to("cpu", copy=True).contiguous()
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def resolve_blocks(layers, n_layers: int, first_sae: str, backbone) -> list[int]:
    """The blocks ``adapter.layers`` names: ``after`` (every block wholly after the first SAE),
    ``all``, or a list; a one-line error for an index out of range or an empty choice."""
    if layers == "all":
        return list(range(n_layers))
    if layers == "after":
        block = backbone.block_of(first_sae)
        start = block if backbone.is_block_input(first_sae) else block + 1
        if start >= n_layers:
            raise E2EDictError(
                f"adapter.layers: after: no block of model {backbone.name!r} lies after the first SAE ({first_sae!r})"
            )
        return list(range(start, n_layers))
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad:
        raise E2EDictError(
            f"adapter.layers: block {bad[0]} is out of range for model {backbone.name!r} (blocks 0-{n_layers - 1})"
        )
    return sorted(layers)


def check_rank(rank: int, name: str, d_in: int, d_out: int) -> None:
    if rank > min(d_in, d_out):
        raise E2EDictError(
            f"adapter.rank={rank} exceeds the width of {name} ({d_in} -> {d_out}): a rank is at most {min(d_in, d_out)}"
        )
