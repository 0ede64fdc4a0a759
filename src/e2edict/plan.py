"""The memory plan: what a training run holds on each GPU, counted before anything loads.

The model is built from its config alone on PyTorch's meta device (shapes and dtypes, no data,
no weights read), so a 70B plan answers in seconds on a laptop. Weights, the SAEs and their
optimizer state are counted from the parameters' shapes; the activations autograd keeps for
backward are counted by running the blocks after the first SAE and each SAE on meta tensors of
one micro-batch and adding up every tensor saved for backward that is not a weight (the bytes
`torch.autograd.graph.saved_tensors_hooks` sees, each storage once). The figures are per GPU:
every rank runs its own micro-batch of ``train.batch_size`` sequences.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

from e2edict.config import Config
from e2edict.errors import E2EDictError

GIB = 1 << 30
_D_MODEL_TL = re.compile(
    r"^blocks\.(\d+)\.(hook_resid_(pre|mid|post)|hook_(attn|mlp)_out|ln\d\.hook_normalized|mlp|hook_mlp_in)$"
)  # TransformerLens hooks d_model wide (``mlp``: a transcoder's short name)
_D_MLP_TL = re.compile(r"^blocks\.(\d+)\.mlp\.hook_(pre|post)$")


def size(n: int) -> str:
    """Bytes as GiB from 1 GiB up, else MiB."""
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / (1 << 20):.1f} MiB"


@dataclass
class Line:
    what: str
    bytes: int
    note: str = ""


@dataclass
class Plan:
    """The bytes a run holds on each of ``gpus`` GPUs, item by item (`lines`)."""

    model: str
    gpus: int
    sharded: bool
    checkpointing: bool
    batch_size: int
    lines: list[Line] = field(default_factory=list)
    per_sequence: int = 0  # activation bytes that grow with each sequence of the micro-batch
    cpu_load: int = 0  # CPU memory a rank needs while it loads a model to be sharded (the whole model)

    def total(self) -> int:
        return sum(x.bytes for x in self.lines)

    def table(self) -> str:
        how = f"{self.gpus} GPU{'s' if self.gpus > 1 else ''}, model {'sharded' if self.sharded else 'whole on each'}"
        how += ", activation checkpointing" if self.checkpointing else ""
        rows = [f"memory plan for {self.model} ({how}; per GPU, micro-batch of {self.batch_size} sequences)"]
        width = max(len(x.what) for x in self.lines)
        for x in self.lines:
            rows.append(f"  {x.what:<{width}}  {size(x.bytes):>10}  {x.note}".rstrip())
        rows.append(f"  {'total':<{width}}  {size(self.total()):>10}")
        if self.cpu_load:
            rows.append(f"  (loading: each rank first holds the whole model in CPU memory, {size(self.cpu_load)})")
        return "\n".join(rows)

    def advice(self, gpu_bytes: int, cfg: Config) -> str | None:
        """None where the plan fits in ``gpu_bytes``; else one line saying what would make it fit."""
        total = self.total()
        if total <= gpu_bytes:
            return None
        fixes = []
        excess = total - gpu_bytes
        weights = next(x.bytes for x in self.lines if x.what.startswith("model weights"))
        if not self.sharded:
            for n in (2, 4, 8, 16, 32, 64):
                if weights - weights // n >= excess:
                    fixes.append(f"train.shard_model=true over {n} GPUs")
                    break
        if not self.checkpointing and cfg.loss.kl.coeff + cfg.loss.downstream.coeff > 0:
            fixes.append("train.activation_checkpointing=true")
        if self.per_sequence > 0:
            fit = self.batch_size - -(-excess // self.per_sequence)
            if fit >= 1:
                fixes.append(f"train.batch_size={fit} (with train.grad_accum for the same tokens per step)")
        hint = "; or ".join(fixes) if fixes else "a GPU with more memory"
        return (
            f"the memory plan needs {size(total)} per GPU, more than the {size(gpu_bytes)} there are: "
            f"try {hint} (e2edict plan CONFIG shows the items)"
        )


def memory_plan(cfg: Config, gpus: int = 1) -> Plan:
    """The memory plan of ``cfg`` trained on ``gpus`` GPUs (`Plan`)."""
    if gpus < 1:
        raise E2EDictError(f"--gpus must be at least 1, got {gpus}")
    t = cfg.train
    sharded = t.shard_model and gpus > 1
    shapes = _Shapes(cfg)
    plan = Plan(cfg.model.name, gpus, sharded, t.activation_checkpointing, t.batch_size)
    _weights(plan, shapes, cfg, sharded)
    _sae_state(plan, shapes, cfg)
    _activations(plan, shapes, cfg)
    return plan


def check_memory(cfg: Config, world: int, gpu_bytes: int, show: bool) -> None:
    """Before a GPU run loads its model: the plan shown (``show``: rank 0), and a configuration
    the plan says cannot fit in ``gpu_bytes`` refused with what would make it fit. A model whose
    config the plan cannot read is said so and trains on."""
    import sys

    try:
        plan = memory_plan(cfg, world)
    except E2EDictError as e:
        if show:
            print(f"no memory plan: {e}", file=sys.stderr)
        return
    if show:
        print(plan.table(), file=sys.stderr)
    advice = plan.advice(gpu_bytes, cfg)
    if advice is not None:
        raise E2EDictError(f"{advice}; train.memory_check=false trains anyway")


def model_layers(cfg: Config) -> int | None:
    """The model's block count from its config, without its weights; None where the config is not
    at hand without downloading (the count is checked again once the model loads)."""
    try:
        hf = model_config(cfg)
    except E2EDictError:
        return None
    text = hf.get_text_config() if hasattr(hf, "get_text_config") else hf
    return getattr(text, "num_hidden_layers", None)


def model_config(cfg: Config):
    """The model's transformers config, read without its weights and without downloading."""
    from transformers import AutoConfig

    from e2edict.backbones.transformer_lens import resolve_model_path

    path = resolve_model_path(cfg.model.name)
    source = str(path) if path is not None else _hub_name(cfg)
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=cfg.model.trust_remote_code, local_files_only=True)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError... for names it cannot read
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise E2EDictError(
            f"cannot read the config of model {cfg.model.name!r} without its weights ({first}); "
            "give a folder holding its config.json"
        ) from None


