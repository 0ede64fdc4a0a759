"""Data sources (files, globs, Hugging Face datasets on disk, shards), packing, shuffling,
streaming resume and the disjointness of held-out eval data. All offline: the test writes its data."""

import json

import numpy as np
import pytest
import torch
from conftest import ROOT
from support import run_cli

from e2edict.backbones import TLBackbone
from e2edict.config import config_from_dict
from e2edict.data import (
    BufferedStreamBatches,
    SequenceStream,
    ShuffledBatches,
    build_data,
    make_batches,
    open_sequences,
)
from e2edict.errors import E2EDictError
from e2edict.shards import ShardSequences
from e2edict.sources import encode_texts
from e2edict.sources import pack_stream as to_sequences

N_CTX = 16


@pytest.fixture(scope="module")
def bb(tiny_model):
    return TLBackbone(tiny_model, "tiny")


@pytest.fixture(scope="module")
def docs():
    rng = np.random.default_rng(0)
    words = ["river", "stone", "light", "king", "table", "north", "green", "voice", "sand", "iron", "bread", "wind"]
    return [f"Document {i}. " + " ".join(rng.choice(words, size=int(rng.integers(5, 60)))) for i in range(120)]


def expected(bb, docs, n_ctx=N_CTX):
    """The independent reference: documents joined with BOS before each, cut into BOS + n_ctx-1 windows."""
    return to_sequences(encode_texts(bb.tokenizer, docs), n_ctx, bb.bos_token_id)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def cfg_for(train, eval_="tiny-val", **data):
    return config_from_dict(
        {
            "data": {"train": train, "eval": eval_, "n_ctx": N_CTX, **data},
            "saes": {"positions": ["blocks.2.hook_resid_pre"]},
            "eval": {"tokens": 256, "alive_tokens": 256, "during_training_tokens": 256},
        }
    )


def all_rows(src):
    return src.take(np.arange(len(src)))


def test_text_files_jsonl_and_glob_pack_as_the_reference(bb, docs, tmp_path):
    (tmp_path / "a.txt").write_text(docs[0])
    got = all_rows(open_sequences(str(tmp_path / "a.txt"), bb, N_CTX, "auto", "t"))
    torch.testing.assert_close(got, expected(bb, docs[:1]))
    write_jsonl(tmp_path / "part-0.jsonl", [{"text": d, "id": i} for i, d in enumerate(docs[:60])])
    write_jsonl(tmp_path / "part-1.jsonl", [{"text": d} for d in docs[60:]])
    got = all_rows(open_sequences(str(tmp_path / "part-*.jsonl"), bb, N_CTX, "auto", "t"))
    torch.testing.assert_close(got, expected(bb, docs))


def test_parquet_text_and_token_rows(bb, docs, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": docs, "n": list(range(len(docs)))}), tmp_path / "d.parquet")
    got = all_rows(open_sequences(str(tmp_path / "d.parquet"), bb, N_CTX, "auto", "t"))
    torch.testing.assert_close(got, expected(bb, docs))
    rows = [list(range(i, i + 20)) for i in range(10)] + [[1, 2, 3]]  # the last row is too short
    pq.write_table(pa.table({"input_ids": rows}), tmp_path / "tok.parquet")
    got = all_rows(open_sequences(str(tmp_path / "tok.parquet"), bb, N_CTX, "auto", "t"))  # auto -> rows
    torch.testing.assert_close(got, torch.tensor([r[:N_CTX] for r in rows[:10]]))
    got = all_rows(open_sequences(str(tmp_path / "tok.parquet"), bb, N_CTX, "bos", "t"))  # concatenated
    flat = np.concatenate(rows)
    torch.testing.assert_close(got, to_sequences(flat, N_CTX, bb.bos_token_id))


def test_hf_dataset_on_disk_folder_and_streaming_agree(bb, docs, tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"text": docs})
    ds.save_to_disk(str(tmp_path / "saved"))
    ref = expected(bb, docs)
    got = all_rows(open_sequences(str(tmp_path / "saved"), bb, N_CTX, "auto", "t"))
    torch.testing.assert_close(got, ref)
    spec = {"path": str(tmp_path / "saved"), "streaming": True}
    cfg = cfg_for(spec)
    stream = open_sequences(cfg.data.train, bb, N_CTX, "auto", "t")
    assert isinstance(stream, SequenceStream)
    torch.testing.assert_close(stream.first_rows(len(ref) + 5), ref)
    # A folder of data files goes through `datasets.load_dataset` (the route of hub names), streaming or not.
    (tmp_path / "files").mkdir()
    ds.to_parquet(str(tmp_path / "files" / "train-00000.parquet"))
    got = all_rows(open_sequences(str(tmp_path / "files"), bb, N_CTX, "auto", "t"))
    torch.testing.assert_close(got, ref)
    spec = cfg_for({"path": str(tmp_path / "files"), "streaming": True}).data.train
    torch.testing.assert_close(open_sequences(spec, bb, N_CTX, "auto", "t").first_rows(10_000), ref)
    # DatasetDict with splits, and a pretokenized input_ids column (rows packing).
    dd = datasets.DatasetDict({"train": ds, "validation": datasets.Dataset.from_dict({"input_ids": [list(range(1, 40))] * 3})})
    dd.save_to_disk(str(tmp_path / "dd"))
    spec = cfg_for({"path": str(tmp_path / "dd"), "split": "validation"}).data.train
    got = all_rows(open_sequences(spec, bb, N_CTX, "auto", "t"))
    torch.testing.assert_close(got, torch.arange(1, N_CTX + 1).repeat(3, 1))
    with pytest.raises(E2EDictError, match="no split 'test'"):
        open_sequences(cfg_for({"path": str(tmp_path / "dd"), "split": "test"}).data.train, bb, N_CTX, "auto", "t")


