"""Command-line overrides of a config (``dotted.key=value``, values read as YAML) and the run name
they give (`run_name_for`), so runs that differ do not share a folder."""

from __future__ import annotations

import hashlib
import re
from typing import Any

import yaml

from e2edict.errors import E2EDictError


def parse_value(text: str) -> Any:
    """A command-line value, read as YAML (so ``3``, ``1e-3``, ``true``, ``[a, b]``, ``null`` work)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``dotted.key=value`` overrides to a raw config mapping."""
    for item in overrides:
        if "=" not in item:
            raise E2EDictError(f"override {item!r} is not of the form dotted.key=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise E2EDictError(f"override {item!r} has an empty key part")
        node = raw
        for p in parts[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise E2EDictError(f"override {item!r}: {p!r} is not a mapping")
            node = nxt
        node[parts[-1]] = parse_value(value)
    return raw


# Overrides that leave what a run computes as it is: they do not rename it (`run_name_for`).
_NEUTRAL_KEYS = ("name", "model.device", "train.compile", "train.compile_mode", "train.log_every",
                 "train.checkpoint_every_tokens", "train.keep_checkpoints", "train.reuse_cpu_memory",
                 "eval.batch_size")  # fmt: skip


def run_name_for(name: str, overrides: list[str]) -> str:
    """The run's name under ``overrides``: the config's, followed by each override that changes
    what the run computes (``tiny-e2e+architecture-matryoshka_batchtopk+k-32``), so runs that
    differ do not share ``out/runs/<name>``; unchanged when an override sets ``name``. Kept to the
    characters and the 128 of a valid name (a hash of the rest past that)."""
    parts = []
    for item in overrides:
        key, _, value = item.partition("=")
        key = key.strip()
        if key == "name":
            return name
        if key in _NEUTRAL_KEYS or key.startswith("wandb."):
            continue
        parts.append(re.sub(r"[^A-Za-z0-9._-]+", "_", f"{key.rsplit('.', 1)[-1]}-{value.strip()}").strip("_") or "x")
    out = "+".join([name, *parts])
    if len(out) > 128:
        out = out[:119] + "+" + hashlib.sha1(out.encode()).hexdigest()[:8]
    return out
