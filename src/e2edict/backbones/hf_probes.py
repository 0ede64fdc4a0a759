"""What the Hugging Face backbone finds out about a model when it loads (`HFBackbone.__init__`):
its hook points and their widths, and, each checked on a short probe input against the model's
own forward, which of the faster paths reproduce it exactly. Every probe returns what it found
and changes nothing; the backbone keeps the answers.

- `discover_hook_shapes`: every [batch, pos, d] module activation from the first block on;
- `outputs_feed_next`: each block's output is exactly the next block's input;
- `find_final_norm`: the module whose output is the head's input;
- `head_matches`: the logits are the fused `Head` applied to that input;
- `blocks_in_turn_match`: the blocks called in turn give the model's final hidden states;
- `removal_keeps_logits`: the forward with the blocks before ``layer`` taken out gives the same logits.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from e2edict.backbones.hf_blocks import first_tensor
from e2edict.backbones.naming import INPUT_SUFFIX

log = logging.getLogger("e2edict.backbones.huggingface")


def is_mlp(path: str) -> bool:
    """A module path whose last part names an MLP (``mlp``, ``feed_forward`` is not matched)."""
    return "mlp" in path.rpartition(".")[2].lower()


def mlp_under(shapes: dict, block: str) -> str | None:
    """The MLP module directly under ``block`` (a module path) among ``shapes``' hooks, where it has exactly one."""
    depth = block.count(".") + 1
    mlps = [h for h in shapes if h.startswith(block + ".") and is_mlp(h) and h.count(".") == depth]
    return mlps[0] if len(mlps) == 1 else None


def key(t) -> tuple[int, int]:
    return (t.data_ptr(), t.numel()) if isinstance(t, torch.Tensor) else (id(t), -1)


def fp32_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)`` computed in fp32 (fp32 input and parameters), whatever the model's dtype."""
    params = {k: v.float() for k, v in norm.named_parameters()}
    return torch.func.functional_call(norm, params, (x.float(),))


