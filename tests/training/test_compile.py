"""`train.compile` compiles the whole step after its shared prefix: on a TransformerLens and a
Hugging Face model with residual-stream SAE positions the forward (clean and spliced runs, SAE,
loss terms, the fused head's chunk loop) is one graph for e2e, e2e+ds and local, and 50 steps
compile nothing again."""

from __future__ import annotations

import math

import pytest
import torch
from test_kept_hooks import CASES as INNER_CASES
from test_kept_hooks import loss_weights, make_saes

from e2edict.distributed import DistContext
from e2edict.optim import make_optimizer
from e2edict.saes import registry
from e2edict.splice import LossWeights
from e2edict.step import TrainStep

H = "blocks.1.hook_resid_pre"
HF_H = "transformer.h.1:input"  # the same position on the Hugging Face model


@pytest.fixture(scope="module")
def backbones(small_backbone, small_gpt2_dir):
    from e2edict.run import open_backbone

    hf = open_backbone(str(small_gpt2_dir), backend="huggingface")
    assert hf.plain  # the blocks called in turn: what makes the one graph
    return {"transformer_lens": (small_backbone, H), "huggingface": (hf, HF_H)}


ARCH_KW = {"topk": {"k": 4}, "batchtopk": {"k": 4}, "matryoshka_batchtopk": {"k": 4, "prefixes": [16, 64, 128]}}


