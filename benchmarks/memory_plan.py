"""The memory plan (``e2edict plan``) against what real training steps hold on this CPU, side by side.

For each case a real run is prepared (`e2edict.preparation.prepare`) and one step's forward is run
with ``torch.autograd.graph.saved_tensors_hooks`` counting every tensor kept for backward that is
not a weight (each storage once; the SAEs on their dense paths, the ones a GPU takes); the Adam
state is counted after one optimizer step. The plan's figures come from the config alone, on the
meta device. Cases: the embedded model (TransformerLens and Hugging Face backends, ReLU, TopK,
a transcoder, checkpointing, bf16, local) and a GPT-2-small-shaped model (12 layers, d_model 768,
vocabulary 50,257, random weights) at layer 6 with a TopK SAE (k 32, ratio 16), 4 x 128 tokens,
with and without activation checkpointing. Then the plans of the shipped 27B and 70B configs.

    python benchmarks/memory_plan.py --json benchmarks/results/memory_plan.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs/tiny/e2e.yaml"
CASES = {
    "tiny relu": [],
    "tiny relu, checkpointing": ["train.activation_checkpointing=true"],
    "tiny relu, huggingface": ["model.backend=huggingface", "saes.positions=[transformer.h.2:input]"],
    "tiny topk": ["saes.architecture=topk", "saes.k=32"],
    "tiny transcoder": ["saes.kind=transcoder", "saes.positions=[blocks.1.mlp]"],
    "tiny relu, bf16": ["train.precision=bf16"],
    "tiny local": ["loss.preset=local"],
}
GPT2 = ["data.n_ctx=128", "train.batch_size=4", "saes.positions=[blocks.6.hook_resid_pre]", "saes.architecture=topk",
        "saes.k=32", "saes.dict_ratio=16"]  # fmt: skip


def measure(cfg, out: Path | None = None) -> dict:
    """What one real step holds: the bytes its forward keeps for backward (no weights; each
    storage once, held while counting so no address is reused), the SAEs' weight and buffer
    bytes, and the Adam state after the step."""
    import torch

    from e2edict.distributed import DistContext
    from e2edict.preparation import prepare

    run = prepare(cfg, DistContext(), out or Path(tempfile.mkdtemp()) / "run")
    for sae in run.saes.values():
        if hasattr(sae, "sparse_decode"):
            sae.sparse_decode = False
    weights = {p.untyped_storage()._cdata for p in run.setup.backbone.model.parameters()}
    weights |= {p.untyped_storage()._cdata for s in run.saes.values() for p in s.parameters()}

    def kept_by_forward():
        kept: dict = {}

        def pack(t):
            if t.untyped_storage()._cdata not in weights:
                kept[t.untyped_storage()._cdata] = t
            return t

        x = run.batches.next()[: cfg.train.batch_size]
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, _ = run.step.forward(run.step.prefix(x))
        return loss, sum(t.untyped_storage().nbytes() for t in kept.values())

    # the smaller of two forwards: once in a few dozen runs on this machine a process's first
    # forward kept 12 MiB more (not reproduced when looked for)
    first, a = kept_by_forward()
    loss, b = kept_by_forward()
    del first
    activations = min(a, b)
    loss.backward()
    run.step.opt.step()
    state = sum(t.numel() * t.element_size() for st in run.step.opt.state.values() for t in st.values() if t.dim() > 0)
    saes = sum(t.numel() * t.element_size() for s in run.saes.values() for t in [*s.parameters(), *s.buffers()])
    return {"activations": activations, "optimizer_state": state, "sae_bytes": saes}


def planned(cfg, gpus: int = 1) -> dict:
    from e2edict.plan import memory_plan

    plan = memory_plan(cfg, gpus)
    acts = sum(x.bytes for x in plan.lines if x.what.startswith(("activations", "final hidden")))
    state = sum(x.bytes for x in plan.lines if x.what == "optimizer state")
    return {"activations": acts, "optimizer_state": state, "total": plan.total(), "table": plan.table()}


def gpt2_folder() -> Path:
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from e2edict.assets import TINY_MODEL_DIR

    folder = Path(tempfile.mkdtemp()) / "gpt2-shape"
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=12, n_embd=768, n_head=12, n_positions=128, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    GPT2LMHeadModel(cfg).save_pretrained(folder)
    AutoTokenizer.from_pretrained(TINY_MODEL_DIR).save_pretrained(folder)
    return folder


def main() -> int:
    from e2edict.config import load_config

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    cases = {name: load_config(TINY, ["train.batch_size=8", *extra]) for name, extra in CASES.items()}
    folder = gpt2_folder()
    for ckpt in (False, True):
        name = "gpt2-shape topk layer 6" + (", checkpointing" if ckpt else "")
        cases[name] = load_config(TINY, [f"model.name={folder}", *GPT2, f"train.activation_checkpointing={ckpt}"])
    rows = {}
    print(f"{'case':<40} {'kept (MiB)':>11} {'plan (MiB)':>11} {'plan/kept':>9} {'Adam state = plan':>18}")
    for name, cfg in cases.items():
        got, plan = measure(cfg), planned(cfg)
        ratio = plan["activations"] / got["activations"]
        same = got["optimizer_state"] == plan["optimizer_state"]
        print(f"{name:<40} {got['activations'] / 2**20:11.1f} {plan['activations'] / 2**20:11.1f} {ratio:9.2f} {same!s:>18}")
        rows[name] = {"measured": got, "plan": {k: v for k, v in plan.items() if k != "table"}, "ratio": round(ratio, 3)}
    models = ROOT / "configs/models"
    large = {
        "gemma-2-27b over 4 GPUs": (ROOT / "configs/gemma-2-27b/e2e-layer23.yaml", models / "gemma-2-27b", 4),
        "llama-3.1-70b over 8 GPUs": (ROOT / "configs/llama-3.1-70b/e2e-layer40.yaml", models / "llama-3.1-70b", 8),
    }
    for name, (config, model, gpus) in large.items():
        plan = planned(load_config(config, [f"model.name={model}"]), gpus)
        print("\n" + plan["table"])
        rows[name] = {"plan": {k: v for k, v in plan.items() if k != "table"}, "table": plan["table"]}
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
