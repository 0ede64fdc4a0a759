"""Numeric precision, decided in one place: the dtypes a config may name, what counts as full
precision, autocast kept off where a result must stay fp32, and a run's precision settings.

``train.precision: bf16`` holds the frozen model's weights in bf16 (cast once, not per operation,
and restored bit for bit for the final evaluation); nothing runs under autocast: the model
computes in its own dtype, the SAEs in their input's (`e2edict.saes.base.affine`), and their
weights, optimizer state and losses stay fp32, as does the fused head's KL (`e2edict.backbones.head`).
On CUDA ``train.tf32`` sets TF32 matmuls; on CPU ``train.reuse_cpu_memory`` keeps freed memory
(`keep_freed_memory`).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util

import torch

DTYPES = {"float32": torch.float32, "float64": torch.float64}  # model.dtype's values


def is_full(dtype: torch.dtype) -> bool:
    """Whether ``dtype`` is full precision (fp32 or fp64): no fp32 upcast is needed around it."""
    return dtype in (torch.float32, torch.float64)


def no_autocast(device: torch.device):
    """A context with autocast off on ``device`` where it is on (a no-op elsewhere, e.g. on meta)."""
    if device.type in ("cuda", "cpu") and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def apply_run_precision(train_cfg, backbone, device: str, cast: bool = True) -> None:
    """A training run's precision settings (the ``train`` block): the frozen model held in bf16
    under ``precision: bf16`` (`Backbone.cast`; `end_run_precision` undoes it; not ``cast``: it
    was cast already, a sharded model before its split), TF32 on CUDA, freed memory kept on CPU."""
    device_type = torch.device(device).type
    if train_cfg.precision == "bf16" and cast:
        backbone.cast(torch.bfloat16)
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = train_cfg.tf32
        torch.backends.cudnn.allow_tf32 = train_cfg.tf32
    if device_type == "cpu" and train_cfg.reuse_cpu_memory:
        keep_freed_memory()


def end_run_precision(backbone) -> None:
    """The model as configured again (its original weights, bit for bit) for the final evaluation."""
    backbone.restore_dtype()


def hold_weights(backbone, dtype: torch.dtype, keep_original: bool = True) -> None:
    """Hold a backbone's frozen floating-point weights in ``dtype`` (once, not per operation);
    `restore_weights` brings back the exact original weights, kept on the CPU at the first call
    (unless not ``keep_original``: then the cast is for good). Trainable parameters (an adapter's)
    keep their fp32 master weights."""
    model = backbone.model
    if keep_original and getattr(backbone, "_original", None) is None:
        # by identity, not by name: an adapter attached later renames the weights it wraps
        frozen = [p for p in model.parameters() if not p.requires_grad]
        backbone._original = (
            next(model.parameters()).dtype,
            [(p, p.detach().to("cpu", copy=True)) for p in frozen],
            {k: b.detach().to("cpu", copy=True) for k, b in model.named_buffers()},
        )
    _frozen_to(backbone, dtype)


def restore_weights(backbone) -> bool:
    """Undo `hold_weights`: the original dtype and weights, bit for bit; False where nothing was held."""
    original = getattr(backbone, "_original", None)
    if original is None:
        return False
    dtype, params, buffers = original
    _frozen_to(backbone, dtype)
    with torch.no_grad():
        for p, saved in params:
            p.copy_(saved)
        for k, b in backbone.model.named_buffers():
            if k in buffers:
                b.copy_(buffers[k])
    backbone._original = None
    return True


def _frozen_to(backbone, dtype: torch.dtype) -> None:
    """The frozen weights to ``dtype`` (`Backbone._move_to`); trainable parameters stay as they are."""
    keep = [(p, p.data) for p in backbone.model.parameters() if p.requires_grad]
    backbone._move_to(dtype)
    for p, data in keep:
        p.data = data


def keep_freed_memory() -> bool:
    """Have glibc's malloc serve large allocations from the heap and keep what is freed.

    By default every allocation above 32 MB (an SAE's gradient: 141 MB for GPT-2 small at
    dictionary ratio 60) is a fresh mapping that the kernel zero-fills page by page on first touch
    and unmaps when it is freed, every step; on CPU a large share of a local step (`docs/performance.md`). This is the
    effect PyTorch's CPU tuning guide gets by swapping in jemalloc or tcmalloc, applied in process
    (process-wide: the resident set stays at its peak). Returns False, changing nothing, where
    the C library is not glibc (macOS, musl)."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    return mallopt(m_mmap_max, 0) == 1 and mallopt(m_trim_threshold, 2**31 - 1) == 1
