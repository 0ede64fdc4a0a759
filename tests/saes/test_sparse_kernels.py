"""The sparse paths of the SAEs (TopK as k gathers, (token, latent) pairs, the gather decode with
its fused backward) against the dense computation: values and gradients, in float64 where exact."""

from pathlib import Path

import pytest
import torch

from e2edict.saes import TopKSAE, base

ROOT = Path(__file__).resolve().parents[2]

def test_topk_keeps_exactly_k_and_sparse_decode_matches_dense():
    torch.manual_seed(0)
    sae = TopKSAE(16, 256, k=5, sparse_decode=True).double()  # float64: the comparison is exact
    with torch.no_grad():
        sae.b_enc.add_(10.0)  # every pre-activation positive, so ReLU removes none of the top k
    x = torch.randn(3, 7, 16, requires_grad=True, dtype=torch.float64)
    x_hat, c = sae(x)
    assert ((c != 0).sum(-1) == 5).all()
    pre = x @ sae.W_enc + sae.b_enc
    assert torch.equal(c != 0, pre >= pre.topk(5, dim=-1).values[..., -1:])
    # a dense reference written out here: dense pre-activations, top-k, dense decode
    vals, idx = pre.topk(5, dim=-1)
    c_ref = torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))
    x_ref = c_ref @ (sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)) + sae.b_dec
    torch.testing.assert_close(x_hat, x_ref, atol=1e-10, rtol=1e-10)
    params = [x, sae.W_dec, sae.W_enc_T, sae.b_enc, sae.b_dec]
    g_sparse = torch.autograd.grad(x_hat.square().sum() + c.sum(), params)  # sparse decode and sparse encoder backward
    g_dense = torch.autograd.grad(x_ref.square().sum() + c_ref.sum(), params)
    for a, b in zip(g_sparse, g_dense, strict=True):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)

def _graph_ops(out: torch.Tensor) -> set[str]:
    seen, todo, names = set(), [out.grad_fn], set()
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        todo += [f for f, _ in fn.next_functions]
    return names

