"""Helpers more than one test folder uses: the command line in a subprocess, a local
chat-completions server, a checkpoint in the reference implementation's layout."""

import json
import os
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
import yaml
from conftest import ROOT


def run_cli(*args, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    return subprocess.run(
        [sys.executable, "-m", "e2edict", *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd or ROOT, timeout=900
    )


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


def reference_checkpoint(tmp_path, prefix="saes."):
    torch.manual_seed(0)
    d, n = 16, 64
    state = {
        f"{prefix}blocks-1-hook_resid_pre.encoder.0.weight": torch.randn(n, d),
        f"{prefix}blocks-1-hook_resid_pre.encoder.0.bias": torch.randn(n) * 0.1,
        f"{prefix}blocks-1-hook_resid_pre.decoder.weight": torch.randn(d, n) * 3,  # columns not unit-norm
        f"{prefix}blocks-1-hook_resid_pre.decoder.bias": torch.randn(d),
    }
    torch.save(state, tmp_path / "samples_400000.pt")
    (tmp_path / "final_config.yaml").write_text(
        yaml.safe_dump(
            {
                "tlens_model_name": "gpt2",
                "saes": {"dict_size_to_input_ratio": 4.0, "sae_positions": ["blocks.1.hook_resid_pre"]},
                "loss": {"sparsity": {"coeff": 3.0, "p_norm": 1.0}, "logits_kl": {"coeff": 1.0}},
                "train_data": {"n_ctx": 1024},
            }
        )
    )
    return state
