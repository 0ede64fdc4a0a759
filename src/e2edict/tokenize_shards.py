"""``e2edict tokenize``: pack a text or token source with a model's tokenizer into shards.

It sits above both `e2edict.data` (sequence packing) and `e2edict.shards` (the on-disk format), so
neither of those imports the other's caller (no import loop)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from e2edict.errors import E2EDictError
from e2edict.shards import write_shards


def tokenize_to_shards(
    source: dict[str, Any],
    model: str,
    n_ctx: int,
    out: Path,
    packing: str = "auto",
    shard_rows: int = 65_536,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """``e2edict tokenize``: pack a source with a model's tokenizer and write shards."""
    from tqdm.auto import tqdm

    from e2edict.sources import bos_id, tokenizer_fingerprint

    tok = _tokenizer(model, trust_remote_code)
    bos = bos_id(tok)
    seqs, mode = _packed(source, model, tok, n_ctx, packing, bos)
    info = {
        "packing": mode,
        "bos_token_id": bos,
        "tokenizer": model,
        "tokenizer_sha256": tokenizer_fingerprint(tok),
        "source": source,
    }
    bar = tqdm(seqs, unit="seq", desc="tokenizing", disable=True if not progress else None, leave=False)
    with bar:  # a bar on a terminal; nothing in a log
        return write_shards(bar, out, n_ctx, len(tok), info, shard_rows=shard_rows, overwrite=overwrite)


def _tokenizer(model: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    from e2edict.backbones.transformer_lens import resolve_model_path

    folder = resolve_model_path(model)
    try:
        return AutoTokenizer.from_pretrained(str(folder) if folder else model, trust_remote_code=trust_remote_code)
    except Exception as e:  # unknown names, offline hub, folders without tokenizer files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise E2EDictError(f"cannot load the tokenizer of {model!r}: {first}") from None


def _packed(source: dict[str, Any], model: str, tok, n_ctx: int, packing: str, bos: int):
    """The source's sequences of ``n_ctx`` tokens, packed as ``packing`` says, and the mode used."""
    from e2edict.sources import pack_stream, record_factory, resolve_packing, sequence_factory, source_kind, stream_source

    what = "source"
    kind = source_kind(source["path"], what)
    if kind == "shards":
        raise E2EDictError(f"{source['path']!r} is already a shard folder")
    if kind in ("embedded", "npy"):
        if packing == "rows":
            raise E2EDictError(f"packing 'rows' needs token rows; {source['path']!r} is one token stream")
        key = "tiny" if model == "tiny" else f"{tok.name_or_path}:{len(tok)}"
        return iter(pack_stream(stream_source(kind, source["path"], tok, key, what), n_ctx, bos).numpy()), "bos"
    records, _ = record_factory(source, what)
    first = next(records(), None)
    if first is None:
        raise E2EDictError(f"{source['path']!r} holds no records")
    mode = resolve_packing(packing, first)
    return sequence_factory(source, n_ctx, mode, bos, tok, what)(), mode
