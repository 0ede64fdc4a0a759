"""Data sources: a config's ``data.train`` / ``data.eval`` -> records -> packed sequences.

A source is one of
- ``tiny`` / ``tiny-val``: the embedded corpus (`embedded_stream`);
- a ``.npy`` file: one 1-D token stream;
- a folder made by ``e2edict tokenize`` (``manifest.json``): pretokenized shards, random access;
- text files: ``.txt`` / ``.txt.xz`` (one document per file), ``.jsonl`` (one record per line),
  ``.parquet``; a glob (``data/*.jsonl``) reads every match in sorted order;
- a Hugging Face dataset: a folder written by ``Dataset.save_to_disk``, a folder of data files,
  or a hub name (``apollo-research/Skylion007-openwebtext-tokenizer-gpt2``), streaming or not.

Records are documents (``str``, from a text column) or token rows (from an ``input_ids``
column). Packing turns them into ``[n_ctx]`` sequences:
- ``bos``: one stream in which every document is preceded by the BOS token (token rows are
  concatenated as they are), cut into windows of ``n_ctx - 1`` tokens, each prefixed by BOS;
- ``rows``: every token row is one sequence, cut to its first ``n_ctx`` tokens (rows shorter
  than ``n_ctx`` are dropped and counted), as the reference code reads pretokenized datasets.
``auto`` picks ``rows`` for token-row sources and ``bos`` for everything else.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from e2edict.atomic import write_atomic
from e2edict.errors import E2EDictError

log = logging.getLogger(__name__)
EMBEDDED_DATA = ("tiny", "tiny-train", "tiny-val")
TEXT_SUFFIXES = (".txt", ".txt.xz", ".jsonl", ".parquet")
MANIFEST = "manifest.json"
_BATCH = 256  # documents tokenized per call


def source_fields(spec: Any) -> dict[str, Any]:
    """A data spec (a string or a `DataSource`) as plain fields."""
    if isinstance(spec, str):
        return {"path": spec, "split": "train", "name": None, "column": None, "streaming": False, "max_tokens": None}
    if isinstance(spec, dict):
        return dict(spec)
    return spec.model_dump()


def source_kind(path: str, what: str = "data") -> str:
    """``embedded``, ``npy``, ``shards``, ``files``, ``hf_disk`` (save_to_disk), or ``hf`` (load_dataset)."""
    if path in EMBEDDED_DATA:
        return "embedded"
    p = Path(path).expanduser()
    if p.is_file():
        if p.suffix == ".npy":
            return "npy"
        if p.name.endswith(TEXT_SUFFIXES):
            return "files"
        raise E2EDictError(f"{path!r} has an unsupported type (use .npy, .txt, .txt.xz, .jsonl, .parquet or a folder)")
    if p.is_dir():
        if (p / MANIFEST).is_file():
            return "shards"
        if (p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file() or (p / "state.json").is_file():
            return "hf_disk"
        return "hf"
    if any(c in path for c in "*?["):
        return "files"
    if path.startswith(("/", ".", "~")) or path.endswith((".npy", ".xz", *TEXT_SUFFIXES)) or path.count("/") > 1:
        raise E2EDictError(f"{what}: {path!r} is neither an embedded data set (tiny, tiny-val) nor an existing file or folder")
    return "hf"  # a hub name; `datasets` says whether it exists


def _glob_files(path: str, what: str) -> list[Path]:
    p = Path(path).expanduser()
    files = [p] if p.is_file() else sorted(Path(f) for f in globlib.glob(str(p), recursive=True) if Path(f).is_file())
    if not files:
        raise E2EDictError(f"{what}: no file matches {path!r}")
    bad = [f.name for f in files if not f.name.endswith(TEXT_SUFFIXES)]
    if bad:
        raise E2EDictError(f"{what}: {bad[0]!r} has an unsupported type (text data: .txt, .txt.xz, .jsonl, .parquet)")
    return files


def _choose_column(names, column: str | None, where: str, what: str) -> str:
    """The configured column, else ``input_ids`` if the source has it, else ``text``."""
    names = [str(n) for n in names]
    if column is None:
        column = "input_ids" if "input_ids" in names else "text" if "text" in names else None
        if column is None:
            raise E2EDictError(f"{what}: {where} has no 'text' or 'input_ids' column (it has {', '.join(names)}); set its column")
    if column not in names:
        raise E2EDictError(f"{what}: {where} has no column {column!r} (it has {', '.join(names)})")
    return column


def _pick(row: dict, column: str | None, where: str, what: str):
    return _record(row[_choose_column(row, column, where, what)], where, what)


def _record(value, where: str, what: str):
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, np.ndarray)) and all(isinstance(v, (int, np.integer)) for v in value):
        return np.asarray(value, dtype=np.int64)
    if hasattr(value, "tolist"):  # a torch tensor or pyarrow value
        return _record(value.tolist(), where, what)
    raise E2EDictError(f"{what}: {where} holds {type(value).__name__}, not text or a list of token ids")


def _file_records(files: list[Path], column: str | None, what: str) -> Iterator[str | np.ndarray]:
    import lzma

    for f in files:
        name = f.name
        try:
            if name.endswith((".txt", ".txt.xz")):
                opener = lzma.open if name.endswith(".xz") else open
                with opener(f, "rt", encoding="utf-8") as fh:
                    yield fh.read()
            elif name.endswith(".jsonl"):
                with open(f, encoding="utf-8") as fh:
                    for i, line in enumerate(fh, 1):
                        if not line.strip():
                            continue
                        try:
                            row = json.loads(line)
                        except ValueError as e:
                            raise E2EDictError(f"{what}: {name} line {i} is not JSON ({e})") from None
                        if not isinstance(row, dict):
                            raise E2EDictError(f"{what}: {name} line {i} is not a JSON object")
                        yield _pick(row, column, f"{name} line {i}", what)
            else:
                import pyarrow.parquet as pq

                pf = pq.ParquetFile(f)
                col = _choose_column(pf.schema_arrow.names, column, name, what)
                for batch in pf.iter_batches(columns=[col], batch_size=_BATCH):
                    for v in batch.column(0).to_pylist():
                        yield _record(v, name, what)
        except (OSError, UnicodeDecodeError, lzma.LZMAError) as e:
            raise E2EDictError(f"{what}: cannot read {str(f)!r} ({e})") from None
        except E2EDictError:
            raise
        except Exception as e:  # pyarrow's errors for damaged files
            raise E2EDictError(f"{what}: cannot read {str(f)!r} ({type(e).__name__}: {e})") from None


def _open_hf(fields: dict[str, Any], kind: str, what: str):
    import datasets

    path = fields["path"]
    try:
        if kind == "hf_disk":
            ds = datasets.load_from_disk(str(Path(path).expanduser()))
            if isinstance(ds, datasets.DatasetDict):
                if fields["split"] not in ds:
                    raise E2EDictError(f"{what}: dataset {path!r} has no split {fields['split']!r} (it has {', '.join(ds)})")
                ds = ds[fields["split"]]
            if fields["streaming"]:
                ds = ds.to_iterable_dataset()
        else:
            ds = datasets.load_dataset(path, fields["name"], split=fields["split"], streaming=fields["streaming"])
    except E2EDictError:
        raise
    except Exception as e:  # `datasets` raises many types for unknown names, offline hubs, bad files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise E2EDictError(f"{what}: cannot open dataset {path!r}: {first}") from None
    return ds


def _hf_records(ds, fields: dict[str, Any], what: str) -> Iterator[str | np.ndarray]:
    where = f"dataset {fields['path']!r}"
    names = ds.column_names
    if names is not None:
        column = _choose_column(names, fields["column"], where, what)
        for batch in ds.iter(batch_size=_BATCH):
            for v in batch[column]:
                yield _record(v, where, what)
    else:  # some streaming datasets know their columns only once read
        for row in ds:
            yield _pick(row, fields["column"], where, what)


def record_factory(spec: Any, what: str) -> tuple[Callable[[], Iterator[str | np.ndarray]], str]:
    """A function that starts the source's records from the beginning, and the source's kind."""
    fields = source_fields(spec)
    kind = source_kind(fields["path"], what)
    if kind == "files":
        files = _glob_files(fields["path"], what)
        return lambda: _file_records(files, fields["column"], what), kind
    if kind in ("hf", "hf_disk"):
        ds = _open_hf(fields, kind, what)
        return lambda: _hf_records(ds, fields, what), kind
    raise E2EDictError(f"{what}: {fields['path']!r} is a {kind} source, not a record source")


BOS_TOKEN = "<|endoftext|>"  # the embedded tokenizer's BOS (and GPT-2's)


def bos_id(tokenizer) -> int | None:
    """The token that starts a sequence and separates documents: BOS, else EOS; for a raw
    `tokenizers.Tokenizer` (no such attributes) the id of `BOS_TOKEN`."""
    for attr in ("bos_token_id", "eos_token_id"):
        v = getattr(tokenizer, attr, None) if tokenizer is not None else None
        if isinstance(v, int):
            return v
    if hasattr(tokenizer, "token_to_id"):
        return tokenizer.token_to_id(BOS_TOKEN)
    return None


def tokenize_batch(tokenizer, texts: list[str]) -> list[list[int]]:
    if hasattr(tokenizer, "encode_batch"):  # a raw `tokenizers.Tokenizer`
        return [e.ids for e in tokenizer.encode_batch(texts)]
    # documents longer than the model's context are cut into windows on purpose: no length warning
    return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


def encode_texts(tokenizer, texts: list[str]) -> np.ndarray:
    """Tokenize texts into one stream, each text preceded by the BOS token (`bos_id`)."""
    bos = bos_id(tokenizer)
    parts = []
    for ids in tokenize_batch(tokenizer, list(texts)):
        parts.append(np.array([bos], dtype=np.int64))
        parts.append(np.asarray(ids, dtype=np.int64))
    return np.concatenate(parts)


def _windows(stream: np.ndarray, n_ctx: int, bos: int) -> tuple[np.ndarray, np.ndarray]:
    """``bos`` packing of one stream: ``[n, n_ctx]`` windows (BOS, then ``n_ctx - 1`` tokens,
    without overlap) and the tokens left over."""
    body = n_ctx - 1
    n = len(stream) // body
    out = np.empty((n, n_ctx), dtype=np.int64)
    out[:, 0] = bos
    out[:, 1:] = np.asarray(stream[: n * body], dtype=np.int64).reshape(n, body)
    return out, stream[n * body :]


def pack_stream(stream: np.ndarray, n_ctx: int, bos: int):
    """One token stream as ``[N, n_ctx]`` sequences (a tensor): `pack`'s ``bos`` packing."""
    import torch

    if n_ctx < 2:
        raise E2EDictError(f"data.n_ctx must be at least 2, got {n_ctx}")
    seqs, _ = _windows(np.asarray(stream), n_ctx, bos)
    if len(seqs) == 0:
        raise E2EDictError(f"token stream of {len(stream)} tokens is shorter than one sequence of {n_ctx}")
    return torch.from_numpy(seqs)


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
    small = stream.astype(np.int32 if stream.max() >= 2**16 else np.uint16)
    write_atomic(path, lambda tmp: _save_npy(tmp, small))
    return stream


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as fh:  # a handle: np.save would add ".npy" to a bare name
        np.save(fh, array, allow_pickle=False)


