"""Shared fixtures. Everything is offline: the embedded model, or tiny models built in code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import pytest  # noqa: E402
import torch  # noqa: E402

# Under pytest-xdist (`-n N`) each worker gets its share of the cores, at most 2 threads (one each
# on 2 cores with 2 workers).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))


@pytest.fixture(scope="session")
def tiny_model():
    import e2edict

    return e2edict.load_model("tiny")


# --- helpers shared by the test files (import them: `from conftest import ENV, cli_cmd`) ---------
ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}  # for child processes


def cli_cmd(*args) -> list[str]:
    """The `e2edict` command line run by this interpreter."""
    return [sys.executable, "-m", "e2edict", *map(str, args)]


def sae_weights(run_dir: Path, hook: str = "blocks.1.hook_resid_pre") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "saes" / hook / "sae_weights.safetensors"))


def logged_steps(run_dir: Path, split: str = "train") -> list[int]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if r["split"] == split]


def random_gpt2(seed: int = 1234, **config):
    """A randomly initialised GPT-2 (no dropout) from ``GPT2Config`` keys: the one builder of test models."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(**{"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, **config})
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="session")
def small_gpt2_dir(tmp_path_factory):
    """A randomly initialised 3-layer GPT-2 (d_model 32) with the embedded tokenizer, in HF format."""
    from transformers import AutoTokenizer

    from e2edict.assets import TINY_MODEL_DIR

    model = random_gpt2(1234, vocab_size=4096, n_positions=32, n_embd=32, n_layer=3, n_head=4, bos_token_id=0, eos_token_id=0)
    path = tmp_path_factory.mktemp("small_gpt2")
    model.save_pretrained(path, safe_serialization=True)
    AutoTokenizer.from_pretrained(TINY_MODEL_DIR).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def small_backbone(small_gpt2_dir):
    from e2edict.backbones import TLBackbone, load_hooked_transformer

    return TLBackbone(load_hooked_transformer(str(small_gpt2_dir)), "small")


CIRCUIT_TRACER = "circuit-tracer==0.5.0"  # the newest on PyPI: ReLU and JumpReLU transcoders (TopK came later)


def circuit_tracer_python():
    """A virtual environment with circuit-tracer (installed without its pinned dependencies,
    reading this environment's torch, safetensors and yaml through a .pth file), made once in out/."""
    import fcntl
    import sysconfig

    venv = ROOT / "out" / "venv-circuit-tracer"
    python = venv / "bin" / "python"
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / "venv-circuit-tracer.lock", "w") as lock:  # test workers make it once
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (venv / "ok").is_file():
            subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
            site = next((venv / "lib").glob("python*/site-packages"))
            (site / "e2edict-env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
            pip = [str(python), "-m", "pip", "install", "-q", "--no-deps", CIRCUIT_TRACER]
            subprocess.run(pip, check=True, timeout=600)
            (venv / "ok").write_text(CIRCUIT_TRACER)
    return python
