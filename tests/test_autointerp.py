"""Autointerp against a real HTTP server on localhost that speaks OpenAI's chat-completions
protocol and answers from a deterministic policy: an oracle, "None", a 429, a timeout, a
malformed answer, the cache, a refused connection."""

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

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


class Server:
    """Chat completions: the explanation names the first marked token; scoring answers follow ``policy``."""

    def __init__(self, policy="oracle", fail_first=None, delay_first=0.0):
        self.policy, self.fail_first, self.delay_first = policy, fail_first, delay_first
        self.requests = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    outer.requests += 1
                    n = outer.requests
                if n == 1 and outer.delay_first:
                    time.sleep(outer.delay_first)
                if n == 1 and outer.fail_first:
                    self.send_response(outer.fail_first)
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    self.wfile.write(b'{"error": {"message": "slow down", "type": "rate_limit"}}')
                    return
                text = outer.answer(body["messages"])
                out = {
                    "id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                }  # fmt: skip
                data = json.dumps(out).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def answer(self, messages):
        user = messages[-1]["content"]
        if user.startswith("The activating documents"):
            return f"This neuron activates on {re.search(r'<<(.*?)>>', user).group(1).strip()}."
        explanation = re.search(r"fires on (.*?)\.\n", user).group(1)
        if self.policy == "none":
            return "None"
        if self.policy == "malformed" and explanation == "[3]":
            return "I think maybe three"
        lines = re.findall(r"^(\d+)\. (.*)$", user, flags=re.M)
        return ", ".join(n for n, text in lines if explanation in text) or "None"

    def close(self):
        self.httpd.shutdown()


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
