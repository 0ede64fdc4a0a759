"""`train.compile` compiles the whole step: on a TransformerLens model with residual-stream SAE
positions the forward (shared prefix, clean and spliced runs, SAE, loss terms, the fused head's
chunk loop) is one graph for e2e, e2e+ds and local, and 50 steps compile nothing again."""

from __future__ import annotations

import math

import pytest
import torch

from e2edict.distributed import DistContext
from e2edict.optim import make_optimizer
from e2edict.saes import registry
from e2edict.splice import LossWeights
from e2edict.step import TrainStep

H = "blocks.1.hook_resid_pre"
ARCH_KW = {"topk": {"k": 4}, "batchtopk": {"k": 4}, "matryoshka_batchtopk": {"k": 4, "prefixes": [16, 64, 128]}}


def _step(bb, arch: str, preset: str, **sae_kw) -> TrainStep:
    torch.manual_seed(0)
    sae = registry[arch](32, 128, H, **ARCH_KW.get(arch, {}), **sae_kw)
    sae.sparse_decode = False  # what train.compile sets: static shapes
    ds = bb.resid_hooks_after(H) if preset == "e2e+ds" else []
    coeffs = {"e2e": dict(kl=1.0), "e2e+ds": dict(kl=0.5, downstream=2.5), "local": dict(local=1.0)}[preset]
    w = LossWeights(sparsity={H: 1.0}, downstream_positions=ds, **coeffs)
    opt = make_optimizer(list(sae.parameters()), 1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return TrainStep(bb, {H: sae}, {H: sae}, w, opt, sched, DistContext(device="cpu"), 1.0)


@pytest.mark.parametrize("arch", ["relu", "topk", "batchtopk", "jumprelu", "gated", "matryoshka_batchtopk"])
@pytest.mark.parametrize("preset", ["e2e", "e2e+ds", "local"])
def test_the_whole_forward_is_one_graph(small_backbone, arch, preset):
    step = _step(small_backbone, arch, preset)
    x = torch.randint(0, 4096, (2, 16), generator=torch.Generator().manual_seed(0))
    explained = torch._dynamo.explain(step._forward)(x)
    assert explained.graph_count <= 2 and explained.graph_break_count == 0, [str(b.reason)[:200] for b in explained.break_reasons]


@pytest.mark.parametrize("preset", ["e2e", "local"])
def test_fifty_compiled_steps_compile_once_and_equal_eager_steps(small_backbone, preset):
    """A backend that counts its compilations: one for the forward, none again over 50 steps
    (the drawn Matryoshka prefix and the BatchTopK threshold are device buffers, not constants);
    the compiled steps' losses equal eager steps' from the same start."""
    compiled_graphs = []

    def counting(gm, example_inputs):
        compiled_graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    steps = {}
    for mode in ("eager", "compiled"):
        step = _step(small_backbone, "matryoshka_batchtopk", preset)
        if mode == "compiled":
            step.forward = torch.compile(step._forward, backend=counting, dynamic=False)
        gen = torch.Generator().manual_seed(1)
        steps[mode] = [step([torch.randint(0, 4096, (2, 16), generator=gen)]) for _ in range(50)]
    assert len(compiled_graphs) == 1
    torch.testing.assert_close(torch.stack(steps["compiled"]), torch.stack(steps["eager"]), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_compiled_training_through_the_trainer(tmp_path, small_gpt2_dir):
    """`train.compile: true` end to end on the CPU (inductor): a short run finishes, finite."""
    import json

    from conftest import ROOT

    import e2edict

    out = e2edict.train(
        ROOT / "configs/tiny/e2e.yaml",
        overrides=[
            f"model.name={small_gpt2_dir}",
            "data.n_ctx=32",
            f"saes.positions=[{H}]",
            "saes.dict_ratio=2",
            "train.tokens=2048",
            "train.batch_size=8",
            "train.warmup_tokens=0",
            "train.compile=true",
            "train.eval_every_tokens=null",
            "eval.tokens=512",
            "eval.alive_tokens=512",
        ],  # fmt: skip
        out=tmp_path / "run",
        progress=False,
    )
    result = json.loads((out / "eval.json").read_text())
    assert math.isfinite(result["kl"]) and result["kl"] > 0 and result["tokens"] == 512
