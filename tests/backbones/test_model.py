"""The embedded tiny model: both loading routes, the tokenizer, and the model card's numbers."""

import json
import re

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import e2edict
from e2edict.assets import TINY_MODEL_DIR
from e2edict.corpus import corpus_split
from e2edict.sources import encode_texts
from e2edict.sources import pack_stream as to_sequences

STATS = json.loads((TINY_MODEL_DIR / "training_stats.json").read_text())


@pytest.fixture(scope="module")
def val_seqs():
    val = np.load(TINY_MODEL_DIR / "val_tokens.npy", allow_pickle=False).astype(np.int64)
    return to_sequences(val, 128, 0)


def test_architecture_meets_the_floor():
    cfg = json.loads((TINY_MODEL_DIR / "config.json").read_text())
    assert cfg["architectures"] == ["GPT2LMHeadModel"]
    assert cfg["n_layer"] >= 4 and cfg["n_embd"] >= 128 and cfg["n_positions"] >= 128 and cfg["vocab_size"] == 4096


def test_both_routes_give_equal_logits(tiny_model, val_seqs):
    hf = AutoModelForCausalLM.from_pretrained(TINY_MODEL_DIR)
    hf.eval()
    x = val_seqs[:4]
    with torch.no_grad():
        torch.testing.assert_close(tiny_model(x), hf(x).logits, atol=1e-4, rtol=1e-4)
    names = set(tiny_model.hook_dict)
    for n in ("blocks.0.hook_resid_pre", "blocks.3.hook_resid_post", "blocks.1.hook_mlp_out", "blocks.2.hook_attn_out"):
        assert n in names


def test_conversion_works_for_any_gpt2_folder(small_gpt2_dir):
    tl = e2edict.load_model(str(small_gpt2_dir))
    hf = AutoModelForCausalLM.from_pretrained(small_gpt2_dir)
    x = torch.randint(0, 4096, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(tl(x), hf(x).logits, atol=1e-5, rtol=1e-5)
    # hidden states at hook points equal the HF model's (no weight processing)
    _, cache = tl.run_with_cache(x)
    with torch.no_grad():
        hs = hf(x, output_hidden_states=True).hidden_states
    torch.testing.assert_close(cache["blocks.1.hook_resid_pre"], hs[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "text",
    [
        "It is a truth universally acknowledged, that a single man...",
        "  leading spaces\n\nand blank lines\ttabs",
        "naïve café — “quotes” 日本",
    ],
)
def test_tokenizer_round_trips(text):
    tok = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    assert len(tok) == 4096
    assert tok.bos_token == tok.eos_token == "<|endoftext|>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text


def test_shipped_heldout_stream_is_the_heldout_text():
    tok = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    shipped = np.load(TINY_MODEL_DIR / "val_tokens.npy", allow_pickle=False).astype(np.int64)
    np.testing.assert_array_equal(shipped, encode_texts(tok, corpus_split("val")))
    assert STATS["heldout_tokens"] == len(shipped)


@pytest.mark.slow
def test_heldout_loss_matches_card_and_beats_unigram_entropy(tiny_model, val_seqs):
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(val_seqs), 128):
            x = val_seqs[i : i + 128]
            lp = torch.log_softmax(tiny_model(x)[:, :-1], -1)
            total -= lp.gather(-1, x[:, 1:, None]).sum().item()
            count += x[:, 1:].numel()
    loss = total / count
    stream = np.load(TINY_MODEL_DIR / "val_tokens.npy").astype(np.int64)
    p = np.bincount(stream, minlength=4096) / len(stream)
    entropy = float(-(p[p > 0] * np.log(p[p > 0])).sum())
    assert loss == pytest.approx(STATS["heldout_loss"], abs=2e-3)
    assert entropy == pytest.approx(STATS["heldout_unigram_entropy"], abs=1e-3)
    assert loss < entropy - 1.0
    card = (TINY_MODEL_DIR / "README.md").read_text()
    assert re.search(rf"held-out loss[^|]*\| {STATS['heldout_loss']:.4f}", card)
    assert f"{STATS['heldout_unigram_entropy']:.4f}" in card