def _hub_name(cfg: Config) -> str:
    """A TransformerLens model name's Hugging Face repository (the name itself for the other backend)."""
    if cfg.model.backend != "transformer_lens":
        return cfg.model.name
    try:
        from transformer_lens.loading_from_pretrained import get_official_model_name

        return get_official_model_name(cfg.model.name)
    except Exception:  # not one of TransformerLens's names: read as a repository name
        return cfg.model.name


class _Shapes:
    """The model on the meta device as the configured backend holds it (a `HookedTransformer` for
    TransformerLens, the transformers model otherwise), its widths, and each SAE position's block
    and widths; `blocks_forward` runs blocks the way training's runs call them."""

    def __init__(self, cfg: Config):
        from e2edict.backbones.huggingface import _block_list

        self.cfg, hf = cfg, model_config(cfg)
        text = hf.get_text_config() if hasattr(hf, "get_text_config") else hf
        self.d_model = int(getattr(text, "hidden_size", None) or text.n_embd)
        self.d_mlp = int(getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * self.d_model)
        self.vocab = int(text.vocab_size)
        self.dtype = torch.bfloat16 if cfg.train.precision == "bf16" else getattr(torch, cfg.model.dtype)
        with torch.device("meta"):
            self.hf = _hf_on_meta(cfg, hf, self.dtype)
        self.tl = _tl_on_meta(cfg, hf, self.dtype) if cfg.model.backend == "transformer_lens" else None
        self.model = self.tl.model if self.tl is not None else self.hf
        self.blocks_path, hf_blocks = _block_list(self.hf)
        self.blocks = self.model.blocks if self.tl is not None else hf_blocks
        self.positions = {p: self._position(p) for p in cfg.saes.positions}  # name -> (block, d_in, d_out)
        with torch.device("meta"):  # each SAE as training builds it, once
            self.saes = [(_build_sae(cfg, d_in, d_out), d_out) for _, d_in, d_out in self.positions.values()]

    def blocks_forward(self, x: torch.Tensor, first: int) -> None:
        """Blocks ``first..`` on ``x`` with a graph, as training's spliced run calls them."""
        if self.tl is not None:
            self.tl.run_from(x, first, {}, logits=False, hidden=True)
            return
        from e2edict.backbones.hf_blocks import BlockCalls, passes
        from e2edict.backbones.huggingface import _tanh_gelus

        gelus = _tanh_gelus(self.hf)
        calls = BlockCalls(self.hf, self.blocks, self.d_model, gelus)
        with passes(gelus):
            calls.arguments(x)
        calls.run(x, first, {}, {}, False)

    def _position(self, spec: str) -> tuple[int, int, int]:
        """(the first block the spliced run's graph goes through, d_in, d_out): the SAE's own block
        where it reads that block's input, else the next (what follows it inside its block is left out)."""
        src, _, dst = (s.strip() for s in spec.partition("->"))
        block, d_in = self._width(src)
        d_out = self._width(dst)[1] if dst else d_in
        start = graph_start(src)
        return (block + 1 if start is None else start), d_in, d_out

    def _width(self, name: str) -> tuple[int, int]:
        """(block, width) of a hook: TransformerLens names by their family, module paths by the module."""
        for pattern, width in ((_D_MODEL_TL, self.d_model), (_D_MLP_TL, self.d_mlp)):
            m = pattern.match(name)
            if m:
                return int(m.group(1)), width
        m = re.match(rf"^{re.escape(self.blocks_path)}\.(\d+)", name)
        if m is None:
            raise E2EDictError(f"the memory plan cannot tell the width of position {name!r}")
        return int(m.group(1)), self._module_width(name)

    def _module_width(self, name: str) -> int:
        """The width of a module path's output (``:input``: its input), from one meta forward."""
        from e2edict.backbones.hf_blocks import first_tensor, unpacked

        path, _, which = name.partition(":")
        try:
            module = self.hf.get_submodule(path)
        except AttributeError:
            raise E2EDictError(f"position {name!r} is not a module of {self.cfg.model.name!r}") from None
        got: list[int] = []
        hook = (module.register_forward_pre_hook(lambda mod, args: got.append(args[0].shape[-1])) if which
                else module.register_forward_hook(lambda mod, args, out: got.append(first_tensor(out).shape[-1])))  # fmt: skip
        try:
            with torch.no_grad(), unpacked():
                self.hf(inputs_embeds=torch.empty(1, 2, self.d_model, device="meta", dtype=self.dtype), use_cache=False)
        finally:
            hook.remove()
        return int(got[0])


