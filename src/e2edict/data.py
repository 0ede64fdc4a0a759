"""Token data for a run: sources (see `e2edict.sources`) -> [N, n_ctx] sequences -> batches.

Sequences live in random-access sets (in memory, or memory-mapped shards) or, for streaming
sources, in a `SequenceStream` read in order. With ``bos`` packing every sequence is ``[BOS] +
(n_ctx - 1)`` consecutive tokens of the stream, windows without overlap, the layout the tiny model
was trained on (``prepend_bos = True``). Training order is a seeded permutation per epoch (a seeded
shuffle buffer for streams); the position in it is plain integers, so a run can say exactly where
it is.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from e2edict.errors import E2EDictError
from e2edict.shards import ShardSequences
from e2edict.sources import limit_tokens as _limit
from e2edict.sources import pack_stream, sequence_factory, source_fields, source_kind, stream_source


def _tokenizer_key(backbone) -> str:
    tok = backbone.tokenizer
    if backbone.name == "tiny":
        return "tiny"
    if tok is None:
        raise E2EDictError(f"model {backbone.name!r} has no tokenizer: give data as a .npy token file")
    return f"{getattr(tok, 'name_or_path', backbone.name)}:{len(tok)}"


def _check_vocab(tokens, backbone, what: str):
    """Token ids (a tensor or an array) inside the model's vocabulary, or a one-line error."""
    if len(tokens) and (int(tokens.min()) < 0 or int(tokens.max()) >= backbone.d_vocab):
        raise E2EDictError(f"{what}: token ids must lie in [0, {backbone.d_vocab}) for model {backbone.name!r}")
    return tokens


class TensorSequences:
    """Sequences held in memory."""

    def __init__(self, seqs: torch.Tensor):
        self.seqs = seqs

    def __len__(self) -> int:
        return len(self.seqs)

    def take(self, idx: np.ndarray) -> torch.Tensor:
        return self.seqs[torch.from_numpy(np.asarray(idx, dtype=np.int64))]


class ShardView:
    """A shard folder's sequences, cut to the run's ``n_ctx``."""

    def __init__(self, shards: ShardSequences, n_ctx: int):
        self.shards, self.n_ctx = shards, n_ctx

    def __len__(self) -> int:
        return len(self.shards)

    def take(self, idx: np.ndarray) -> torch.Tensor:
        return self.shards.take(idx, self.n_ctx)


class SubsetSequences:
    """Rows ``start..stop`` of another sequence set (what is left for training after a holdout)."""

    def __init__(self, base, start: int, stop: int):
        self.base, self.start, self.stop = base, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def take(self, idx: np.ndarray) -> torch.Tensor:
        return self.base.take(np.asarray(idx, dtype=np.int64) + self.start)


class SequenceStream:
    """A source read in its own order, from the start, without random access (streaming)."""

    def __init__(self, factory: Callable[[], Iterator[np.ndarray]], backbone, what: str, skip: int = 0):
        self.factory, self.backbone, self.what, self.skip = factory, backbone, what, skip

    def iterate(self) -> Iterator[np.ndarray]:
        it = self.factory()
        for _ in itertools.islice(it, self.skip):
            pass
        for seq in it:
            yield _check_vocab(seq, self.backbone, self.what)

    def first_rows(self, n: int) -> torch.Tensor:
        rows = list(itertools.islice(self.iterate(), n))
        if not rows:
            raise E2EDictError(f"{self.what}: the source gave no complete sequence")
        return torch.from_numpy(np.stack(rows))


def _open_shards(path: str, backbone, n_ctx: int, packing: str, what: str) -> ShardView:
    from e2edict.sources import tokenizer_fingerprint

    shards = ShardSequences(Path(path).expanduser(), what)
    m = shards.manifest
    if n_ctx > shards.n_ctx:
        raise E2EDictError(f"{what}: shards of {shards.n_ctx} tokens are shorter than data.n_ctx={n_ctx}")
    if packing not in ("auto", m.get("packing")):
        raise E2EDictError(f"{what}: the shards are packed {m.get('packing')!r}, but data.packing is {packing!r}")
    if shards.max_token_id >= backbone.d_vocab:
        raise E2EDictError(
            f"{what}: the shards hold token id {shards.max_token_id}, beyond the {backbone.d_vocab} of model {backbone.name!r}"
        )
    if backbone.tokenizer is not None and m.get("tokenizer_sha256"):
        if tokenizer_fingerprint(backbone.tokenizer) != m["tokenizer_sha256"]:
            raise E2EDictError(
                f"{what}: the shards were made with tokenizer {m.get('tokenizer')!r}, not the one of model {backbone.name!r}"
            )
    return ShardView(shards, n_ctx)


