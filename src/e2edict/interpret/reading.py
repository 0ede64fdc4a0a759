"""What every interpretability metric reads: the activation at each SAE's own hook on the
model's clean run (no SAE spliced in), and each SAE's code of it.

An SAE is judged on exactly the activation it reads when it is used (a transcoder on its input
hook), never one position late: SAEBench reads ``blocks.L.hook_resid_post``, while the paper's
SAEs sit at ``blocks.L.hook_resid_pre``. Where the model carries a trained adapter, the
activation is the adapted model's, the one the SAE was trained and is used on. The run stops at
the last hook needed, so no logits are computed. Texts are tokenized as runs tokenize them: a
BOS token, then the text's tokens.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch

from e2edict.backbones.base import Backbone
from e2edict.errors import E2EDictError
from e2edict.saes.base import SAE, eval_mode
from e2edict.sources import tokenize_batch


class Reader:
    """The activations and codes of ``saes`` (``{hook: SAE}``) on ``backbone``'s clean run."""

    def __init__(self, backbone: Backbone, saes: dict[str, SAE], batch_size: int = 16):
        if not saes:
            raise E2EDictError("no SAEs to evaluate")
        self.backbone, self.saes, self.batch_size = backbone, saes, batch_size
        self.device = next(next(iter(saes.values())).parameters()).device

    @property
    def tokenizer(self):
        return self.backbone.tokenizer

    @property
    def bos(self) -> int:
        return self.backbone.bos_token_id

    @contextlib.contextmanager
    def inference(self):
        adapter = self.backbone.adapter
        inside = adapter.evaluating() if adapter is not None else contextlib.nullcontext()
        with eval_mode(self.saes), inside, torch.no_grad():
            yield

    def activations(self, tokens: torch.Tensor, hooks: list[str] | None = None) -> dict[str, torch.Tensor]:
        """``{hook: [B, T, d]}`` for a batch of token ids, each SAE's input hook (or ``hooks``)."""
        hooks = list(self.saes) if hooks is None else hooks
        store: dict[str, torch.Tensor] = {}

        def capture(name: str):
            def fn(act: torch.Tensor):
                store[name] = act

            return fn

        x = tokens.to(self.device)
        first = min(self.backbone.start_block(h) for h in hooks)
        with self.inference():
            resid = self.backbone.embed_to(x, first)
            self.backbone.run_from(resid, first, {h: capture(h) for h in hooks}, logits=False)
        return store

    def read(self, tokens: torch.Tensor, hooks: list[str] | None = None) -> tuple[dict, dict]:
        """``({hook: [B, T, d]}, {hook: [B, T, d_sae]})``: the activations and each SAE's float32 codes of them."""
        hooks = list(self.saes) if hooks is None else hooks
        acts = self.activations(tokens, hooks)
        with self.inference():
            codes = {h: self.saes[h](acts[h].to(_dtype(self.saes[h])))[1].float() for h in hooks}
        return acts, codes

    def codes(self, tokens: torch.Tensor, hooks: list[str] | None = None) -> dict[str, torch.Tensor]:
        """``{hook: [B, T, d_sae]}`` float32 codes of each SAE (or those at ``hooks``)."""
        return self.read(tokens, hooks)[1]

    def batches(self, sequences: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        """``(first row, rows)`` over ``sequences`` in batches."""
        for start in range(0, len(sequences), self.batch_size):
            yield start, sequences[start : start + self.batch_size]

    def encode_texts(self, texts: list[str], n_ctx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Texts as ``[N, n_ctx]`` rows (BOS, the text's tokens cut at ``n_ctx``, right-padded)
        and a mask of each row's text tokens (BOS and padding left out, as SAEBench pools)."""
        if self.tokenizer is None:
            raise E2EDictError(f"model {self.backbone.name!r} has no tokenizer: texts cannot be read")
        ids = tokenize_batch(self.tokenizer, list(texts))
        rows = np.full((len(ids), n_ctx), self.bos, dtype=np.int64)
        mask = np.zeros((len(ids), n_ctx), dtype=bool)
        for i, t in enumerate(ids):
            t = list(t)[: n_ctx - 1]
            rows[i, 1 : 1 + len(t)] = t
            mask[i, 1 : 1 + len(t)] = True
        return torch.from_numpy(rows), torch.from_numpy(mask)


def _dtype(sae: SAE) -> torch.dtype:
    return next(sae.parameters()).dtype


def token_strings(tokenizer, ids: list[int]) -> list[str]:
    """Each token id as text a reader can tell apart: byte-level pieces that are not text on their
    own (a '\ufffd' where one byte of a character would be) are shown as their bytes, ``<0xE2 0x80>``;
    newlines and tabs are made visible (⏎, ⇥) so a context stays on one line."""
    if tokenizer is None:
        return [f"<{i}>" for i in ids]
    out = []
    for i in ids:
        text = tokenizer.decode([i])
        if "\ufffd" in text:
            raw = _token_bytes(tokenizer, i)
            if raw is not None:
                text = "<" + " ".join(f"0x{b:02X}" for b in raw) + ">"
        out.append(text.replace("\n", "⏎").replace("\t", "⇥"))
    return out


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet inverted: the printable stand-in character of each byte (transformers' table)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {ch: b for b, ch in bytes_to_unicode().items()}


_BYTES = _byte_decoder()


def _token_bytes(tokenizer, token_id: int) -> bytes | None:
    """The raw bytes of a byte-level BPE token (GPT-2's alphabet, or SentencePiece's ``<0xNN>``), or None."""
    piece = tokenizer.convert_ids_to_tokens(token_id) if hasattr(tokenizer, "convert_ids_to_tokens") else None
    if not isinstance(piece, str):
        return None
    if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
        return bytes([int(piece[3:5], 16)])
    if all(ch in _BYTES for ch in piece):
        return bytes(_BYTES[ch] for ch in piece)
    return None
