"""SAEs saved by EleutherAI's sparsify load with exactly the latents and outputs sparsify computes."""

import pytest
import torch

from e2edict.errors import E2EDictError
from e2edict.saes import load_sparsify

sparsify = pytest.importorskip("sparsify")


def saved_coder(tmp_path, **cfg):
    torch.manual_seed(0)
    coder = sparsify.SparseCoder(16, sparsify.SaeConfig(num_latents=64, k=4, **cfg))
    with torch.no_grad():  # rows of other norms than 1 and a b_dec far from 0, as trained ones have
        if coder.W_dec.abs().sum() == 0:
            coder.W_dec.normal_()
        coder.W_dec.mul_(torch.rand(64, 1) + 0.3)
        coder.b_dec.normal_().mul_(2)
        coder.encoder.bias.normal_().mul_(0.1)
        if coder.W_skip is not None:
            coder.W_skip.normal_().mul_(0.1)
    coder.save_to_disk(tmp_path / "h.2")
    return coder


def test_sparsify_sae_loads_with_its_own_latents_and_reconstruction(tmp_path):
    coder = saved_coder(tmp_path)
    sae = load_sparsify(tmp_path / "h.2", hook_name="transformer.h.2")
    assert sae.architecture == "topk" and sae.k == 4 and sae.apply_b_dec_to_input and sae.hook_name == "transformer.h.2"
    x = torch.randn(200, 16) * 3
    with torch.no_grad():
        theirs = coder(x)
        x_hat, c = sae.eval()(x)
    dense = torch.zeros(200, 64).scatter_(1, theirs.latent_indices, theirs.latent_acts)
    assert torch.equal(c != 0, dense != 0)  # the same active latents on every token
    assert torch.allclose(c, dense, atol=1e-5)
    assert torch.allclose(x_hat, theirs.sae_out, atol=1e-5)


def test_sparsify_skip_transcoder_loads_with_its_outputs(tmp_path):
    coder = saved_coder(tmp_path, transcode=True, skip_connection=True)
    sae = load_sparsify(tmp_path / "h.2", hook_name="h.2.mlp.in", hook_name_out="h.2.mlp.out")
    assert sae.kind == "skip_transcoder" and not sae.apply_b_dec_to_input and sae.hook_name_out == "h.2.mlp.out"
    x = torch.randn(100, 16)
    with torch.no_grad():
        assert torch.allclose(sae.eval()(x)[0], coder(x).sae_out, atol=1e-5)


def test_not_a_sparsify_folder_is_one_line(tmp_path):
    with pytest.raises(E2EDictError, match="not a sparsify SAE folder"):
        load_sparsify(tmp_path)


@pytest.mark.parametrize("arch", ["relu", "topk"])
def test_a_decoder_row_of_zeros_loads_as_a_latent_that_writes_nothing(tmp_path, arch):
    """sparsify starts a transcoder's decoder at zero, and a latent that never fired keeps it:
    such a file loads, and computes exactly what its tensors say."""
    from e2edict.saes import load_sae, registry, save_sae

    torch.manual_seed(0)
    sae = registry[arch](8, 16, "h", **({"k": 4} if arch == "topk" else {}))
    save_sae(sae, tmp_path / "a")
    from safetensors.torch import load_file, save_file

    t = load_file(str(tmp_path / "a" / "sae_weights.safetensors"))
    t["W_dec"][[3, 7]] = 0.0
    save_file(t, str(tmp_path / "a" / "sae_weights.safetensors"))
    back = load_sae(tmp_path / "a")
    x = torch.randn(50, 8)
    with torch.no_grad():
        pre = x @ t["W_enc"] + t["b_enc"]
        if arch == "topk":
            vals, idx = pre.topk(4, dim=-1)
            c = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
        else:
            c = pre.relu()
        want = c @ t["W_dec"] + t["b_dec"]
        x_hat, codes = back(x)
    assert torch.allclose(x_hat, want, atol=1e-5)
    assert not back.dictionary[[3, 7]].any()