def test_topk_fixed_k_path_against_dense_with_relu_zeros_b_dec_and_scale():
    """The fixed-k gather path (`TopKEncode`, then `GatherDecode` over its k pairs per token) against a dense reference written
    out here, in float64: some of the top k are negative (ReLU zeroes them, and their gradient),
    b_dec is subtracted first, the rows carry a fixed `decoder_scale`; a sparsity term on the codes
    reaches the encoder. Automatic on a CPU in fp32; ``sparse_decode=False`` keeps the dense path."""
    from e2edict.saes.sparse import TopKEncode

    torch.manual_seed(4)
    sae = TopKSAE(16, 96, k=7, apply_b_dec_to_input=True).double()
    with torch.no_grad():
        sae.b_enc.sub_(0.6)
        sae.b_dec.normal_()
        sae.decoder_scale = torch.rand(96, dtype=torch.float64) + 0.5
    x = torch.randn(4, 5, 16, requires_grad=True, dtype=torch.float64)
    x_hat, c = sae(x)
    xin = x - sae.b_dec
    pre = xin @ sae.W_enc + sae.b_enc
    vals, idx = pre.topk(7, dim=-1)
    assert (vals <= 0).any() and (vals > 0).any()  # ReLU removes some of the k
    c_ref = torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))
    D = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True) * sae.decoder_scale[:, None]
    x_ref = c_ref @ D + sae.b_dec
    torch.testing.assert_close(c, c_ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(x_hat, x_ref, atol=1e-10, rtol=1e-10)
    params = [x, sae.W_dec, sae.W_enc_T, sae.b_enc, sae.b_dec]
    g = torch.autograd.grad(x_hat.square().sum() + 0.3 * c.sum(), params)
    g_ref = torch.autograd.grad(x_ref.square().sum() + 0.3 * c_ref.sum(), params)
    for a, b in zip(g, g_ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)
    xs = torch.randn(6, 16, dtype=torch.float64, requires_grad=True)
    W = torch.randn(40, 16, dtype=torch.float64, requires_grad=True)
    b = torch.randn(40, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x_, w_, b_: TopKEncode.apply(x_, w_, b_, 5)[0], (xs, W, b))

    auto = TopKSAE(16, 96, k=4)  # fp32 on a CPU, k / d_sae below TOPK_GATHER_FRACTION: the gather path
    assert 4 / 96 < base.TOPK_GATHER_FRACTION < 7 / 96
    assert {"TopKEncodeBackward", "GatherDecodeBackward"} <= _graph_ops(auto(torch.randn(3, 16))[0])
    auto.sparse_decode = False  # what train.compile sets
    assert "TopKEncodeBackward" not in _graph_ops(auto(torch.randn(3, 16))[0])
    assert "TopKEncodeBackward" not in _graph_ops(TopKSAE(16, 96, k=7)(torch.randn(3, 16))[0])  # k too large

def test_gather_decode_gradients_and_both_dense_decode_routes():
    """The fused gather-decode backward (gradcheck, float64, repeated ids) and the dense decode's
    two equal forms: codes scaled by inverse norms (few tokens) and the normalised dictionary."""
    from e2edict.saes import ReLUSAE
    from e2edict.saes import sparse as sparse_mod
    from e2edict.saes.sparse import GatherDecode, Pairs

    torch.manual_seed(3)
    W = torch.randn(40, 6, dtype=torch.float64, requires_grad=True)
    # ragged pairs: token 0 uses latent 2 twice, token 2 has none, token 3 has one
    pairs = Pairs(torch.tensor([0, 0, 0, 1, 1, 3, 4, 4]), torch.tensor([2, 2, 9, 5, 39, 0, 7, 2]), 5)
    vals = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v, w: GatherDecode.apply(v, pairs, w), (vals, W))
    out = GatherDecode.apply(vals, pairs, W)
    D = W / W.norm(dim=1, keepdim=True)
    ref = torch.zeros(5, 6, dtype=torch.float64).index_add(0, pairs.tok, vals.unsqueeze(1) * D[pairs.lat])
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    assert out[2].abs().sum() == 0
    # more pairs than rows (the norms from every row, not from the rows used) and pairs spread over
    # several backward chunks: the same function and the same gradients as a dense reference
    W_small = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    dense_norms = Pairs(pairs.tok, pairs.lat.remainder(3), 5)  # 8 pairs over 3 rows
    assert torch.autograd.gradcheck(lambda v, w: GatherDecode.apply(v, dense_norms, w), (vals, W_small))
    many = Pairs(torch.arange(30).div(3, rounding_mode="floor"), torch.randint(0, 40, (30,)), 10)
    v30 = torch.randn(30, dtype=torch.float64, requires_grad=True)
    sparse_mod.GATHER_CHUNK_ELEMENTS, chunk = 4 * 6, sparse_mod.GATHER_CHUNK_ELEMENTS  # 4 pairs per chunk
    try:
        for w in (W, W_small):
            p = many if w is W else Pairs(many.tok, many.lat.remainder(3), 10)
            got = GatherDecode.apply(v30, p, w)
            ref = torch.zeros(10, 6, dtype=torch.float64).index_add(
                0, p.tok, v30.unsqueeze(1) * (w / w.norm(dim=1, keepdim=True))[p.lat]
            )
            g = torch.randn(10, 6, dtype=torch.float64)
            for a, b in zip(torch.autograd.grad(got, [v30, w], g), torch.autograd.grad(ref, [v30, w], g), strict=True):
                torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    finally:
        sparse_mod.GATHER_CHUNK_ELEMENTS = chunk
    sae = ReLUSAE(16, 64).double()
    for n_tok in (4, 40):  # fewer tokens than d_in: scaled codes; more: normalised dictionary
        c = torch.relu(torch.randn(n_tok, 64, dtype=torch.float64)).requires_grad_(True)
        got = sae.decode(c)
        ref = c @ (sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)) + sae.b_dec
        torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-12)
        ga = torch.autograd.grad(got.square().sum(), [c, sae.W_dec])
        gb = torch.autograd.grad(ref.square().sum(), [c, sae.W_dec])
        for a, b in zip(ga, gb, strict=True):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)

def test_gather_decode_skipping_zero_values_is_exact_for_relu_codes():
    """``zero_is_inactive`` drops the (token, latent) pairs whose value is 0: the dictionary's
    gradient is unchanged, and the value gradient there is 0, which is what ReLU passes back."""
    from e2edict.saes import ReLUSAE

    torch.manual_seed(4)
    sae = ReLUSAE(6, 50).double()
    W = sae.W_dec
    idx = torch.randint(0, 50, (7, 5))
    pre = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    g = torch.randn(7, 6, dtype=torch.float64)
    out = {}
    for skip in (False, True):
        vals = torch.relu(pre)
        y = sae.gather_decode(vals, idx, zero_is_inactive=skip)
        out[skip] = (y, *torch.autograd.grad((y * g).sum(), [pre, W]))
    assert (torch.relu(pre) == 0).any()
    for u, v in zip(out[True], out[False], strict=True):
        torch.testing.assert_close(u, v, atol=1e-12, rtol=1e-12)