def discover_hook_shapes(bb) -> dict[str, tuple[int, ...]]:
    """Every module activation from the first block on that is [batch, pos, d] (dropouts left
    out): block inputs always, other modules' inputs where they are not already another
    module's output. The final norm is listed (a downstream hook may read it), though no SAE
    can sit there (`block_of`)."""
    shapes: dict[str, tuple[int, ...]] = {}
    seen: set[int] = set()
    alive: list[torch.Tensor] = []  # seen tensors stay referenced, so no new tensor reuses an id
    started = [False]
    head = bb.model.get_output_embeddings()
    block_ids = {id(b) for b in bb.blocks}
    handles = []

    def ok(t) -> bool:
        return isinstance(t, torch.Tensor) and t.dim() == 3 and t.is_floating_point() and t.shape[2] > 1

    def pre(name):
        def fn(module, args, kwargs):
            if id(module) in block_ids:
                started[0] = True
            if not started[0] or module is head:
                return
            x = args[0] if args else kwargs.get("hidden_states")
            # a block's or an MLP's input always (transcoders read it), other inputs where new
            if ok(x) and (id(module) in block_ids or id(x) not in seen or is_mlp(name)):
                shapes[name + INPUT_SUFFIX] = tuple(x.shape[2:])
                seen.add(id(x))
                alive.append(x)

        return fn

    def post(name):
        def fn(module, args, out):
            out = first_tensor(out)
            if started[0] and module is not head and ok(out):
                shapes[name] = tuple(out.shape[2:])
                seen.add(id(out))
                alive.append(out)

        return fn

    for name, mod in bb.model.named_modules():
        # no dropout: in eval mode its output is its input, the activation before it
        if not name or isinstance(mod, nn.ModuleList | nn.Dropout):
            continue
        handles.append(mod.register_forward_pre_hook(pre(name), with_kwargs=True))
        handles.append(mod.register_forward_hook(post(name)))
    try:
        with torch.no_grad():
            bb.model(input_ids=torch.zeros((1, 2), dtype=torch.long, device=bb.device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return shapes


def probe_tokens(bb, batch: int = 1) -> torch.Tensor:
    """The load checks' input: long enough that a sliding-window attention masks something
    (a shorter probe cannot tell a sliding-window block from a global one), rows differing."""
    cfg = bb.model.config.get_text_config() if hasattr(bb.model.config, "get_text_config") else bb.model.config
    window = max(int(getattr(cfg, k, None) or 0) for k in ("sliding_window", "window_size"))
    n = min(bb.n_ctx, max(4, window + 2))
    rows = [torch.arange(n) if r % 2 == 0 else torch.arange(n - 1, -1, -1) for r in range(batch)]
    return torch.stack(rows).to(bb.device) % max(2, bb.d_vocab)


def probe(bb, handles: list, batch: int = 1):
    """The model's own output on `probe_tokens`, without a graph, with ``handles`` in place (then removed)."""
    tokens = probe_tokens(bb, batch)
    try:
        with torch.no_grad():
            return bb.model(input_ids=tokens, use_cache=False)
    finally:
        for h in handles:
            h.remove()


def head_input(bb, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The model's logits on `probe_tokens` and its output embeddings' input (None where they
    were not called with one)."""
    got: list[torch.Tensor] = []
    handle = bb.model.get_output_embeddings().register_forward_pre_hook(lambda m, args: got.append(args[0]))
    logits = probe(bb, [handle], batch).logits
    return logits, (got[0] if got else None)


def outputs_feed_next(bb) -> bool:
    """Whether each block's output is exactly the next block's input (nothing between blocks
    in the model's loop), seen on `probe_tokens`."""
    if bb.n_layers < 2:
        return False
    outs: dict[int, torch.Tensor] = {}
    ins: dict[int, torch.Tensor] = {}

    def post(i):
        return lambda m, args, out: outs.__setitem__(i, first_tensor(out))

    def pre(i):
        return lambda m, args, kwargs: ins.__setitem__(i, args[0] if args else kwargs["hidden_states"])

    handles = [b.register_forward_hook(post(i)) for i, b in enumerate(bb.blocks)]
    handles += [b.register_forward_pre_hook(pre(i), with_kwargs=True) for i, b in enumerate(bb.blocks)]
    probe(bb, handles)
    ok = all(i in outs and i + 1 in ins and torch.equal(outs[i], ins[i + 1]) for i in range(bb.n_layers - 1))
    if not ok:
        log.info("block outputs of %s stay at the block (something runs between blocks)", bb.name)
    return ok


def find_final_norm(bb) -> nn.Module | None:
    """The module whose output is the head's input (the final norm), found on `probe_tokens`;
    None where the head's input is not one module's output."""
    outputs: dict[tuple[int, int], nn.Module] = {}  # by storage and size: the head may get a view of it
    got: list[torch.Tensor] = []
    handles = [
        m.register_forward_hook(lambda mod, args, out: outputs.__setitem__(key(out), mod))
        for name, m in bb.model.named_modules()
        if "norm" in type(m).__name__.lower() and not name.startswith(bb.blocks_path + ".")
    ]
    handles.append(bb.model.get_output_embeddings().register_forward_pre_hook(lambda m, args: got.append(args[0])))
    probe(bb, handles)
    norm = outputs.get(key(got[0])) if got else None
    if norm is None:
        return None
    with torch.no_grad():  # the fp32 recomputation must give the model's own output
        x = torch.randn(1, 4, bb._embed_dim, device=bb.device, dtype=got[0].dtype)
        same = torch.allclose(fp32_norm(norm, x), norm(x).float(), atol=1e-4, rtol=1e-4)
    return norm if same else None


def head_matches(bb) -> bool:
    """Whether the logits are exactly the head applied to the head's input (no scaling or other
    step after the output embeddings that `Head` does not know), so the fused KL may be used."""
    try:
        ref, x = head_input(bb)
        if x is None:
            return False
        with torch.no_grad():
            ours = bb._build_head().logits(x.reshape(-1, x.shape[-1]))[:, : bb.d_vocab]
    except Exception as e:  # an unusual head (a tuple input, a custom module): keep the logits path
        log.info("fused head off for %s: %s", bb.name, e)
        return False
    same = ours.shape == ref.reshape(-1, ref.shape[-1]).shape and torch.allclose(
        ours, ref.reshape(-1, ref.shape[-1]).float(), atol=1e-4, rtol=1e-4
    )
    if not same:
        log.info("fused head off for %s: the logits are not the output embeddings of the final hidden states", bb.name)
    return bool(same)


def blocks_in_turn_match(bb) -> bool:
    """Whether `_run_plain` gives the model's own final hidden states (the head's input) on
    `probe_tokens` of batch 2, from the middle block and from the first, with the arguments
    recorded at batch 1: then nothing the model does between its blocks is missed."""
    if bb._final_norm is None or not (bb.n_layers == 1 or bb._outputs_feed_next):
        return False
    tokens = probe_tokens(bb, batch=2)
    _, want = head_input(bb, batch=2)
    try:
        with torch.no_grad():
            ours = [
                bb._run_plain(bb.embed_to(tokens, layer), layer, {}, hidden=True)
                for layer in sorted({0, bb.n_layers // 2})
            ]
    except Exception as e:  # a block that cannot be called with the arguments recorded at batch 1
        log.info("blocks called in turn off for %s: %s", bb.name, e)
        return False
    same = want is not None and all(o.shape == want.shape and torch.allclose(o, want, atol=1e-5, rtol=1e-4) for o in ours)
    if not same:
        log.info("blocks called in turn off for %s: their output differs from the model's forward", bb.name)
    return same


def removal_keeps_logits(bb, layer: int) -> bool:
    """Whether running from ``layer`` with the blocks before it removed gives the full model's
    logits; checked once per layer, as a model may give a block its mask by its index in the
    list (Gemma 2's alternating sliding-window blocks: removing an odd number swaps them)."""
    tokens = probe_tokens(bb)
    ref = probe(bb, []).logits
    with torch.no_grad():
        try:
            got = bb._run_from(bb.embed_to(tokens, layer), layer, {}, True, remove=True)
        except Exception as e:  # the model's forward indexes its blocks in a way removal breaks
            log.info("shared prefix off for %s: %s", bb.name, e)
            return False
    same = got is not None and got.shape == ref.shape and torch.allclose(got, ref, atol=1e-4, rtol=1e-4)
    if not same:
        log.info("shared prefix off for %s from block %d: removing blocks changes the logits", bb.name, layer)
    return bool(same)