def graph_start(position: str) -> int | None:
    """The first block a spliced run's graph goes through for an SAE at ``position``: its own
    block where it reads that block's input (``blocks.L.hook_resid_pre``, ``<blocks>.L:input``),
    else the next; None for a name that numbers no block."""
    m = re.match(r"^(?:.*\.)?(\d+)(\.hook_resid_pre|:input)?(\..*)?$", position)
    if m is None:
        return None
    block = int(m.group(1))
    return block if m.group(2) and not m.group(3) else block + 1


def _hf_on_meta(cfg: Config, hf, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(hf, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _tl_on_meta(cfg: Config, hf, dtype: torch.dtype):
    """The `TLBackbone` of a `HookedTransformer` built on the meta device from the config alone."""
    import warnings

    from transformer_lens import HookedTransformer

    from e2edict.backbones.transformer_lens import TLBackbone, gpt2_hooked_config, resolve_model_path

    if resolve_model_path(cfg.model.name) is not None:
        tl_cfg = gpt2_hooked_config(hf, cfg.model.name, "meta", dtype)
    else:
        from transformer_lens.loading_from_pretrained import get_pretrained_model_config

        tl_cfg = get_pretrained_model_config(cfg.model.name, device="meta", dtype=dtype)
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.filterwarnings("ignore", message="HookedTransformer is deprecated", category=DeprecationWarning)
        model = HookedTransformer(tl_cfg, move_to_device=False)
    for p in model.parameters():
        p.requires_grad_(False)
    return TLBackbone(model, cfg.model.name, cfg.model.fused_attention)


def _bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def _weights(plan: Plan, s: _Shapes, cfg: Config, sharded: bool) -> None:
    total = _bytes(s.model.parameters())
    n = plan.gpus if sharded else 1
    if sharded:  # loaded in model.dtype, cast on the CPU, then split (`e2edict.preparation._shard`)
        plan.cpu_load = sum(p.numel() for p in s.model.parameters()) * getattr(torch, cfg.model.dtype).itemsize
    note = f"{size(total)} in all" + (f", 1/{n} each" if sharded else "")
    plan.lines.append(Line("model weights", -(-total // n), note))
    if sharded:
        blocks = _bytes(s.blocks.parameters())
        root = total - blocks
        largest = max(_bytes(b.parameters()) for b in s.blocks)
        gathered = root + 2 * largest - (root + 2 * largest) // n
        plan.lines.append(Line("gathered during a step", gathered, "embeddings and head, the running and the next block"))
    v_pad = -(-s.vocab // 64) * 64
    plan.lines.append(Line("fused head (fp32)", s.d_model * v_pad * 4, "the unembedding for the KL"))


def _sae_state(plan: Plan, s: _Shapes, cfg: Config) -> None:
    params = sum(_bytes(sae.parameters()) for sae, _ in s.saes)
    buffers = sum(_bytes(sae.buffers()) for sae, _ in s.saes)
    many = "s" if len(s.saes) > 1 else ""
    plan.lines.append(Line("SAE weights", params + buffers, f"{len(s.saes)} SAE{many}, fp32 (and their buffers)"))
    if not cfg.saes.trainable:
        return
    ddp = plan.gpus > 1
    plan.lines.append(Line("SAE gradients", params * (2 if ddp else 1), "and DDP's gradient buckets" if ddp else ""))
    plan.lines.append(Line("optimizer state", 2 * params, f"{cfg.train.optimizer}: two moments per weight"))


def _build_sae(cfg: Config, d_in: int, d_out: int):
    from e2edict.run import dictionary_size
    from e2edict.saes import registry
    from e2edict.saes.base import Writes

    writes = Writes(d_out, "out", cfg.saes.kind == "skip_transcoder") if cfg.saes.kind != "sae" else None
    cls = registry[cfg.saes.architecture]
    sae = cls.from_config(d_in, dictionary_size(cfg, d_in), "h", cfg.saes, **({"writes": writes} if writes else {}))
    sae.train()
    return sae


def _activations(plan: Plan, s: _Shapes, cfg: Config) -> None:
    """Activations kept for backward for one micro-batch: each SAE's, and the blocks' after the
    first SAE when a loss term reads past it (with checkpointing: each block's input, and one
    block's own again while the backward recomputes it)."""
    b, n = cfg.train.batch_size, cfg.data.n_ctx
    saes = 0
    for sae, d_out in s.saes:
        x = torch.empty(b * n, sae.d_in, device="meta", dtype=s.dtype)
        saes += _saved(lambda sae=sae, x=x, d_out=d_out: _sae_terms(sae, x, d_out, cfg), sae.parameters())
    plan.lines.append(Line("activations: SAEs", saes, f"{b} x {n} tokens"))
    plan.per_sequence = saes // b
    if cfg.loss.kl.coeff == 0 and cfg.loss.downstream.coeff == 0:
        return  # local training: nothing past the last SAE runs
    first = min(block for block, _, _ in s.positions.values())
    after = len(s.blocks) - first  # 0: an SAE after the last block's input, only the final norm and head follow
    x = torch.empty(b, n, s.d_model, device="meta", dtype=s.dtype, requires_grad=True)
    if cfg.train.activation_checkpointing and after > 0:
        kept = after * x.numel() * x.element_size()
        plan.lines.append(Line("activations: blocks after the SAE", kept, f"{after} block inputs (checkpointing)"))
        again = _saved(lambda: s.blocks_forward(x, len(s.blocks) - 1), s.model.parameters())
        plan.lines.append(Line("one block recomputed in backward", again, "its activations, one block at a time"))
    else:
        kept = _saved(lambda: s.blocks_forward(x, first), s.model.parameters())
        plan.lines.append(Line("activations: blocks after the SAE", kept, f"{after} blocks"))
        again = 0
    hidden = 2 * b * n * s.d_model * 4
    plan.lines.append(Line("final hidden states (fp32)", hidden, "clean and spliced, for the fused KL"))
    plan.per_sequence = (saes + kept + again + hidden) // b


def _sae_terms(sae, x: torch.Tensor, d_out: int, cfg: Config) -> None:
    """One SAE's forward and the loss terms training computes from it (`e2edict.splice._sae_terms`):
    its sparsity term (computed, and logged, also where its coefficient is 0), and with a local
    term its MSE and auxiliary loss."""
    out, c = sae(x)
    sae.sparsity_loss(x, c, cfg.loss.sparsity.p)
    if cfg.loss.local.coeff > 0:
        target = x if d_out == x.shape[-1] else torch.empty(*x.shape[:-1], d_out, device="meta", dtype=x.dtype)
        sae.local_loss(out, target, c)
        sae.aux_loss(x, out, c)
    sae.release_forward()


class _FlashKept(torch.autograd.Function):
    """What a fused attention kernel (flash or memory-efficient, on GPU and CPU alike) keeps for
    backward: q, k, v, the output and one log-sum-exp per query; on the meta device PyTorch would
    otherwise count the attention matrix its math fallback keeps."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


def _fused_attention(q, k, v, *args, **kwargs):
    return _FlashKept.apply(q, k, v)


def _saved(run, params) -> int:
    """Bytes of the tensors autograd saves for backward while ``run()`` runs, weights left out;
    attention counted as a fused kernel keeps it (`_FlashKept`)."""
    import torch.nn.functional as F

    weights = {p.untyped_storage()._cdata for p in params}
    seen: dict[Any, torch.Tensor] = {}  # each storage once, held so that no address is reused while counting

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage()._cdata
        if key not in weights:
            seen[key] = t
        return t

    sdpa, F.scaled_dot_product_attention = F.scaled_dot_product_attention, _fused_attention
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run()
    finally:
        F.scaled_dot_product_attention = sdpa
    return sum(t.untyped_storage().nbytes() for t in seen.values())