@pytest.mark.parametrize("b_dec_in,chunked", [(False, False), (True, False), (True, True)])
def test_relu_sparse_path_matches_dense_exactly_in_float64(b_dec_in, chunked, monkeypatch):
    """The sparse path (top active pre-activations, sparse encoder backward, gather decode) against
    the dense formula, values and every gradient, including through b_dec on the input side, and
    with the sparse backwards working one token at a time."""
    from e2edict.saes import ReLUSAE, sparse

    if chunked:
        monkeypatch.setattr(sparse, "GATHER_CHUNK_ELEMENTS", 1)

    torch.manual_seed(1)
    sae = ReLUSAE(16, 512, apply_b_dec_to_input=b_dec_in).double()
    with torch.no_grad():
        sae.b_enc.sub_(1.5)
    x = torch.randn(3, 9, 16, dtype=torch.float64, requires_grad=True)
    sae.sparse_decode = True
    a, c = sae(x)
    params = [x, sae.W_enc_T, sae.W_dec, sae.b_enc, sae.b_dec]
    w_c = torch.rand(3, 9, 512, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    g = torch.autograd.grad(a.square().sum() + (w_c * c).sum(), params)  # a gradient into the codes that differs per entry
    xin = x - sae.b_dec if b_dec_in else x
    c_ref = torch.relu(xin @ sae.W_enc + sae.b_enc)
    a_ref = c_ref @ (sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)) + sae.b_dec
    g_ref = torch.autograd.grad(a_ref.square().sum() + (w_c * c_ref).sum(), params)
    assert 0 < (c_ref > 0).sum() < c_ref.numel() // 4  # sparse: the zero codes are most of c
    torch.testing.assert_close(a, a_ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(c, c_ref, atol=1e-12, rtol=0)
    for u, v in zip(g, g_ref, strict=True):
        torch.testing.assert_close(u, v, atol=1e-9, rtol=1e-9)
    with torch.no_grad():  # the evaluation path (no graph) gives the same codes and reconstruction
        a_eval, c_eval = sae(x)
    torch.testing.assert_close(a_eval, a_ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(c_eval, c_ref, atol=1e-12, rtol=0)

def test_relu_sparse_decode_matches_dense_with_gradients():
    from e2edict.saes import ReLUSAE

    torch.manual_seed(0)
    sae = ReLUSAE(16, 512)
    with torch.no_grad():
        sae.b_enc.sub_(1.5)  # low L0
    x = torch.randn(3, 9, 16)
    sae.sparse_decode = True
    a_sparse, c = sae(x)
    assert 0 < (c != 0).sum(-1).float().mean() < 512 * base.SPARSE_DECODE_FRACTION  # mean L0 decides for ReLU
    g_sparse = torch.autograd.grad(a_sparse.square().sum(), [sae.W_enc_T, sae.W_dec, sae.b_enc, sae.b_dec])
    sae.sparse_decode = False
    a_dense, _ = sae(x)
    g_dense = torch.autograd.grad(a_dense.square().sum(), [sae.W_enc_T, sae.W_dec, sae.b_enc, sae.b_dec])
    torch.testing.assert_close(a_sparse, a_dense, atol=1e-5, rtol=1e-5)
    for a, b in zip(g_sparse, g_dense, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    sae.sparse_decode = None  # automatic: this L0 is below the crossover, so the sparse path
    a_auto = sae(x)[0]
    assert uses_gather_decode(a_auto) and not uses_gather_decode(a_dense)
    torch.testing.assert_close(a_auto, a_dense, atol=1e-5, rtol=1e-5)

def test_relu_automatic_path_at_high_l0_falls_back_to_dense_with_the_same_gradients():
    """At a high L0 the automatic path (the product formed latent-major under autograd, then the
    dense fallback) gives the dense path's codes, reconstruction and gradients."""
    from e2edict.saes import ReLUSAE

    torch.manual_seed(3)
    sae = ReLUSAE(16, 256)
    x = torch.randn(2, 7, 16)
    params = [sae.W_enc_T, sae.W_dec, sae.b_enc, sae.b_dec]
    w_c = torch.rand(2, 7, 256, generator=torch.Generator().manual_seed(5))
    results = {}
    for mode in (None, False):
        sae.sparse_decode = mode
        a, c = sae(x)
        results[mode] = (a, c, torch.autograd.grad(a.square().sum() + (w_c * c).sum(), params), uses_gather_decode(a))
    (a_auto, c_auto, g_auto, gather_auto), (a_dense, c_dense, g_dense, _) = results[None], results[False]
    assert (c_dense > 0).float().mean() > base.SPARSE_DECODE_FRACTION and not gather_auto  # dense: no gather decode
    torch.testing.assert_close(c_auto, c_dense, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(a_auto, a_dense, atol=1e-5, rtol=1e-5)
    for u, v in zip(g_auto, g_dense, strict=True):
        torch.testing.assert_close(u, v, atol=1e-4, rtol=1e-4)

def test_pairs_of_a_latent_major_mask_equal_those_of_the_contiguous_mask():
    from e2edict.saes.sparse import Pairs

    mask = torch.rand(37, 200, generator=torch.Generator().manual_seed(0)) < 0.05
    mask[5] = False  # a token with no pairs
    latent_major = mask.T.contiguous().T  # the same mask, stored [d_sae, tokens]
    assert not latent_major.is_contiguous()
    got = Pairs.of_mask(latent_major)
    tok, lat = mask.nonzero(as_tuple=True)
    assert torch.equal(got.tok, tok) and torch.equal(got.lat, lat) and got.n_tokens == 37
    per_token = mask.sum(1)  # where each token's pairs start, counted here from the mask
    assert torch.equal(got.offsets, torch.cumsum(per_token, 0) - per_token)

def uses_gather_decode(out: torch.Tensor) -> bool:
    """Whether the autograd graph behind ``out`` holds the sparse gather decode."""
    seen, todo = set(), [out.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if "GatherDecode" in type(fn).__name__:
            return True
        todo.extend(f for f, _ in fn.next_functions)
    return False