def load_token_array(path: str, what: str) -> np.ndarray:
    """A ``.npy`` file holding one 1-D integer token stream (read without pickle), as int64."""
    try:
        stream = np.load(Path(path).expanduser(), allow_pickle=False)
    except (ValueError, OSError) as e:
        raise E2EDictError(f"{what}: {path!r} is not a readable .npy array ({e})") from None
    if stream.ndim != 1 or not np.issubdtype(stream.dtype, np.integer):
        raise E2EDictError(f"{what}: {path!r} must hold a 1-D integer token array, got {stream.dtype} {stream.shape}")
    return stream.astype(np.int64)


def stream_source(kind: str, path: str, tokenizer, tokenizer_key: str, what: str) -> np.ndarray:
    """The token stream of an ``embedded`` or ``npy`` source (`source_kind`)."""
    if kind == "embedded":
        return embedded_stream("val" if path == "tiny-val" else "train", tokenizer, tokenizer_key)
    return load_token_array(path, what)


def pack(
    records: Iterable[str | np.ndarray],
    n_ctx: int,
    packing: str,
    bos: int | None,
    tokenizer=None,
    what: str = "data",
) -> Iterator[np.ndarray]:
    """Packed ``[n_ctx]`` int64 sequences from records (see the module docstring)."""
    if n_ctx < 2:
        raise E2EDictError(f"data.n_ctx must be at least 2, got {n_ctx}")
    it = iter(records)
    if packing == "rows":
        dropped = 0
        for r in it:
            if isinstance(r, str):
                raise E2EDictError(f"{what}: packing 'rows' needs token rows (an input_ids column), but the source holds text")
            if len(r) < n_ctx:
                dropped += 1
                continue
            yield r[:n_ctx]
        if dropped:
            log.warning("%s: %d rows shorter than n_ctx=%d were left out", what, dropped, n_ctx)
        return
    if bos is None:
        raise E2EDictError(f"{what}: the tokenizer has neither a BOS nor an EOS token to start sequences with")
    carry = np.zeros(0, dtype=np.int64)
    while True:
        chunk: list[str | np.ndarray] = []
        for r in it:
            chunk.append(r)
            if len(chunk) == _BATCH:
                break
        if not chunk:
            return
        texts = [r for r in chunk if isinstance(r, str)]
        if texts and tokenizer is None:
            raise E2EDictError(f"{what}: the model has no tokenizer to read text with (use token data)")
        ids = iter(tokenize_batch(tokenizer, texts)) if texts else iter(())
        parts = [carry]
        for r in chunk:
            if isinstance(r, str):
                parts.append(np.array([bos], dtype=np.int64))
                parts.append(np.asarray(next(ids), dtype=np.int64))
            else:
                parts.append(r)
        windows, carry = _windows(np.concatenate(parts), n_ctx, bos)
        yield from windows