def open_sequences(spec, backbone, n_ctx: int, packing: str, what: str, limit_tokens: int | None = None):
    """A source's packed sequences: a random-access set (``__len__``, ``take``) or, for a
    streaming source, a `SequenceStream`. ``limit_tokens`` reads no more than needed (evaluation)."""

    fields = source_fields(spec)
    path = fields["path"]
    kind = source_kind(path, what)
    if kind in ("embedded", "npy") and not isinstance(spec, str) and (fields["streaming"] or fields["column"]):
        raise E2EDictError(f"{what}: streaming and column apply to text and dataset sources, not {path!r}")
    if kind in ("embedded", "npy"):
        stream = stream_source(kind, path, backbone.tokenizer, _tokenizer_key(backbone) if kind == "embedded" else "", what)
    elif kind == "shards":
        return _open_shards(path, backbone, n_ctx, packing, what)
    else:
        factory = sequence_factory(spec, n_ctx, packing, backbone.bos_token_id, backbone.tokenizer, what)
        if fields["streaming"]:
            return SequenceStream(factory, backbone, what)
        seqs = list(_limit(factory(), limit_tokens, n_ctx))
        if not seqs:
            raise E2EDictError(f"{what}: {path!r} gave no complete sequence of {n_ctx} tokens")
        return TensorSequences(_check_vocab(torch.from_numpy(np.stack(seqs)), backbone, what))
    if packing == "rows":
        raise E2EDictError(f"{what}: packing 'rows' needs token rows; {path!r} is one token stream")
    return TensorSequences(pack_stream(_check_vocab(stream, backbone, what), n_ctx, backbone.bos_token_id))


def first_rows(source, n: int) -> torch.Tensor:
    """The first ``n`` sequences of a source (fewer if it has fewer)."""
    if isinstance(source, SequenceStream):
        return source.first_rows(n)
    return source.take(np.arange(min(n, len(source))))


