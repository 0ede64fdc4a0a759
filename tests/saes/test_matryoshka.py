"""Matryoshka BatchTopK SAEs: prefix sizes and their errors, prefix losses against a hand
computation, the e2e objective (every prefix stacked along the batch, or one drawn per step)
against a naive per-prefix computation in float64, the SAELens round trip, and eval/compare."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from e2edict.config import load_config
from e2edict.errors import E2EDictError
from e2edict.saes import load_sae, registry, save_sae
from e2edict.saes.matryoshka import resolve_prefixes
from e2edict.splice import LossWeights, training_forward

ROOT = Path(__file__).resolve().parents[2]


def test_prefix_sizes_from_fractions_and_counts():
    assert resolve_prefixes(None, 1024) == [64, 256, 512, 1024]
    assert resolve_prefixes([0.25, 1.0], 64) == [16, 64]
    assert resolve_prefixes([3, 10, 64], 64) == [3, 10, 64]
    assert resolve_prefixes([8, 0.5, 1.0], 64) == [8, 32, 64]


@pytest.mark.parametrize(
    "spec,message",
    [
        ([0.5, 0.25, 1.0], "must increase strictly"),
        ([16, 16, 64], "must increase strictly"),
        ([16, 128], "larger than d_sae=64"),
        ([16, 32], "must be the whole dictionary"),
        ([1.5], "larger than 1"),
        ([-2, 64], "not a positive fraction or count"),
    ],
)
def test_bad_prefix_lists_end_in_one_clear_error(spec, message):
    from e2edict.run import setup_run

    over = ["saes.architecture=matryoshka_batchtopk", "saes.k=4", "saes.dict_ratio=0.5", f"saes.matryoshka_prefixes={spec}"]
    with pytest.raises(E2EDictError, match=message) as e:
        setup_run(load_config(ROOT / "configs/tiny/e2e.yaml", over))
    assert "\n" not in str(e.value)


def test_prefixes_on_an_architecture_without_them_is_refused():
    with pytest.raises(E2EDictError, match="saes.matryoshka_prefixes=.* is not read by architecture 'relu'"):
        load_config(ROOT / "configs/tiny/e2e.yaml", ["saes.matryoshka_prefixes=[0.5, 1.0]"])


def make(d_in=8, d_sae=32, k=3, prefixes=(4, 12, 32), dtype=torch.float32):
    torch.manual_seed(0)
    return registry["matryoshka_batchtopk"](d_in, d_sae, "h", k=k, prefixes=list(prefixes)).to(dtype)


def test_local_prefix_losses_equal_hand_computation():
    sae = make()
    x = torch.randn(20, 8)
    x_hat, c = sae(x)
    D = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
    hand = sum(((c[:, :m] @ D[:m] + sae.b_dec - x) ** 2).mean() for m in (4, 12, 32))
    assert sae.local_loss(x_hat, x, c).item() == pytest.approx(hand.item(), rel=1e-6)
    torch.testing.assert_close(x_hat, c @ D + sae.b_dec)  # the forward output is the whole dictionary's
    # in a spliced run: the local term is summed the same way
    from e2edict.splice import SpliceOutput, _sae_terms

    out = SpliceOutput(torch.zeros(()), {}, {"h": x}, {"h": x_hat}, {"h": c}, targets={"h": x})
    terms, _ = _sae_terms({"h": sae}, out, LossWeights(sparsity={"h": 0.0}, local=1.0))
    assert terms["local/h"].item() == pytest.approx(hand.item(), rel=1e-6)


def naive_matryoshka(model, sae, hook, tokens, lam, ds=()):
    """One full clean pass, then one full spliced pass per prefix with that prefix's
    reconstruction; KL (and e2e+ds's downstream MSEs) summed over prefixes, plus the sparsity term."""
    clean = {}
    with torch.no_grad():
        grab = [(d, lambda a, hook: clean.__setitem__(hook.name, a)) for d in ds]
        lc = F.log_softmax(model.run_with_hooks(tokens, fwd_hooks=grab), -1)
    store = {}

    def enc(a, hook):
        store["c"] = sae.encode(a)

    model.run_with_hooks(tokens, fwd_hooks=[(hook, enc)], stop_at_layer=int(hook.split(".")[1]) + 1)
    total = lam * store["c"].norm(p=1, dim=-1).mean() / sae.d_in
    kl_coeff, ds_coeff = (0.5, 2.5) if ds else (1.0, 0.0)
    for i in range(len(sae.prefixes)):
        spliced = {}
        hooks = [(hook, lambda a, hook, i=i: sae.decode_prefix(store["c"], i))]
        hooks += [(d, lambda a, hook, s=spliced: s.__setitem__(hook.name, a)) for d in ds]
        ls = F.log_softmax(model.run_with_hooks(tokens, fwd_hooks=hooks), -1)
        total = total + kl_coeff * (lc.exp() * (lc - ls)).sum(-1).mean()
        if ds:
            total = total + ds_coeff / len(ds) * sum(((spliced[d] - clean[d]) ** 2).mean() for d in ds)
    return total


@pytest.mark.parametrize("preset", ["e2e", "e2e+ds"])
def test_e2e_all_prefixes_equals_naive_per_prefix_runs(small_backbone, preset):
    """Shared prefix with the prefixes stacked along the batch: loss and gradients equal one naive
    spliced run per prefix (float64), for e2e and e2e+ds."""
    model = small_backbone.model.double()
    try:
        h = "blocks.1.hook_resid_pre"
        sae = make(d_in=32, d_sae=96, k=4, prefixes=(8, 32, 96), dtype=torch.float64)
        sae.e2e_prefixes = "all"  # saes.matryoshka_e2e
        tokens = torch.randint(0, 4096, (3, 12), generator=torch.Generator().manual_seed(1))
        ds = small_backbone.resid_hooks_after(h) if preset == "e2e+ds" else []
        coeffs = dict(kl=0.5, downstream=2.5) if ds else dict(kl=1.0)
        w = LossWeights(sparsity={h: 0.3}, downstream_positions=ds, **coeffs)
        ours = training_forward(small_backbone, {h: sae}, tokens, w)
        assert sae.prefix_mode is None  # put back after the step
        ours.loss.backward()
        g_ours = {n: p.grad.clone() for n, p in sae.named_parameters()}
        sae.zero_grad()
        ref = naive_matryoshka(model, sae, h, tokens, 0.3, ds)
        ref.backward()
        assert ours.loss.item() == pytest.approx(ref.item(), rel=1e-9)
        for n, p in sae.named_parameters():
            torch.testing.assert_close(g_ours[n], p.grad, rtol=1e-7, atol=1e-10)
    finally:
        model.float()


def test_e2e_drawn_prefix_takes_one_prefix_per_step_in_turn(small_backbone):
    h = "blocks.1.hook_resid_pre"
    sae = make(d_in=32, d_sae=96, k=4, prefixes=(8, 32, 96))
    tokens = torch.randint(0, 4096, (2, 10), generator=torch.Generator().manual_seed(2))
    w = LossWeights(sparsity={h: 0.0}, kl=1.0)
    with torch.no_grad():
        got = [training_forward(small_backbone, {h: sae}, tokens, w).terms["kl"].item() for _ in range(4)]
        lc = F.log_softmax(small_backbone.model(tokens), -1)
        _, cache = small_backbone.model.run_with_cache(tokens, names_filter=h)
        c = sae.encode(cache[h])
        want = []
        for i in (0, 1, 2, 0):
            ls = F.log_softmax(
                small_backbone.model.run_with_hooks(tokens, fwd_hooks=[(h, lambda a, hook, i=i: sae.decode_prefix(c, i))]), -1
            )
            want.append((lc.exp() * (lc - ls)).sum(-1).mean().item())
    assert got == pytest.approx(want, rel=1e-5)
    assert int(sae.prefix_draws) == 4 and "prefix_draws" in sae.state_dict()  # saved with checkpoints


def test_saelens_loads_matryoshka_and_computes_the_same_latents(tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    sae = make(d_in=16, d_sae=64, k=4, prefixes=(4, 16, 64))
    x = torch.randn(30, 16)
    sae.train()
    sae(x)  # the inference threshold
    sae.eval()
    save_sae(sae, tmp_path / "m")
    cfg = json.loads((tmp_path / "m/cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["metadata"]["e2edict_matryoshka_prefixes"] == [4, 16, 64]
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "m"))
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), sae.encode(x), atol=1e-5, rtol=1e-5)
        mine = load_sae(tmp_path / "m").eval()
        assert mine.prefixes == [4, 16, 64] and mine.architecture == "matryoshka_batchtopk"
        torch.testing.assert_close(mine(x)[0], sae(x)[0], atol=1e-6, rtol=1e-6)


