"""Shared fixtures. Everything is offline: the embedded model, or tiny models built in code."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_model():
    import e2edict

    return e2edict.load_model("tiny")


@pytest.fixture(scope="session")
def small_gpt2_dir(tmp_path_factory):
    """A randomly initialised 3-layer GPT-2 (d_model 32) with the embedded tokenizer, in HF format."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from e2edict.assets import TINY_MODEL_DIR

    torch.manual_seed(1234)
    cfg = GPT2Config(
        vocab_size=4096,
        n_positions=32,
        n_embd=32,
        n_layer=3,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    path = tmp_path_factory.mktemp("small_gpt2")
    GPT2LMHeadModel(cfg).save_pretrained(path, safe_serialization=True)
    AutoTokenizer.from_pretrained(TINY_MODEL_DIR).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def small_backbone(small_gpt2_dir):
    from e2edict.backbones import TLBackbone, load_hooked_transformer

    return TLBackbone(load_hooked_transformer(str(small_gpt2_dir)), "small")
