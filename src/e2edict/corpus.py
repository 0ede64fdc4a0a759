"""The embedded public-domain corpus and its fixed train / held-out split.

The split is defined here once and used by the tiny model's training script, by the token
streams that SAE training reads, and by the shipped held-out tokens: the last
``HOLDOUT_FRACTION`` of every text (cut at a line break) is never trained on.
"""

from __future__ import annotations

import lzma
from functools import cache

from e2edict.assets import CORPUS_DIR

TEXT_NAMES = ("austen", "kjv", "shakespeare", "jargon")
HOLDOUT_FRACTION = 0.05


@cache
def read_text(name: str) -> str:
    """Return one corpus text, decompressed."""
    if name not in TEXT_NAMES:
        raise ValueError(f"unknown corpus text {name!r}; known: {', '.join(TEXT_NAMES)}")
    with lzma.open(CORPUS_DIR / f"{name}.txt.xz", "rt", encoding="utf-8") as fh:
        return fh.read()


def split_text(text: str, holdout: float = HOLDOUT_FRACTION) -> tuple[str, str]:
    """Split a text into (train, held-out): the held-out part starts at the first line break
    after ``(1 - holdout)`` of the characters, so no line is cut in half."""
    cut = int(len(text) * (1.0 - holdout))
    nl = text.find("\n", cut)
    cut = len(text) if nl < 0 else nl + 1
    return text[:cut], text[cut:]


def corpus_split(split: str) -> list[str]:
    """All texts of one split (``"train"`` or ``"val"``), in ``TEXT_NAMES`` order."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    idx = 0 if split == "train" else 1
    return [split_text(read_text(n))[idx] for n in TEXT_NAMES]