@pytest.mark.slow
def test_matryoshka_through_cli_local_then_e2e_finetune_eval_and_compare(tmp_path):
    from e2edict.cli import main as cli_main

    base = [
        str(ROOT / "configs/tiny/e2e.yaml"),
        "saes.architecture=matryoshka_batchtopk",
        "saes.k=16",
        "saes.matryoshka_prefixes=[0.125, 0.5, 1.0]",
        "loss.sparsity.coeff=0",
        "train.tokens=8192",
        "eval.tokens=4096",
        "eval.alive_tokens=4096",
        "--quiet",
    ]
    assert cli_main(["train", *base, "loss.preset=local", "--out", str(tmp_path / "local")]) == 0
    ev = json.loads((tmp_path / "local/eval.json").read_text())
    pre = ev["saes"]["blocks.2.hook_resid_pre"]["prefixes"]
    assert [p["size"] for p in pre] == [128, 512, 1024]
    assert {"l0", "explained_variance", "ce_loss_increase", "ce_loss_alone"} <= set(pre[0])
    assert pre[0]["l0"] <= pre[1]["l0"] <= pre[2]["l0"]
    assert pre[-1]["explained_variance"] == pytest.approx(ev["saes"]["blocks.2.hook_resid_pre"]["explained_variance"], rel=1e-6)
    rc = cli_main(["train", *base, "loss.preset=e2e", f"saes.init_from={tmp_path / 'local'}", "--out", str(tmp_path / "e2e")])
    assert rc == 0
    assert cli_main(["compare", str(tmp_path / "local"), str(tmp_path / "e2e"), "--out", str(tmp_path / "cmp")]) == 0
    assert (tmp_path / "cmp/prefix_ce.png").stat().st_size > 0


def test_all_prefixes_need_equal_prefix_counts_across_saes(small_backbone):
    """'all' stacks one copy of the batch per prefix: SAEs with other prefix counts are refused,
    and every SAE is put back to its whole dictionary."""
    a = make(d_in=32, d_sae=96, k=4, prefixes=(8, 32, 96))
    b = make(d_in=32, d_sae=96, k=4, prefixes=(32, 96))
    saes = {"blocks.0.hook_resid_post": a, "blocks.1.hook_resid_post": b}
    w = LossWeights(sparsity=dict.fromkeys(saes, 0.0), kl=1.0)
    a.e2e_prefixes = b.e2e_prefixes = "all"
    with pytest.raises(E2EDictError, match=r"equally many prefixes, not \[2, 3\]"):
        training_forward(small_backbone, saes, torch.randint(0, 4096, (2, 8)), w)
    assert a.prefix_mode is None and b.prefix_mode is None
