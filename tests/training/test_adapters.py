"""Adapters around SAEs (LoRA on the model, Chen, Engels & Tegmark 2025): exact at initialisation,
the TransformerLens parametrization against an explicit merged weight, peft's own loader on the
saved files, the shared-prefix step against a naive two-pass computation, held SAEs, bf16, eval.json,
exact resume and the refusals of bad configs."""

import csv
import json
import signal
import subprocess
import time

import pytest
import torch
from conftest import ENV, ROOT, cli_cmd, sae_weights
from safetensors.torch import load_file

from e2edict.adapters import attach_adapter, load_adapter
from e2edict.adapters.transformer_lens import in_out
from e2edict.backbones import HFBackbone, TLBackbone, load_hf_causal_lm, load_hooked_transformer
from e2edict.config import AdapterConfig
from e2edict.losses import kl_loss
from e2edict.saes import load_sae, registry, save_sae
from e2edict.splice import LossWeights, training_forward

TL_HOOK, HF_HOOK = "blocks.1.hook_resid_pre", "transformer.h.1:input"


def tl_backbone(path, dtype=torch.float32):
    return TLBackbone(load_hooked_transformer(str(path), dtype=dtype), "small")


def hf_backbone(path):
    model, tok = load_hf_causal_lm(str(path))
    return HFBackbone(model, tok, "small")


def logits(bb, tokens):
    with torch.no_grad():
        return bb.run_from(bb.embed_to(tokens, 0), 0, {})


