"""Pretokenized shards: ``e2edict tokenize`` writes them, training reads them with random access.

A shard folder holds ``shard-NNNNN.npy`` files, each a ``[rows, n_ctx]`` array of unsigned
integers (``np.save``, no pickle), and ``manifest.json`` (format, n_ctx, dtype, packing, the
tokenizer's name and vocabulary hash, the source, and each shard's rows and SHA-256). Shards are
memory-mapped, so any sequence is read directly: a resumed run continues at its sample without
re-reading what came before. The folder is written under a temporary name and renamed when
complete, so a folder with a manifest is never half-written.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from e2edict.atomic import sha256, write_folder_atomic
from e2edict.errors import E2EDictError
from e2edict.sources import MANIFEST

FORMAT = "e2edict-token-shards"
VERSION = 1
_SHARD_RE = re.compile(r"^shard-\d{5,}\.npy$")


def write_shards(
    sequences: Iterable[np.ndarray],
    out: Path,
    n_ctx: int,
    vocab_size: int,
    info: dict[str, Any],
    shard_rows: int = 65_536,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write packed sequences as shards + manifest into ``out``; return the manifest. Everything is
    written to a temporary folder beside ``out`` and renamed (`e2edict.atomic.write_folder_atomic`):
    a failure leaves nothing behind."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise E2EDictError(f"output folder {str(out)!r} exists and is not empty (use --overwrite to replace it)")
    done: list[dict[str, Any]] = []

    def fill(tmp: Path) -> None:
        writer = _ShardWriter(tmp, n_ctx, vocab_size, shard_rows)
        for seq in sequences:
            writer.add(seq)
        done.append(writer.finish(info))
        (tmp / MANIFEST).write_text(json.dumps(done[0], indent=2) + "\n")

    write_folder_atomic(out, fill)
    return done[0]


class _ShardWriter:
    """Sequences gathered into shards of ``shard_rows`` rows, each checked and saved with its hash."""

    def __init__(self, folder: Path, n_ctx: int, vocab_size: int, shard_rows: int):
        self.folder, self.n_ctx, self.vocab_size, self.rows = folder, n_ctx, vocab_size, shard_rows
        self.dtype = np.uint16 if vocab_size <= 2**16 else np.uint32
        self.shards: list[dict[str, Any]] = []
        self.buf: list[np.ndarray] = []
        self.max_id = -1

    def add(self, seq: np.ndarray) -> None:
        if len(seq) != self.n_ctx:
            raise E2EDictError(f"a packed sequence has {len(seq)} tokens, not n_ctx={self.n_ctx}")
        self.buf.append(seq)
        if len(self.buf) == self.rows:
            self._flush()

    def _flush(self) -> None:
        arr = np.stack(self.buf)
        self.max_id = max(self.max_id, int(arr.max()))
        if arr.min() < 0 or self.max_id >= self.vocab_size:
            raise E2EDictError(f"token ids must lie in [0, {self.vocab_size}), found {int(arr.min())}..{self.max_id}")
        name = f"shard-{len(self.shards):05d}.npy"
        np.save(self.folder / name, arr.astype(self.dtype), allow_pickle=False)
        self.shards.append({"file": name, "sequences": len(arr), "sha256": sha256(self.folder / name)})
        self.buf.clear()

    def finish(self, info: dict[str, Any]) -> dict[str, Any]:
        """The last shard written; the manifest."""
        if self.buf:
            self._flush()
        if not self.shards:
            raise E2EDictError("the source gave no complete sequence of n_ctx tokens")
        total = sum(s["sequences"] for s in self.shards)
        return {
            "format": FORMAT,
            "version": VERSION,
            "n_ctx": self.n_ctx,
            "dtype": np.dtype(self.dtype).name,
            "vocab_size": self.vocab_size,
            "max_token_id": self.max_id,
            "sequences": total,
            "tokens": total * self.n_ctx,
            **info,
            "shards": self.shards,
        }


class ShardSequences:
    """Random access to the sequences of a shard folder (memory-mapped)."""

    def __init__(self, folder: str | Path, what: str = "data"):
        self.folder = Path(folder)
        try:
            m = json.loads((self.folder / MANIFEST).read_text())
        except (OSError, ValueError) as e:
            raise E2EDictError(f"{what}: {str(self.folder)!r} has an unreadable {MANIFEST} ({e})") from None
        if not isinstance(m, dict) or m.get("format") != FORMAT or m.get("version") != VERSION:
            raise E2EDictError(f"{what}: {str(self.folder)!r} is not an e2edict shard folder of version {VERSION}")
        try:
            self.n_ctx = int(m["n_ctx"])
            self.vocab_size = int(m["vocab_size"])
            self.max_token_id = int(m["max_token_id"])
            dtype = np.dtype(m["dtype"])
            entries = [(str(s["file"]), int(s["sequences"])) for s in m["shards"]]
        except (KeyError, TypeError, ValueError) as e:
            raise E2EDictError(f"{what}: {MANIFEST} in {str(self.folder)!r} is missing or has a bad field ({e})") from None
        if dtype not in (np.uint16, np.uint32):
            raise E2EDictError(f"{what}: {MANIFEST} names dtype {dtype}, not uint16 or uint32")
        self.manifest = m
        self.arrays: list[np.ndarray] = []
        for name, rows in entries:
            if not _SHARD_RE.match(name):
                raise E2EDictError(f"{what}: {MANIFEST} names a shard {name!r} outside the shard naming scheme")
            try:
                arr = np.load(self.folder / name, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as e:
                raise E2EDictError(f"{what}: shard {name} in {str(self.folder)!r} is missing or damaged ({e})") from None
            if arr.shape != (rows, self.n_ctx) or arr.dtype != dtype:
                raise E2EDictError(
                    f"{what}: shard {name} holds {arr.dtype} {arr.shape}, the manifest says {dtype} ({rows}, {self.n_ctx})"
                )
            self.arrays.append(arr)
        self.starts = np.cumsum([0] + [len(a) for a in self.arrays])
        if int(self.starts[-1]) != int(m.get("sequences", -1)):
            raise E2EDictError(
                f"{what}: the shards hold {int(self.starts[-1])} sequences, the manifest says {m.get('sequences')}"
            )

    def __len__(self) -> int:
        return int(self.starts[-1])

    def take(self, idx: np.ndarray, n_ctx: int | None = None) -> torch.Tensor:
        """Rows ``idx`` (global sequence numbers), optionally cut to their first ``n_ctx`` tokens."""
        idx = np.asarray(idx, dtype=np.int64)
        width = self.n_ctx if n_ctx is None else n_ctx
        out = np.empty((len(idx), width), dtype=np.int64)
        shard = np.searchsorted(self.starts, idx, side="right") - 1
        for s in np.unique(shard):
            sel = np.nonzero(shard == s)[0]
            out[sel] = self.arrays[s][idx[sel] - self.starts[s], :width]
        return torch.from_numpy(out)

    def verify(self) -> None:
        """Compare every shard with its SHA-256 in the manifest."""
        for entry in self.manifest["shards"]:
            if sha256(self.folder / entry["file"]) != entry.get("sha256"):
                raise E2EDictError(f"shard {entry['file']} in {str(self.folder)!r} does not match its checksum")
