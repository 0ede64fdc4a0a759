"""Autointerp against a real HTTP server on localhost that speaks OpenAI's chat-completions
protocol and answers from a deterministic policy: an oracle, "None", a 429, a timeout, a
malformed answer, the cache, a refused connection."""


import pytest
import torch
from support import Server

from e2edict.errors import E2EDictError
from e2edict.interpret.autointerp import AutointerpConfig, Cache, run_autointerp
from e2edict.interpret.contexts import collect_examples

TOKENS = 30


def fires(x: torch.Tensor) -> torch.Tensor:
    """Latent i fires (1.0) exactly on token 3 + i."""
    a = torch.stack([(x == 3 + i).float() for i in range(3)], -1)
    a[:, 0] = 0.0
    return a


def tokens_of(ids):
    return [f" [{i}]" for i in ids]


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    seqs = torch.randint(0, TOKENS, (60, 40), generator=g)
    seqs[:, 0] = 0
    ex = collect_examples(fires, seqs, 3, 12, 7, 10, 16, seed=0)
    return seqs, ex


def run(server_url, data, cache, **kw):
    seqs, ex = data
    cfg = AutointerpConfig(
        url=server_url, model="judge", concurrency=4, timeout=kw.pop("timeout", 5.0), retries=kw.pop("retries", 3)
    )
    return run_autointerp(fires, seqs, ex, [10, 11, 12], tokens_of, cfg, cache, quiet=True)


def test_oracle_scores_one_and_rerun_makes_no_call(data, tmp_path):
    srv = Server("oracle")
    try:
        cache = Cache(tmp_path / "cache.jsonl")
        r = run(srv.url, data, cache)
        assert r["latents_scored"] == 3 and r["score"] == 1.0 and r["calls_made"] == 6
        assert r["per_latent"]["10"]["explanation"] == "[3]"
        again = run(srv.url, data, Cache(tmp_path / "cache.jsonl"))
        assert again["calls_made"] == 0 and again["per_latent"] == r["per_latent"]
        assert srv.requests == 6
    finally:
        srv.close()


def test_none_scores_the_fraction_of_windows_that_do_not_fire(data, tmp_path):
    srv = Server("none")
    try:
        r = run(srv.url, data, Cache(tmp_path / "c.jsonl"))
        for entry in r["per_latent"].values():
            assert entry["score"] == pytest.approx(1 - entry["n_active"] / 14)
            assert 4 <= entry["n_active"] < 14  # top and sampled windows fire; some random ones do not
    finally:
        srv.close()


def test_a_429_is_retried(data, tmp_path):
    srv = Server("oracle", fail_first=429)
    try:
        r = run(srv.url, data, Cache(tmp_path / "c.jsonl"))
        assert r["score"] == 1.0 and srv.requests == 7
    finally:
        srv.close()


def test_a_timeout_is_retried(data, tmp_path):
    srv = Server("oracle", delay_first=2.0)
    try:
        r = run(srv.url, data, Cache(tmp_path / "c.jsonl"), timeout=0.5)
        assert r["score"] == 1.0 and r["latents_scored"] == 3
    finally:
        srv.close()


def test_a_malformed_answer_leaves_that_latent_out_and_keeps_the_rest(data, tmp_path, capsys):
    srv = Server("malformed")
    try:
        seqs, ex = data
        cfg = AutointerpConfig(url=srv.url, model="judge", concurrency=2)
        r = run_autointerp(fires, seqs, ex, [10, 11, 12], tokens_of, cfg, Cache(tmp_path / "c.jsonl"))
        assert r["malformed"] == 1 and r["latents_scored"] == 2 and r["score"] == 1.0
        assert "error" in r["per_latent"]["10"]
        err = capsys.readouterr().err.strip().splitlines()
        assert any("1 malformed answer" in line for line in err)
    finally:
        srv.close()


def test_a_refused_connection_is_one_line_and_the_cache_survives(data, tmp_path):
    srv = Server("oracle")
    cache_file = tmp_path / "c.jsonl"
    try:
        run(srv.url, data, Cache(cache_file))
    finally:
        srv.close()
    lines = cache_file.read_text().splitlines()
    assert len(lines) == 6
    srv2 = Server("oracle")
    url = srv2.url
    srv2.close()
    srv2.httpd.server_close()
    seqs, ex = data
    ex.rand_at[0, 0] = torch.tensor([1, 5])  # a different prompt: a call the cache cannot answer
    with pytest.raises(E2EDictError, match=r"^autointerp: the endpoint .* failed \(APIConnectionError"):
        run(url, data, Cache(cache_file), retries=0)
    assert cache_file.read_text().splitlines()[:6] == lines