def _step(bb, arch: str, preset: str, h: str = H, **sae_kw) -> TrainStep:
    torch.manual_seed(0)
    sae = registry[arch](32, 128, h, **ARCH_KW.get(arch, {}), **sae_kw)
    sae.sparse_decode = False  # what train.compile sets: static shapes
    ds = bb.resid_hooks_after(h) if preset == "e2e+ds" else []
    coeffs = {"e2e": dict(kl=1.0), "e2e+ds": dict(kl=0.5, downstream=2.5), "local": dict(local=1.0)}[preset]
    w = LossWeights(sparsity={h: 1.0}, downstream_positions=ds, **coeffs)
    opt = make_optimizer(list(sae.parameters()), 1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return TrainStep(bb, {h: sae}, {h: sae}, w, opt, sched, DistContext(device="cpu"), 1.0)


def _explain(step: TrainStep):
    x = torch.randint(0, 4096, (2, 16), generator=torch.Generator().manual_seed(0))
    explained = torch._dynamo.explain(step._forward)(step.prefix(x))
    return explained.graph_count, explained.graph_break_count, [str(b.reason)[:200] for b in explained.break_reasons]


@pytest.mark.parametrize("arch", ["relu", "topk", "batchtopk", "jumprelu", "gated", "matryoshka_batchtopk"])
@pytest.mark.parametrize("preset", ["e2e", "e2e+ds", "local"])
def test_the_whole_forward_is_one_graph(small_backbone, arch, preset):
    graphs, breaks, why = _explain(_step(small_backbone, arch, preset))
    assert graphs == 1 and breaks == 0, why


HF_CASES = [  # every architecture at a block input; three also at a block output
    *((a, "transformer.h.1:input") for a in ["relu", "topk", "batchtopk", "jumprelu", "gated", "matryoshka_batchtopk"]),
    *((a, "transformer.h.0") for a in ["relu", "topk", "matryoshka_batchtopk"]),
]


@pytest.mark.parametrize(("arch", "hook"), HF_CASES)
@pytest.mark.parametrize("preset", ["e2e", "e2e+ds", "local"])
def test_the_whole_hugging_face_forward_is_one_graph(backbones, arch, preset, hook):
    """Block inputs and block outputs (moved to the next block's input) alike; before the blocks
    were called in turn this was 10 graphs for e2e and 19 for local."""
    hf, _ = backbones["huggingface"]
    graphs, breaks, why = _explain(_step(hf, arch, preset, h=hook))
    assert graphs == 1 and breaks == 0, why


def _inner_step(bb, kind: str, position: str, preset: str) -> TrainStep:
    """A step with an SAE or a transcoder inside a block (`test_kept_hooks.CASES`); building it
    keeps their hooks on ``bb`` (`release_hooks` after)."""
    saes = make_saes(bb, kind, position)
    for s in saes.values():
        s.sparse_decode = False  # what train.compile sets
    opt = make_optimizer([p for s in saes.values() for p in s.parameters()], 1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return TrainStep(bb, saes, saes, loss_weights(bb, saes, preset), opt, sched, DistContext(device="cpu"), 1.0)


def _eager_and_compiled(make_step, n_steps: int):
    """``n_steps`` steps of a fresh step from ``make_step()`` eager, then compiled with a backend
    that counts its compilations: (compilations, eager values, compiled values)."""
    compiled_graphs = []

    def counting(gm, example_inputs):
        compiled_graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    steps = {}
    for mode in ("eager", "compiled"):
        step = make_step()
        if mode == "compiled":
            step.forward = torch.compile(step._forward, backend=counting, dynamic=False)
        gen = torch.Generator().manual_seed(1)
        steps[mode] = torch.stack([step([torch.randint(0, 4096, (2, 16), generator=gen)]) for _ in range(n_steps)])
    return len(compiled_graphs), steps["eager"], steps["compiled"]


@pytest.mark.parametrize(("backend", "kind", "position"), INNER_CASES)
@pytest.mark.parametrize("preset", ["e2e", "e2e+ds", "local"])
def test_positions_inside_blocks_are_one_graph_too(backbones, backend, kind, position, preset):
    """An SAE at an MLP's output and a transcoder over an MLP: their hooks are kept registered
    (`Backbone.keep_hooks`, what `TrainStep` does), not registered per run; that was 5 to 9 graphs."""
    bb, _ = backbones[backend]
    try:
        graphs, breaks, why = _explain(_inner_step(bb, kind, position, preset))
    finally:
        bb.release_hooks()
    assert graphs == 1 and breaks == 0, why


@pytest.mark.parametrize("backend", ["transformer_lens", "huggingface"])
@pytest.mark.parametrize("preset", ["e2e", "local"])
def test_fifty_compiled_steps_compile_once_and_equal_eager_steps(backbones, backend, preset):
    """A backend that counts its compilations: one for the forward, none again over 50 steps
    (the drawn Matryoshka prefix and the BatchTopK threshold are device buffers, not constants);
    the compiled steps' losses equal eager steps' from the same start."""
    bb, h = backbones[backend]
    graphs, eager, compiled = _eager_and_compiled(lambda: _step(bb, "matryoshka_batchtopk", preset, h=h), 50)
    assert graphs == 1
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["transformer_lens", "huggingface"])
def test_compiled_transcoder_steps_compile_once_and_equal_eager_steps(backbones, backend):
    """With kept hooks (a transcoder over block 1's MLP) too: one compilation over 20 steps, each
    step's kept slots filled and emptied inside the graph, and the eager steps' values."""
    bb, _ = backbones[backend]
    position = "blocks.1.mlp" if backend == "transformer_lens" else "transformer.h.1.mlp"
    try:
        graphs, eager, compiled = _eager_and_compiled(lambda: _inner_step(bb, "transcoder", position, "e2e"), 20)
    finally:
        bb.release_hooks()
    assert graphs == 1
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


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


def test_compile_mode_reaches_torch_compile_and_marks_each_micro_batch(backbones, monkeypatch):
    """`train.compile_mode: reduce-overhead` (CUDA graphs on a GPU) is the mode torch.compile gets,
    and each micro-batch starts a new CUDA-graph step (its outputs are consumed before the next);
    the mode without `train.compile` is a one-line config error."""
    from e2edict.config import config_from_dict
    from e2edict.errors import E2EDictError

    seen, marks = [], []

    def recording_compile(fn, **kw):
        seen.append(kw)
        return fn

    monkeypatch.setattr(torch, "compile", recording_compile)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    bb, h = backbones["transformer_lens"]
    for mode in ("default", "reduce-overhead"):
        step = _step(bb, "relu", "e2e", h=h)
        step.compile = mode
        step.__post_init__()
        gen = torch.Generator().manual_seed(2)
        step([torch.randint(0, 4096, (2, 16), generator=gen) for _ in range(3)])
    assert [k["mode"] for k in seen] == [None, "reduce-overhead"] and all(k["dynamic"] is False for k in seen)
    assert len(marks) == 3  # three micro-batches, under reduce-overhead only
    base = {"saes": {"positions": [H]}}
    cfg = config_from_dict({**base, "train": {"compile": True, "compile_mode": "reduce-overhead"}})
    assert cfg.train.compile_mode == "reduce-overhead"
    with pytest.raises(E2EDictError, match="compile_mode='reduce-overhead' applies only under train.compile: true"):
        config_from_dict({**base, "train": {"compile_mode": "reduce-overhead"}})