def perturb(adapter, seed=0, scale=0.05):
    """Random B (and A): an adapter as after some training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


@pytest.mark.parametrize("backend", ["transformer_lens", "huggingface"])
def test_an_adapter_at_initialisation_leaves_the_logits_bit_identical(small_gpt2_dir, backend):
    bb = tl_backbone(small_gpt2_dir) if backend == "transformer_lens" else hf_backbone(small_gpt2_dir)
    tokens = torch.randint(0, 4096, (2, 16), generator=torch.Generator().manual_seed(1))
    ref = logits(bb, tokens)
    adapter = attach_adapter(bb, AdapterConfig(rank=4, layers="all"), TL_HOOK if backend == "transformer_lens" else HF_HOOK, 0)
    assert all(float(p.detach().abs().sum()) > 0 for n, p in adapter.named_parameters() if "lora_A" in n)  # A drawn
    assert all(float(p.detach().abs().sum()) == 0 for n, p in adapter.named_parameters() if "lora_B" in n)  # B zero
    assert torch.equal(logits(bb, tokens), ref)
    perturb(adapter)
    moved = logits(bb, tokens)
    assert not torch.allclose(moved, ref, atol=1e-3)
    with bb.original():  # the clean run: the original model, bit for bit
        assert torch.equal(logits(bb, tokens), ref)
    assert torch.equal(logits(bb, tokens), moved)


def as_map(weight: str, W: torch.Tensor) -> torch.Tensor:
    """A TransformerLens weight as the [d_in, d_out] matrix of its linear map (x @ it)."""
    d_in, d_out = in_out(weight, tuple(W.shape))
    return W.permute(1, 0, 2).reshape(d_in, d_out) if W.dim() == 3 and weight != "W_O" else W.reshape(d_in, d_out)


def test_transformer_lens_parametrization_equals_an_explicitly_merged_weight_in_float64(small_gpt2_dir):
    bb = tl_backbone(small_gpt2_dir, torch.float64)
    merged = load_hooked_transformer(str(small_gpt2_dir), dtype=torch.float64)  # an unadapted copy to merge into
    adapter = attach_adapter(bb, AdapterConfig(rank=3, alpha=6.0, layers=[0, 2]), TL_HOOK, 0)
    perturb(adapter, scale=0.3)
    assert adapter.blocks == [0, 2] and adapter.scale == 2.0
    with torch.no_grad():
        for name in adapter.targets:
            path, _, weight = name.rpartition(".")
            W = getattr(merged.get_submodule(path), weight)
            A, B = (dict(adapter.named_parameters())[f"{name}.{k}"] for k in ("lora_A", "lora_B"))
            # the adapted map applied to x, as peft computes a LoRA layer: x W + scale * B(A(x))
            xi = torch.randn(7, A.shape[1], dtype=torch.float64)
            want = xi @ as_map(weight, W) + 2.0 * (xi @ A.T) @ B.T
            got_W = getattr(bb.model.get_submodule(path), weight)
            torch.testing.assert_close(xi @ as_map(weight, got_W), want, rtol=1e-12, atol=1e-12)
            W.copy_(got_W)  # merge into the copy
        tokens = torch.randint(0, 4096, (2, 12), generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(logits(bb, tokens), merged(tokens), rtol=1e-10, atol=1e-10)


def test_peft_loads_the_saved_adapter_and_gives_the_same_logits(small_gpt2_dir, tmp_path):
    from peft import PeftModel

    bb = hf_backbone(small_gpt2_dir)
    adapter = attach_adapter(bb, AdapterConfig(rank=4, modules=["attn", "mlp"]), HF_HOOK, 0)
    perturb(adapter)
    tokens = torch.randint(0, 4096, (2, 16), generator=torch.Generator().manual_seed(3))
    ours = logits(bb, tokens)
    adapter.save(tmp_path / "adapter", "small")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (tmp_path / "adapter").iterdir()}
    base, _ = load_hf_causal_lm(str(small_gpt2_dir))
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()  # peft's own loader
    with torch.no_grad():
        theirs = peft_model(input_ids=tokens).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    # and e2edict's loader onto a fresh backbone gives the adapted model exactly
    fresh = hf_backbone(small_gpt2_dir)
    load_adapter(fresh, tmp_path / "adapter")
    assert torch.equal(logits(fresh, tokens), ours)


def test_transformer_lens_adapter_files_round_trip(small_gpt2_dir, tmp_path):
    bb = tl_backbone(small_gpt2_dir)
    adapter = attach_adapter(bb, AdapterConfig(rank=2, modules="mlp"), TL_HOOK, 0)
    perturb(adapter)
    adapter.save(tmp_path / "a", "small")
    tensors = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    names = [f"blocks.{i}.mlp.{w}.{k}" for i in (1, 2) for w in ("W_in", "W_out") for k in ("lora_A", "lora_B")]
    assert sorted(tensors) == sorted(names)
    doc = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert doc["format"] == "e2edict-lora-transformer-lens" and doc["r"] == 2
    fresh = tl_backbone(small_gpt2_dir)
    load_adapter(fresh, tmp_path / "a")
    tokens = torch.randint(0, 4096, (1, 8))
    assert torch.equal(logits(fresh, tokens), logits(bb, tokens))
    with pytest.raises(Exception, match="does not load onto a HFBackbone"):
        load_adapter(hf_backbone(small_gpt2_dir), tmp_path / "a")


def naive_loss(bb, sae, tokens, weights, hook):
    """Two whole forward passes from the tokens, with nothing shared: the original model without
    SAE (clean), the adapted model with the SAE spliced in (spliced)."""
    with torch.no_grad(), bb.original():
        clean = bb.run_from(bb.embed_to(tokens, 0), 0, {})
    got = {}

    def splice(act):
        a_hat, c = sae(act)
        got["in"], got["c"] = act, c
        return a_hat

    spliced = bb.run_from(bb.embed_to(tokens, 0), 0, {hook: splice})
    sparsity = sae.sparsity_loss(got["in"], got["c"], weights.p)
    return weights.kl * kl_loss(clean, spliced) + weights.sparsity[hook] * sparsity


@pytest.mark.parametrize("layers", ["after", "all"])
def test_shared_prefix_loss_and_gradients_equal_a_naive_two_pass_computation(small_gpt2_dir, layers):
    bb = tl_backbone(small_gpt2_dir, torch.float64)
    hook = "blocks.2.hook_resid_pre"
    adapter = attach_adapter(bb, AdapterConfig(rank=3, layers=layers), hook, 0)
    assert adapter.first_block == (2 if layers == "after" else 0)
    perturb(adapter, scale=0.1)
    torch.manual_seed(0)
    sae = registry["relu"](32, 64, hook).double()
    weights = LossWeights(sparsity={hook: 0.2}, kl=1.0)
    tokens = torch.randint(0, 4096, (2, 16), generator=torch.Generator().manual_seed(4))
    params = [*sae.parameters(), *adapter.parameters()]

    def grads(loss):
        for p in params:
            p.grad = None
        loss.backward()
        return [p.grad.clone() for p in params]

    out = training_forward(bb, {hook: sae}, tokens, weights)
    ref = naive_loss(bb, sae, tokens, weights, hook)
    torch.testing.assert_close(out.loss, ref, rtol=1e-10, atol=1e-12)
    ours = grads(out.loss)
    for a, b in zip(ours, grads(naive_loss(bb, sae, tokens, weights, hook)), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)
    assert all(float(g.abs().sum()) > 0 for g in ours[len(list(sae.parameters())) :])  # the adapter is trained


def test_bf16_keeps_the_adapter_in_fp32_and_restores_the_frozen_weights(small_gpt2_dir):
    bb = tl_backbone(small_gpt2_dir)
    adapter = attach_adapter(bb, AdapterConfig(rank=2), TL_HOOK, 0)
    perturb(adapter)
    before = [p.clone() for p in adapter.parameters()]
    bb.cast(torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in adapter.parameters())
    assert bb.model.blocks[0].attn.W_Q.dtype == torch.bfloat16
    tokens = torch.randint(0, 4096, (1, 8))
    lo = logits(bb, tokens)
    bb.restore_dtype()
    adapter.check_base_unchanged()
    assert all(p.equal(q) for p, q in zip(adapter.parameters(), before, strict=True))
    assert (lo.float() - logits(bb, tokens)).abs().max() < 0.5  # the same adapted model, at bf16's precision


def run_cli(*args, timeout=600):
    return subprocess.run(cli_cmd(*args), env=ENV, capture_output=True, text=True, timeout=timeout)


def source_run(tmp_path_factory, model_dir):
    src = tmp_path_factory.mktemp("adapter_src") / "local"
    r = run_cli("train", ROOT / "configs/tiny/local.yaml", *small(model_dir), "train.tokens=4096", "--out", src, "--quiet")
    assert r.returncode == 0, r.stderr
    return src


def small(model_dir):
    return [f"model.name={model_dir}", "data.n_ctx=32", f"saes.positions=[{TL_HOOK}]", "saes.dict_ratio=2",
            "train.batch_size=8", "train.log_every=1", "eval.tokens=1024", "eval.alive_tokens=1024",
            "eval.during_training_tokens=512"]  # fmt: skip


@pytest.fixture(scope="module")
def local_source(tmp_path_factory, small_gpt2_dir):
    return source_run(tmp_path_factory, small_gpt2_dir)


@pytest.mark.slow
def test_held_saes_are_bitwise_unchanged_and_eval_json_has_the_adapter_sections(tmp_path, small_gpt2_dir, local_source):
    run = tmp_path / "run"
    r = run_cli("train", ROOT / "configs/tiny/adapter.yaml", *small(small_gpt2_dir), f"saes.init_from={local_source}",
                "adapter.rank=4", "train.tokens=4096", "train.lr=3e-3", "--out", run, "--quiet")  # fmt: skip
    assert r.returncode == 0, r.stderr
    # the held SAE is the loaded one, bit for bit: its file equals the loaded source saved untouched
    # (a file holds unit decoder rows, so a load-save round trip itself renormalises them once)
    untouched = tmp_path / "untouched"
    save_sae(load_sae(local_source / "saes" / TL_HOOK), untouched)
    src, got = load_file(str(untouched / "sae_weights.safetensors")), sae_weights(run)
    assert src.keys() == got.keys() and all(src[k].equal(got[k]) for k in src)
    ev = json.loads((run / "eval.json").read_text())
    assert ev["adapter"]["base_unchanged"] is True and ev["adapter"]["blocks"] == [1, 2]
    # without the adapter: the source SAE in the original model, as its own evaluation says
    src_ev = json.loads((local_source / "eval.json").read_text())
    assert ev["without_adapter"]["ce_loss_increase"] == pytest.approx(src_ev["ce_loss_increase"], rel=1e-6)
    assert ev["init"]["ce_loss_increase"] == pytest.approx(src_ev["ce_loss_increase"], rel=1e-6)
    # the adapter closed part of the gap, and moved the model itself a little
    assert ev["ce_loss_increase"] < ev["without_adapter"]["ce_loss_increase"]
    assert ev["adapter_alone"]["kl"] > 0 and ev["adapter_alone"]["ce_loss_original"] == pytest.approx(ev["ce_loss_clean"])
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    # `e2edict eval` reads the run's adapter back: the same figures
    r = run_cli("eval", run, "--quiet")
    assert r.returncode == 0, r.stderr
    again = json.loads((run / "eval.json").read_text())
    assert again["ce_loss_increase"] == pytest.approx(ev["ce_loss_increase"], rel=1e-9)
    assert again["adapter_alone"]["kl"] == pytest.approx(ev["adapter_alone"]["kl"], rel=1e-9)
    # compare's adapter columns, and the report's run table
    r = run_cli("compare", run, local_source, "--out", tmp_path / "cmp", "--quiet")
    assert r.returncode == 0, r.stderr
    rows = {row["run"]: row for row in csv.DictReader(open(tmp_path / "cmp" / "runs.csv"))}
    adapted = next(row for row in rows.values() if row["adapter_rank"])
    assert adapted["adapter_rank"] == "4" and float(adapted["adapter_alone_kl"]) == pytest.approx(ev["adapter_alone"]["kl"])
    assert float(adapted["no_adapter_ce_loss_increase"]) == pytest.approx(ev["without_adapter"]["ce_loss_increase"])
    r = run_cli("report", run, "--quiet", "--tokens", "2048")
    assert r.returncode == 0, r.stderr
    assert "adapter_alone.kl" in (run / "report" / "index.html").read_text()


@pytest.mark.slow
def test_sigkill_and_resume_give_bitwise_equal_adapter_and_sae_weights(tmp_path, small_gpt2_dir, local_source):
    args = [ROOT / "configs/tiny/finetune.yaml", *small(small_gpt2_dir), f"saes.init_from={local_source}", "adapter.rank=2",
            "train.tokens=16384", "train.checkpoint_every_tokens=1024", "train.keep_checkpoints=3", "train.lr=1e-3"]  # fmt: skip
    ref, run = tmp_path / "ref", tmp_path / "run"
    r = run_cli("train", *args, "--out", ref, "--quiet")
    assert r.returncode == 0, r.stderr
    proc = subprocess.Popen(cli_cmd("train", *args, "--out", run, "--quiet"), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 300
    while time.time() < deadline and len(list((run / "checkpoints").glob("step_*"))) < 2 and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)
    assert proc.poll() is None, "the run finished before it could be killed; make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    r = run_cli("train", "--resume", run, "--quiet")
    assert r.returncode == 0, r.stderr
    for name in ("adapter/adapter_model.safetensors", f"saes/{TL_HOOK}/sae_weights.safetensors"):
        a, b = load_file(str(ref / name)), load_file(str(run / name))
        assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a), name
    src = sae_weights(local_source)
    assert not all(src[k].equal(sae_weights(run)[k]) for k in src)  # saes.trainable: the SAEs trained too


@pytest.mark.parametrize(
    "override, message",
    [
        ("adapter.rank=0", "adapter.rank: Input should be greater than or equal to 1"),
        ("adapter.rank=33", "adapter.rank=33 exceeds the width of blocks.1.attn.W_Q"),
        ("adapter.layers=[1, 7]", "adapter.layers: block 7 is out of range"),
        ("adapter.modules=[attn, embed]", "adapter.modules.1: Input should be 'attn' or 'mlp'"),
        ("adapter.dropout=0.1", "adapter.dropout: the TransformerLens backbone adapts the weights themselves"),
        ("saes.trainable=false", "saes.trainable is false: the SAEs held fixed come from saes.init_from"),
    ],
)
def test_bad_adapter_configs_end_in_one_line_exit_2_and_write_nothing(tmp_path, small_gpt2_dir, override, message):
    run = tmp_path / "run"
    r = run_cli("train", ROOT / "configs/tiny/e2e.yaml", *small(small_gpt2_dir), "adapter.rank=4", override,
                "train.tokens=2048", "--out", run)  # fmt: skip
    assert r.returncode == 2, r.stderr
    lines = [x for x in r.stderr.strip().splitlines() if not x.startswith("Loading weights")]  # transformers' bar
    assert len(lines) == 1 and lines[0].startswith("e2edict: error: ") and message in lines[0], r.stderr
    assert not run.exists()


def test_an_adapter_needs_the_output_loss_and_a_preset_adapter_needs_an_adapter():
    from e2edict.config import config_from_dict
    from e2edict.errors import E2EDictError

    base = {"saes": {"positions": [TL_HOOK], "init_from": "x"}}
    with pytest.raises(E2EDictError, match="needs loss.kl.coeff or loss.downstream.coeff"):
        config_from_dict({**base, "adapter": {"rank": 2}, "loss": {"preset": "local"}})
    with pytest.raises(E2EDictError, match="add an adapter: block"):
        config_from_dict({**base, "loss": {"preset": "adapter"}})
    cfg = config_from_dict({**base, "adapter": {"rank": 4}, "loss": {"preset": "adapter"}})
    assert cfg.saes.trainable is False and cfg.loss.sparsity.coeff == 0 and cfg.loss.kl.coeff == 1.0
    assert cfg.adapter.alpha == 4.0 and cfg.adapter.layers == "after" and cfg.adapter.modules == ["attn", "mlp"]


def test_peft_installs_beside_sae_lens_and_transformer_lens():
    """One environment holds all three (users use them together): peft's LoRA on a model that
    TransformerLens and sae-lens share, with the versions pyproject.toml allows."""
    from importlib.metadata import version

    import peft
    import sae_lens
    import transformer_lens

    assert peft and sae_lens and transformer_lens
    assert int(version("transformer-lens").split(".")[0]) < 4  # the range sae-lens accepts
    major, minor = (int(x) for x in version("peft").split(".")[:2])
    assert (major, minor) >= (0, 17)


def tiny_family(family: str):
    """A randomly initialised 2-block model of another family, built from its config (offline)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if family == "llama":
        cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
        return LlamaForCausalLM(cfg).eval()
    cfg = GPTNeoXConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=64)  # fmt: skip
    return GPTNeoXForCausalLM(cfg).eval()