def resolve_packing(packing: str, first_record: str | np.ndarray | None) -> str:
    if packing != "auto":
        return packing
    return "rows" if isinstance(first_record, np.ndarray) else "bos"


def limit_tokens(seqs: Iterator[np.ndarray], max_tokens: int | None, n_ctx: int) -> Iterator[np.ndarray]:
    if max_tokens is None:
        yield from seqs
        return
    n = -(-max_tokens // n_ctx)
    for i, s in enumerate(seqs):
        if i >= n:
            return
        yield s


def sequence_factory(
    spec: Any, n_ctx: int, packing: str, bos: int | None, tokenizer, what: str
) -> Callable[[], Iterator[np.ndarray]]:
    """A function that streams the source's packed sequences from the start, in source order."""
    import itertools

    records, _ = record_factory(spec, what)
    fields = source_fields(spec)

    def start() -> Iterator[np.ndarray]:
        it = records()
        first = next(it, None)
        if first is None:
            raise E2EDictError(f"{what}: {fields['path']!r} holds no records")
        mode = resolve_packing(packing, first)
        seqs = pack(itertools.chain([first], it), n_ctx, mode, bos, tokenizer, what)
        return limit_tokens(seqs, fields["max_tokens"], n_ctx)

    return start


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of a tokenizer's vocabulary: shards made with one tokenizer refuse another."""
    import hashlib

    vocab = tokenizer.get_vocab()
    text = json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def user_sequences(data: Any, n_ctx: int, bos: int | None, tokenizer=None) -> np.ndarray:
    """``[N, n_ctx]`` int64 sequences from what a user has at hand, packed as runs pack
    (``bos``: each text after a BOS token, windows of ``n_ctx - 1`` tokens each after BOS):

    - a 2-D tensor or array of token ids (any integer dtype): the sequences as they are;
    - a 1-D tensor or array: a token stream (a ``.npy`` file's), packed;
    - a string or a list of strings: texts, tokenized with ``tokenizer`` and packed."""
    import torch

    if isinstance(data, str):
        data = [data]
    if isinstance(data, list | tuple) and data and all(isinstance(t, str) for t in data):
        if tokenizer is None:
            raise E2EDictError("evaluate: texts need a tokenizer (pass tokenizer=..., or token ids)")
        records: list[str | np.ndarray] = list(data)
    else:
        arr = (
            data.detach().cpu().numpy()
            if isinstance(data, torch.Tensor)
            else np.asarray(data)
            if isinstance(data, list | tuple | np.ndarray)
            else None
        )
        if arr is None or arr.dtype.kind not in "iu" or arr.ndim not in (1, 2) or arr.size == 0:
            what = f"{type(data).__name__}" + (f" of {arr.dtype} with shape {arr.shape}" if arr is not None else "")
            raise E2EDictError(
                "evaluate: tokens must be [N, n_ctx] or [T] integer token ids (tensor or numpy array) "
                f"or a list of texts, not {what}"
            )
        if arr.ndim == 2:
            return arr.astype(np.int64)
        records = [arr.astype(np.int64)]
    seqs = list(pack(records, n_ctx, "bos", bos, tokenizer, what="evaluate"))
    if not seqs:
        raise E2EDictError(f"evaluate: the tokens make no sequence of n_ctx={n_ctx} (BOS + {n_ctx - 1} tokens)")
    return np.stack(seqs)
