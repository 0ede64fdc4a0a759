"""The paper's SAE, its SAELens-layout files, and loading them with SAELens itself."""

import json

import pytest
import torch

import e2edict
from e2edict.errors import E2EDictError
from e2edict.saes import ReLUSAE, load_sae, save_sae


def test_forward_matches_formula():
    torch.manual_seed(0)
    sae = ReLUSAE(6, 24)
    x = torch.randn(2, 3, 6)
    c = torch.relu(x @ sae.W_enc + sae.b_enc)
    D = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
    x_hat, code = sae(x)
    torch.testing.assert_close(code, c)
    torch.testing.assert_close(x_hat, c @ D + sae.b_dec)
    assert (code >= 0).all() and (code == 0).any()


def test_orthogonal_decoder_init_and_unit_norm_dictionary():
    torch.manual_seed(0)
    sae = ReLUSAE(8, 32)
    # the d_in "rows" of the paper's [d_in, n_dict] decoder are orthonormal
    torch.testing.assert_close(sae.W_dec.T @ sae.W_dec, torch.eye(8), atol=1e-5, rtol=0)
    torch.testing.assert_close(sae.dictionary.norm(dim=1), torch.ones(32))


def test_gradient_flows_through_normalisation():
    torch.manual_seed(0)
    sae = ReLUSAE(4, 8)
    x = torch.randn(5, 4)
    sae(x)[0].sum().backward()
    g = sae.W_dec.grad
    # d/dW of W/||W|| is orthogonal to W (row-wise): the reparametrisation, not a projection after the step
    assert (g * sae.W_dec).sum(1).abs().max() < 1e-5
    assert g.abs().sum() > 0


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    sae = ReLUSAE(16, 64, "blocks.1.hook_resid_pre")
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(64, 1) + 0.5)  # raw rows not unit norm: the file holds the normalised ones
    save_sae(sae, tmp_path / "s", {"model_name": "m", "context_size": 8, "prepend_bos": True})
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    assert cfg["architecture"] == "standard" and cfg["apply_b_dec_to_input"] is False
    assert cfg["normalize_activations"] == "none"
    assert cfg["metadata"]["sae_lens_version"] == "6.0.0" and cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_pre"
    back = e2edict.load_saes(tmp_path / "s")["blocks.1.hook_resid_pre"]
    x = torch.randn(4, 5, 16)
    a, c = sae(x)
    a2, c2 = back(x)
    torch.testing.assert_close(c2, c, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(a2, a, atol=1e-6, rtol=1e-6)


def test_saelens_loads_our_folder_and_computes_same_latents(tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    torch.manual_seed(0)
    sae = ReLUSAE(16, 64, "blocks.1.hook_resid_pre")
    with torch.no_grad():
        sae.b_dec.normal_()
    save_sae(sae, tmp_path / "s", {"model_name": "m", "context_size": 8, "prepend_bos": True})
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "s"))
    x = torch.randn(7, 16)
    with torch.no_grad():
        ours_c = sae.encode(x)
        torch.testing.assert_close(theirs.encode(x), ours_c, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(theirs.decode(ours_c), sae.decode(ours_c), atol=1e-5, rtol=1e-5)
    assert theirs.cfg.metadata.hook_name == "blocks.1.hook_resid_pre"


def test_foreign_decoder_norms_are_folded(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    d, n = 6, 12
    W_enc, b_enc, W_dec, b_dec = torch.randn(d, n), torch.randn(n), torch.randn(n, d) * 3, torch.randn(d)
    (tmp_path / "f").mkdir()
    save_file({"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}, str(tmp_path / "f" / "sae_weights.safetensors"))
    (tmp_path / "f" / "cfg.json").write_text(
        json.dumps(
            {"architecture": "standard", "d_in": d, "d_sae": n, "apply_b_dec_to_input": True, "metadata": {"hook_name": "h"}}
        )
    )
    sae = load_sae(tmp_path / "f")
    x = torch.randn(5, d)
    expected = torch.relu((x - b_dec) @ W_enc + b_enc) @ W_dec + b_dec
    torch.testing.assert_close(sae(x)[0], expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("damage", ["truncate", "cfg", "shape", "missing"])
def test_damaged_sae_folder_gives_clear_error(tmp_path, damage):
    sae = ReLUSAE(4, 8, "h")
    folder = save_sae(sae, tmp_path / "s")
    w = folder / "sae_weights.safetensors"
    if damage == "truncate":
        w.write_bytes(w.read_bytes()[:50])
    elif damage == "cfg":
        (folder / "cfg.json").write_text("{not json")
    elif damage == "shape":
        cfg = json.loads((folder / "cfg.json").read_text())
        cfg["d_in"] = 5
        (folder / "cfg.json").write_text(json.dumps(cfg))
    else:
        w.unlink()
    with pytest.raises(E2EDictError):
        load_sae(folder)