def test_bad_sources_are_one_line_errors(bb, tmp_path):
    write_jsonl(tmp_path / "x.jsonl", [{"body": "no text key"}])
    with pytest.raises(E2EDictError, match="no 'text' or 'input_ids' column"):
        open_sequences(str(tmp_path / "x.jsonl"), bb, N_CTX, "auto", "data.train")
    (tmp_path / "y.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(E2EDictError, match="line 2 is not JSON"):
        open_sequences(str(tmp_path / "y.jsonl"), bb, N_CTX, "auto", "data.train")
    with pytest.raises(E2EDictError, match="no file matches"):
        open_sequences(str(tmp_path / "none-*.txt"), bb, N_CTX, "auto", "data.train")
    (tmp_path / "z.csv").write_text("a,b\n")
    with pytest.raises(E2EDictError, match="unsupported type"):
        open_sequences(str(tmp_path / "z.csv"), bb, N_CTX, "auto", "data.train")
    write_jsonl(tmp_path / "big.jsonl", [{"input_ids": [1, 99999] * 10}])
    with pytest.raises(E2EDictError, match=r"token ids must lie in \[0, 4096\)"):
        open_sequences(str(tmp_path / "big.jsonl"), bb, N_CTX, "auto", "data.train")
    write_jsonl(tmp_path / "t.jsonl", [{"text": "words"}])
    with pytest.raises(E2EDictError, match="packing 'rows' needs token rows"):
        open_sequences(str(tmp_path / "t.jsonl"), bb, N_CTX, "rows", "data.train")
    with pytest.raises(E2EDictError, match="cannot open dataset"):  # a hub name, offline
        open_sequences("someone/not-a-dataset", bb, N_CTX, "auto", "data.train")


def test_holdout_is_disjoint_from_training(bb, docs, tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in docs])
    for streaming in (False, True):
        cfg = cfg_for({"path": str(tmp_path / "d.jsonl"), "streaming": streaming}, "holdout", holdout_tokens=20 * N_CTX)
        train, eval_seqs = build_data(cfg, bb)
        ref = expected(bb, docs)
        assert len(eval_seqs) == 20
        torch.testing.assert_close(eval_seqs, ref[:20])  # the head of the source, before shuffling
        batches = make_batches(train, 4, seed=0, shuffle_buffer=8)
        seen = torch.cat([batches.next() for _ in range(2 * (len(ref) - 20) // 4)])  # two epochs
        held = {tuple(r.tolist()) for r in eval_seqs}
        trained = {tuple(r.tolist()) for r in seen}
        assert not held & trained
        assert trained <= {tuple(r.tolist()) for r in ref[20:]}
        assert len(trained) >= 4 * ((len(ref) - 20) // 4)  # a whole epoch's worth of distinct rows


def test_one_source_for_both_needs_holdout():
    with pytest.raises(E2EDictError, match="same source as data.train"):
        cfg_for("tiny", "tiny")
    cfg = cfg_for("tiny", "holdout")
    assert cfg.data.holdout_tokens == 256  # max(eval.tokens, eval.alive_tokens), recorded in the config
    with pytest.raises(E2EDictError, match="holdout_tokens applies only"):
        cfg_for("tiny", "tiny-val", holdout_tokens=100)


def test_shuffling_is_deterministic_and_streams_resume_exactly(bb, docs, tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in docs])
    spec = cfg_for({"path": str(tmp_path / "d.jsonl"), "streaming": True}).data.train
    stream = open_sequences(spec, bb, N_CTX, "auto", "t")

    def run(seed, n):
        b = BufferedStreamBatches(stream, 4, seed, buffer=16)
        return [b.next() for _ in range(n)], b

    per_epoch = len(expected(bb, docs)) // 4
    n, cut = per_epoch + 15, per_epoch + 5
    a, b = run(0, n)
    again, _ = run(0, n)
    other, _ = run(1, n)
    assert all(torch.equal(x, y) for x, y in zip(a, again, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, other, strict=True))
    # Interrupt past an epoch boundary, restore the state, continue.
    part, interrupted = run(0, cut)
    resumed = BufferedStreamBatches(stream, 4, 0, buffer=16)
    resumed.load_state(json.loads(json.dumps(interrupted.state())))
    rest = [resumed.next() for _ in range(n - cut)]
    assert all(torch.equal(x, y) for x, y in zip(part + rest, a, strict=True))
    assert b.epoch >= 1  # the run crossed an epoch boundary
    # The first epoch draws distinct rows of the source, in a shuffled order.
    ref = [tuple(r) for r in expected(bb, docs).tolist()]
    epoch0 = [tuple(r) for r in torch.cat(a[: len(ref) // 4]).tolist()]
    assert len(set(epoch0)) == len(epoch0) and set(epoch0) <= set(ref) and epoch0 != ref[: len(epoch0)]


@pytest.mark.slow
def test_tokenize_shards_random_access_and_resume(bb, docs, tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in docs])
    out = tmp_path / "shards"
    r = run_cli("tokenize", tmp_path / "d.jsonl", "--model", "tiny", "--ctx", N_CTX, "--out", out, "--shard-rows", 50)
    assert r.returncode == 0, r.stderr
    ref = expected(bb, docs)
    m = json.loads((out / "manifest.json").read_text())
    assert m["sequences"] == len(ref) and len(m["shards"]) == -(-len(ref) // 50) and m["dtype"] == "uint16"
    shards = ShardSequences(out)
    shards.verify()
    idx = np.array([len(ref) - 1, 0, 51, 49, 50, 7])
    torch.testing.assert_close(shards.take(idx), ref[idx])
    view = open_sequences(str(out), bb, N_CTX, "auto", "t")
    torch.testing.assert_close(view.take(np.arange(len(view))), ref)
    torch.testing.assert_close(open_sequences(str(out), bb, 8, "auto", "t").take(np.array([3])), ref[3:4, :8])
    # Resume: a fresh ShuffledBatches restored to a saved state yields exactly the remaining batches.
    full = ShuffledBatches(view, 4, seed=3)
    seq = [full.next() for _ in range(30)]
    part = ShuffledBatches(view, 4, seed=3)
    for _ in range(12):
        part.next()
    again = ShuffledBatches(open_sequences(str(out), bb, N_CTX, "auto", "t"), 4, seed=3)
    again.load_state(part.state())
    assert all(torch.equal(x, again.next()) for x in seq[12:])
    # The run directory refuses to be overwritten, and the folder is never left half-written.
    r = run_cli("tokenize", tmp_path / "d.jsonl", "--model", "tiny", "--ctx", N_CTX, "--out", out)
    assert r.returncode == 2 and "--overwrite" in r.stderr
    r = run_cli("tokenize", tmp_path / "missing.jsonl", "--model", "tiny", "--ctx", N_CTX, "--out", tmp_path / "new")
    assert r.returncode == 2 and not (tmp_path / "new").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_damaged_or_foreign_shards_are_refused(bb, tmp_path):
    out = tmp_path / "s"
    r = run_cli("tokenize", "tiny-val", "--model", "tiny", "--ctx", N_CTX, "--out", out, "--shard-rows", 4000)
    assert r.returncode == 0, r.stderr
    with pytest.raises(E2EDictError, match="shorter than data.n_ctx"):
        open_sequences(str(out), bb, 32, "auto", "t")
    with pytest.raises(E2EDictError, match="packed 'bos'"):
        open_sequences(str(out), bb, N_CTX, "rows", "t")
    m = json.loads((out / "manifest.json").read_text())
    bad = dict(m, tokenizer_sha256="0" * 64)
    (out / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(E2EDictError, match="made with tokenizer"):
        open_sequences(str(out), bb, N_CTX, "auto", "t")
    bad = dict(m, shards=[dict(m["shards"][0], file="../escape.npy")] + m["shards"][1:])
    (out / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(E2EDictError, match="outside the shard naming scheme"):
        ShardSequences(out)
    (out / "manifest.json").write_text(json.dumps(m))
    first = out / m["shards"][0]["file"]
    first.write_bytes(first.read_bytes()[:-100])
    with pytest.raises(E2EDictError, match="missing or damaged"):
        ShardSequences(out)
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(E2EDictError, match="unreadable manifest.json"):
        ShardSequences(out)


def _rewind_and_resume(run, hook):
    """Keep only the oldest checkpoint of a finished run, resume, and return (before, after) weights."""
    import shutil

    from safetensors.torch import load_file

    before = load_file(str(run / "saes" / hook / "sae_weights.safetensors"))
    ckpts = sorted((run / "checkpoints").glob("step_*"))
    assert len(ckpts) >= 2
    for c in ckpts[1:]:
        shutil.rmtree(c)
    (run / "eval.json").unlink()
    r = run_cli("train", "--resume", run, "--quiet")
    assert r.returncode == 0 and "resuming" in r.stderr, r.stderr
    return before, load_file(str(run / "saes" / hook / "sae_weights.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["stream", "shards"])
def test_cli_trains_with_holdout_and_resumes_exactly(docs, tmp_path, kind):
    import datasets

    datasets.Dataset.from_dict({"text": docs * 2}).save_to_disk(str(tmp_path / "ds"))
    if kind == "shards":
        shards = tmp_path / "shards"
        r = run_cli("tokenize", tmp_path / "ds", "--model", "tiny", "--ctx", 32, "--out", shards, "--shard-rows", 100)
        assert r.returncode == 0, r.stderr
        train = f"data.train={shards}"
    else:
        train = f"data.train={{path: {tmp_path / 'ds'}, streaming: true}}"
    out = tmp_path / "run"
    r = run_cli(
        "train",
        ROOT / "configs/tiny/e2e.yaml",
        "--out",
        out,
        train,
        "data.eval=holdout",
        "data.n_ctx=32",
        "data.shuffle_buffer=64",
        "train.batch_size=4",
        "train.tokens=6144",
        "train.checkpoint_every_tokens=1024",
        "train.keep_checkpoints=4",
        "eval.tokens=512",
        "eval.alive_tokens=512",
        "eval.during_training_tokens=512",
        "--quiet",
    )
    assert r.returncode == 0, r.stderr
    saved = (out / "config.yaml").read_text()
    assert "holdout_tokens: 512" in saved and "eval: holdout" in saved
    assert json.loads((out / "eval.json").read_text())["tokens"] == 512
    before, after = _rewind_and_resume(out, "blocks.2.hook_resid_pre")
    assert before.keys() == after.keys() and all(before[k].equal(after[k]) for k in before)


def test_prefetcher_hands_out_the_same_batches_and_states(bb, docs, tmp_path):
    from e2edict.data import Prefetcher, TensorSequences

    seqs = TensorSequences(expected(bb, docs))
    direct = ShuffledBatches(seqs, 4, seed=5)
    ahead = Prefetcher(ShuffledBatches(seqs, 4, seed=5), depth=3)
    try:
        for _ in range(len(seqs) // 4 + 7):  # across an epoch boundary
            assert torch.equal(direct.next(), ahead.next())
            assert ahead.state() == direct.state()  # the position handed out, not the one prepared ahead
    finally:
        ahead.close()

    class Failing:
        def __init__(self):
            self.n = 0

        def state(self):
            return {"epoch": 0, "index": self.n}

        def next(self):
            self.n += 1
            if self.n == 3:
                raise E2EDictError("data.train: broken record")
            return torch.zeros(1)

    p = Prefetcher(Failing())
    try:
        p.next(), p.next()
        with pytest.raises(E2EDictError, match="broken record"):
            p.next()
    finally:
        p.close()
