"""Token sources and batching: config names -> token streams -> [N, n_ctx] sequences -> batches.

Every sequence is ``[BOS] + (n_ctx - 1)`` consecutive tokens of a stream, windows without overlap,
so that the SAE sees the same layout the tiny model was trained on (``prepend_bos = True``).
Training order is a seeded permutation per epoch; the position in it is plain integers, so a run
can say exactly where it is.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from e2edict.errors import E2EDictError

BOS_TOKEN = "<|endoftext|>"


def encode_texts(tokenizer, texts: list[str]) -> np.ndarray:
    """Tokenize texts into one stream, each text preceded by the BOS/EOS token."""
    if hasattr(tokenizer, "convert_tokens_to_ids"):  # a transformers tokenizer
        bos = tokenizer.convert_tokens_to_ids(BOS_TOKEN)
    else:
        bos = tokenizer.token_to_id(BOS_TOKEN)
    if hasattr(tokenizer, "encode_batch"):  # a raw `tokenizers.Tokenizer`
        encoded = [e.ids for e in tokenizer.encode_batch(texts)]
    else:
        encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    parts = []
    for ids in encoded:
        parts.append(np.array([bos], dtype=np.int64))
        parts.append(np.asarray(ids, dtype=np.int64))
    return np.concatenate(parts)


def to_sequences(stream: np.ndarray, n_ctx: int, bos_id: int) -> torch.Tensor:
    """Cut a stream into non-overlapping windows of ``n_ctx - 1`` tokens, each prefixed by BOS."""
    if n_ctx < 2:
        raise E2EDictError(f"data.n_ctx must be at least 2, got {n_ctx}")
    body = n_ctx - 1
    n = len(stream) // body
    if n == 0:
        raise E2EDictError(f"token stream of {len(stream)} tokens is shorter than one sequence of {n_ctx}")
    windows = torch.from_numpy(np.ascontiguousarray(stream[: n * body], dtype=np.int64)).view(n, body)
    bos = torch.full((n, 1), bos_id, dtype=torch.long)
    return torch.cat([bos, windows], dim=1)


def _cache_dir() -> Path:
    base = os.environ.get("E2EDICT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "e2edict"
    )
    return Path(base)


def embedded_stream(split: str, tokenizer, tokenizer_key: str) -> np.ndarray:
    """The embedded corpus's token stream for ``split`` ("train" or "val").

    The held-out stream ships with the tiny model; the training stream is rebuilt from the
    shipped text once and cached (a plain .npy, loaded without pickle)."""
    from e2edict.assets import TINY_MODEL_DIR
    from e2edict.corpus import corpus_split

    shipped = TINY_MODEL_DIR / "val_tokens.npy"
    if split == "val" and tokenizer_key == "tiny" and shipped.exists():
        return np.load(shipped, allow_pickle=False).astype(np.int64)
    key = hashlib.sha256(f"{split}:{tokenizer_key}".encode()).hexdigest()[:16]
    path = _cache_dir() / f"embedded-{split}-{key}.npy"
    if path.exists():
        try:
            return np.load(path, allow_pickle=False).astype(np.int64)
        except (ValueError, OSError):
            pass  # a damaged cache file is rebuilt below
    stream = encode_texts(tokenizer, corpus_split(split))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
    np.save(tmp, stream.astype(np.int32 if stream.max() >= 2**16 else np.uint16), allow_pickle=False)
    os.replace(tmp, path)
    return stream


def _tokenizer_key(backbone) -> str:
    tok = backbone.model.tokenizer
    if backbone.name == "tiny":
        return "tiny"
    if tok is None:
        raise E2EDictError(f"model {backbone.name!r} has no tokenizer: give data as a .npy token file")
    return f"{getattr(tok, 'name_or_path', backbone.name)}:{len(tok)}"


def load_stream(spec: str, backbone, what: str) -> np.ndarray:
    """Resolve a data spec to a 1-D token stream.

    ``tiny`` / ``tiny-val``: the embedded corpus's train / held-out split, in the model's tokens;
    ``*.npy``: a 1-D integer token array; ``*.txt`` or ``*.txt.xz``: text, tokenized by the model."""
    if spec in ("tiny", "tiny-train", "tiny-val"):
        split = "val" if spec == "tiny-val" else "train"
        key = _tokenizer_key(backbone)
        stream = embedded_stream(split, backbone.model.tokenizer, key)
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise E2EDictError(f"{what}: {spec!r} is neither an embedded data set (tiny, tiny-val) nor a file")
        if path.suffix == ".npy":
            try:
                stream = np.load(path, allow_pickle=False)
            except (ValueError, OSError) as e:
                raise E2EDictError(f"{what}: {spec!r} is not a readable .npy array ({e})") from None
            if stream.ndim != 1 or not np.issubdtype(stream.dtype, np.integer):
                raise E2EDictError(f"{what}: {spec!r} must hold a 1-D integer token array, got {stream.dtype} {stream.shape}")
            stream = stream.astype(np.int64)
        elif path.name.endswith((".txt", ".txt.xz")):
            import lzma

            opener = lzma.open if path.name.endswith(".xz") else open
            try:
                with opener(path, "rt", encoding="utf-8") as fh:
                    text = fh.read()
            except (OSError, UnicodeDecodeError, lzma.LZMAError) as e:
                raise E2EDictError(f"{what}: cannot read {spec!r} as UTF-8 text ({e})") from None
            if backbone.model.tokenizer is None:
                raise E2EDictError(f"{what}: model {backbone.name!r} has no tokenizer to read text with")
            stream = encode_texts(backbone.model.tokenizer, [text])
        else:
            raise E2EDictError(f"{what}: {spec!r} has an unsupported type (use .npy, .txt or .txt.xz)")
    vocab = backbone.model.cfg.d_vocab
    if len(stream) and (stream.min() < 0 or stream.max() >= vocab):
        raise E2EDictError(f"{what}: token ids must lie in [0, {vocab}) for model {backbone.name!r}")
    return stream


class BatchStream:
    """Batches of sequences in a seeded order, reshuffled every epoch.

    The position (``epoch``, ``index``) is the whole state: restoring it resumes the exact order."""

    def __init__(self, sequences: torch.Tensor, batch_size: int, seed: int, shuffle: bool = True):
        if len(sequences) < batch_size:
            raise E2EDictError(f"data has {len(sequences)} sequences, fewer than one batch of {batch_size}")
        self.sequences, self.batch_size, self.seed, self.shuffle = sequences, batch_size, seed, shuffle
        self.epoch, self.index = 0, 0
        self._order = self._make_order()

    def _make_order(self) -> np.ndarray:
        n = len(self.sequences)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, self.epoch]).permutation(n)

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._make_order()

    def next(self) -> torch.Tensor:
        if self.index + self.batch_size > len(self._order):
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._make_order()
        idx = self._order[self.index : self.index + self.batch_size]
        self.index += self.batch_size
        return self.sequences[torch.from_numpy(idx)]