@pytest.mark.parametrize(
    "family, attn, mlp",
    [
        ("llama", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
         ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]),
        ("pythia", ["attention.query_key_value", "attention.dense"], ["mlp.dense_h_to_4h", "mlp.dense_4h_to_h"]),
    ],
)  # fmt: skip
def test_hugging_face_targets_per_family_exact_at_init_and_round_trip(tmp_path, family, attn, mlp):
    from peft import PeftModel

    model = tiny_family(family)
    for p in model.parameters():
        p.requires_grad_(False)
    bb = HFBackbone(model, None, family)
    tokens = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(5))
    ref = logits(bb, tokens)
    hook = f"{bb.blocks_path}.0:input"
    adapter = attach_adapter(bb, AdapterConfig(rank=2, layers="all"), hook, 0)
    assert adapter.targets == [f"{bb.blocks_path}.{i}.{m}" for i in (0, 1) for m in (*attn, *mlp)]
    assert torch.equal(logits(bb, tokens), ref)
    perturb(adapter)
    ours = logits(bb, tokens)
    assert not torch.allclose(ours, ref, atol=1e-4)
    adapter.save(tmp_path / "a", family)
    theirs = PeftModel.from_pretrained(tiny_family(family), str(tmp_path / "a")).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=tokens).logits, ours, rtol=1e-5, atol=1e-5)