def build_data(cfg, backbone):
    """``(train source, eval sequences)`` for a config.

    With ``data.eval: holdout`` the first ``data.holdout_tokens`` of the training source (in
    its own order, before any shuffling) are the eval data and training starts after them, so
    the two never share a sequence."""
    d = cfg.data
    n_ctx = d.n_ctx
    need = max(cfg.eval.tokens, cfg.eval.alive_tokens, cfg.eval.during_training_tokens)
    train = open_sequences(d.train, backbone, n_ctx, d.packing, "data.train")
    if d.eval == "holdout":
        h = -(-d.holdout_tokens // n_ctx)
        if isinstance(train, SequenceStream):
            eval_seqs = train.first_rows(h)
            if len(eval_seqs) < h:
                raise E2EDictError(f"data.train has {len(eval_seqs)} sequences, not more than data.holdout_tokens needs ({h})")
            train = SequenceStream(train.factory, backbone, "data.train", skip=h)
        else:
            if len(train) <= h:
                raise E2EDictError(f"data.train has {len(train)} sequences, not more than data.holdout_tokens needs ({h})")
            eval_seqs = train.take(np.arange(h))
            train = SubsetSequences(train, h, len(train))
        return train, eval_seqs
    return train, eval_sequences(d.eval, cfg, backbone, need)


def eval_sequences(spec, cfg, backbone, tokens: int) -> torch.Tensor:
    """The first ``tokens`` worth of sequences of an eval source (all of it if it is smaller).

    ``spec`` ``holdout`` is the run's held-out first rows of ``data.train`` (never more than it)."""
    d = cfg.data
    if spec == "holdout":
        h = -(-d.holdout_tokens // d.n_ctx)
        return first_rows(open_sequences(d.train, backbone, d.n_ctx, d.packing, "data.train", limit_tokens=h * d.n_ctx), h)
    n = -(-tokens // d.n_ctx)
    return first_rows(open_sequences(spec, backbone, d.n_ctx, d.packing, "data.eval", limit_tokens=n * d.n_ctx), n)


class ShuffledBatches:
    """Batches of sequences in a seeded order, reshuffled every epoch.

    The position (``epoch``, ``index``) is the whole state: restoring it resumes the exact order."""

    def __init__(self, sequences, batch_size: int, seed: int):
        if isinstance(sequences, torch.Tensor):
            sequences = TensorSequences(sequences)
        if len(sequences) < batch_size:
            raise E2EDictError(f"data has {len(sequences)} sequences, fewer than one batch of {batch_size}")
        self.sequences, self.batch_size, self.seed = sequences, batch_size, seed
        self.epoch, self.index = 0, 0
        self._order = self._make_order()

    def _make_order(self) -> np.ndarray:
        n = len(self.sequences)
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
        return self.sequences.take(idx)


class BufferedStreamBatches:
    """Batches from a `SequenceStream`, shuffled through a seeded buffer, restarted every epoch.

    The state is the same (``epoch``, ``index``); restoring it reads the stream again up to
    ``index`` (shards made by ``e2edict tokenize`` resume without that)."""

    def __init__(self, stream: SequenceStream, batch_size: int, seed: int, buffer: int = 10_000):
        self.stream, self.batch_size, self.seed, self.buffer = stream, batch_size, seed, buffer
        self.epoch, self.index = 0, 0
        self._it = self._start()

    def _shuffled(self) -> Iterator[np.ndarray]:
        rng = np.random.default_rng([self.seed, self.epoch])
        pool: list[np.ndarray] = []
        for seq in self.stream.iterate():
            if len(pool) < self.buffer:
                pool.append(seq)
                continue
            j = int(rng.integers(len(pool)))
            yield pool[j]
            pool[j] = seq
        for j in rng.permutation(len(pool)):
            yield pool[j]

    def _start(self) -> Iterator[np.ndarray]:
        it = self._shuffled()
        for _ in itertools.islice(it, self.index):
            pass
        return it

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._it = self._start()

    def next(self) -> torch.Tensor:
        rows = list(itertools.islice(self._it, self.batch_size))
        if len(rows) < self.batch_size:
            if self.index == 0:
                raise E2EDictError(f"data.train gave {len(rows)} sequences, fewer than one batch of {self.batch_size}")
            self.epoch, self.index = self.epoch + 1, 0
            self._it = self._start()
            return self.next()
        self.index += self.batch_size
        return torch.from_numpy(np.stack(rows))


def make_batches(train, batch_size: int, seed: int, shuffle_buffer: int = 10_000):
    """The training batch source for a random-access set or a stream."""
    if isinstance(train, SequenceStream):
        return BufferedStreamBatches(train, batch_size, seed, shuffle_buffer)
    return ShuffledBatches(train, batch_size, seed)


class Prefetcher:
    """Builds the next batches in a background thread so the step never waits for data
    (tokenizing a streamed source, gathering from memory-mapped shards, pinning for the GPU).

    ``state()`` is the position after the batches *handed out*, not those prepared ahead, so a
    checkpoint resumes exactly where training was."""

    def __init__(self, batches, depth: int = 4, pin_memory: bool = False):
        import queue
        import threading

        self.batches, self.pin = batches, pin_memory
        self._state = batches.state()
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="e2edict-prefetch", daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        try:
            while not self._stop.is_set():
                b = self.batches.next()
                if self.pin:
                    b = b.pin_memory()
                self._put((b, self.batches.state()))
        except BaseException as e:  # handed to the consumer, which raises it
            self._put(e)

    def _put(self, item) -> None:
        import queue

        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def next(self) -> torch.Tensor:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        batch, self._state = item
        return batch

    def state(self) -> dict[str, int]:
        return dict(self._state)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
