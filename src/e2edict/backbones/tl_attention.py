"""Fused attention (``F.scaled_dot_product_attention``) for TransformerLens models.

TransformerLens computes attention as written: the [batch, heads, pos, pos] scores, a softmax,
the pattern times the values, each step a tensor in memory and a hook point. Training an SAE never
reads the scores or the pattern, and on a GPU this unfused attention makes TransformerLens's
step much slower than the same model through Hugging Face (SDPA; `docs/performance.md`). So each attention module's
forward is swapped for one that computes q, k and v as TransformerLens does (``hook_q``, ``hook_k``,
``hook_v``, ``hook_rot_q``/``hook_rot_k``, ``hook_z`` all still fire), and the scores, softmax and
weighted sum in one fused kernel.

The fused path is taken only where it computes the same function: causal self-attention without
a cache or attention mask, standard or rotary positions, no attention soft-cap, sinks, ALiBi,
QK-norm or clipping, one key/value head per query head, and nothing hooked at ``hook_attn_scores``
or ``hook_pattern`` (``run_with_cache`` and user hooks there get TransformerLens's own forward).
Everything else falls through to the original forward, call by call.
"""

from __future__ import annotations

import contextlib
import types

import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

from e2edict.precision import is_full

_UNSUPPORTED_ARCHS = ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM")


def supports_fused(cfg) -> bool:
    """Whether a model's attention (by its config) is one the fused forward computes exactly."""
    kv = getattr(cfg, "n_key_value_heads", None)
    return (
        cfg.positional_embedding_type in ("standard", "rotary")
        and (getattr(cfg, "attention_dir", "causal") == "causal")
        and not getattr(cfg, "use_attn_result", False)
        and not getattr(cfg, "use_attention_sinks", False)
        and not getattr(cfg, "use_logn_attn", False)
        and not getattr(cfg, "load_in_4bit", False)
        and getattr(cfg, "clip_qkv", None) is None
        and (getattr(cfg, "attn_scores_soft_cap", -1.0) or -1.0) <= 0
        and (kv is None or kv == cfg.n_heads)
        and cfg.original_architecture not in _UNSUPPORTED_ARCHS
    )


def _hooked(hook_point) -> bool:
    return bool(getattr(hook_point, "fwd_hooks", None) or getattr(hook_point, "bwd_hooks", None))


def _fused_forward(self, query_input, key_input, value_input, past_kv_cache_entry=None,
                   additive_attention_mask=None, attention_mask=None, position_bias=None):  # fmt: skip
    if (
        past_kv_cache_entry is not None
        or additive_attention_mask is not None
        or attention_mask is not None
        or position_bias is not None
        or getattr(self, "_attention_dir_override", None) not in (None, "causal")
        or _hooked(self.hook_attn_scores)
        or _hooked(self.hook_pattern)
    ):
        _forget_norm(self)
        return type(self).forward(self, query_input, key_input, value_input, past_kv_cache_entry,
                                  additive_attention_mask, attention_mask, position_bias)  # fmt: skip
    normed = _forget_norm(self)
    # One q/k/v GEMM in low precision, where it pays on a GPU (fp32 keeps TransformerLens's three,
    # so fp32 results are bit for bit its own). The three inputs are one tensor: the block passes
    # its first norm's output (computed once, `normed`) as the values, and that plus 0.0 (a
    # shortformer position term it does not have) as queries and keys.
    one_input = query_input is key_input is value_input or (
        value_input is normed and self.cfg.positional_embedding_type != "shortformer"
    )
    if one_input and not is_full(value_input.dtype) and _qkv_fusable(self):
        q, k, v = _fused_qkv(self, value_input)
    else:
        q, k, v = self.calculate_qkv_matrices(query_input, key_input, value_input)  # [batch, pos, head, d_head]
    if self.cfg.positional_embedding_type == "rotary":
        q = self.hook_rot_q(self.apply_rotary(q, 0, None))
        k = self.hook_rot_k(self.apply_rotary(k, 0, None))
    v = v.to(q.dtype)
    z = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=1.0 / float(self.attn_scale)
    ).transpose(1, 2)
    z = self.hook_z(z)  # [batch, pos, head, d_head], as TransformerLens's
    W_O = self.W_O.reshape(-1, self.W_O.shape[-1])  # [head * d_head, d_model], a view
    z = z.reshape(*z.shape[:2], -1).to(W_O.dtype)
    return torch.matmul(z, W_O) + self.b_O


def _qkv_fusable(attn) -> bool:
    cfg = attn.cfg
    plain = not (cfg.use_split_qkv_input or cfg.use_attn_in or cfg.load_in_4bit or getattr(cfg, "use_qk_norm", False))
    return plain and all(isinstance(getattr(attn, n, None), torch.Tensor) for n in ("W_Q", "W_K", "W_V", "b_Q", "b_K", "b_V"))


def _fused_qkv(attn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k and v [batch, pos, head, d_head] from one GEMM on [d_model, 3 * heads * d_head]
    (TransformerLens runs three), with ``hook_q``, ``hook_k`` and ``hook_v`` firing as its own."""
    W, b = _qkv_weights(attn)
    n_heads, d_head = attn.W_Q.shape[0], attn.W_Q.shape[2]
    out = torch.addmm(b, x.reshape(-1, x.shape[-1]).to(W.dtype), W).view(*x.shape[:-1], 3, n_heads, d_head)
    q, k, v = out.unbind(-3)
    return attn.hook_q(q), attn.hook_k(k), attn.hook_v(v)


def _qkv_weights(attn) -> tuple[torch.Tensor, torch.Tensor]:
    """W_Q, W_K, W_V side by side as one [d_model, 3 * heads * d_head] matrix and their biases,
    built once and again only when a weight changes (a cast, a restore, an edit); built on every
    call, with its graph, where an adapter parametrizes the weights (`e2edict.adapters`)."""
    ws, bs = (attn.W_Q, attn.W_K, attn.W_V), (attn.b_Q, attn.b_K, attn.b_V)
    if parametrize.is_parametrized(attn):  # an adapter computes its weights afresh: no cache, and its graph kept
        W = torch.cat([w.permute(1, 0, 2).reshape(w.shape[1], -1) for w in ws], dim=1)
        return W, torch.cat([t.reshape(-1) for t in bs])
    key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in (*ws, *bs))
    cached = attn.__dict__.get("_e2edict_qkv")
    if cached is None or cached[0] != key:
        with torch.no_grad():
            W = torch.cat([w.permute(1, 0, 2).reshape(w.shape[1], -1) for w in ws], dim=1).contiguous()
            b = torch.cat([t.reshape(-1) for t in bs])
        attn.__dict__["_e2edict_qkv"] = cached = (key, W, b)
    return cached[1], cached[2]


def _memo_norm_forward(self, x):
    """The block calls its first norm three times on one tensor (for q, k and v): in low precision
    compute it once. The attention after it forgets the memo (`_forget_norm`), so it holds nothing
    between calls."""
    if is_full(x.dtype):
        # fp32 keeps TransformerLens's three norms: one shared output would sum the q, k and v
        # gradients before the norm's backward, a different rounding than TransformerLens's own
        return type(self).forward(self, x)
    memo = self.__dict__.get("_e2edict_memo")
    if memo is not None and memo[0] is x:
        return memo[1]
    out = type(self).forward(self, x)
    self.__dict__["_e2edict_memo"] = (x, out)
    return out


def _forget_norm(attn) -> torch.Tensor | None:
    """Drop the block's norm memo; return the norm output it held (None: none)."""
    norm = attn.__dict__.get("_e2edict_ln1")
    memo = norm.__dict__.pop("_e2edict_memo", None) if norm is not None else None
    return memo[1] if memo is not None else None


def use_fused_attention(model) -> int:
    """Route every attention module of a `HookedTransformer` through SDPA (see the module
    docstring); returns how many were switched (0 when the model's attention is not supported)."""
    if not supports_fused(model.cfg):
        return 0
    n = 0
    for block in model.blocks:
        attn = getattr(block, "attn", None)
        if attn is not None and hasattr(attn, "calculate_qkv_matrices") and hasattr(attn, "hook_pattern"):
            attn.forward = types.MethodType(_fused_forward, attn)
            ln1 = getattr(block, "ln1", None)
            if isinstance(ln1, torch.nn.Module) and not isinstance(ln1, torch.nn.Identity):
                ln1.forward = types.MethodType(_memo_norm_forward, ln1)
                attn.__dict__["_e2edict_ln1"] = ln1  # not a submodule: no second path to its parameters
            n += 1
    return n


@contextlib.contextmanager
def fused_attention_inside(model):
    """Inside: e2edict's fused attention (a backbone built here switches it on); after: each
    attention module's forward as it was on entry (TransformerLens's own where it was that)."""
    before = [(m, m.__dict__.get("forward"), m.__dict__.get("_e2edict_ln1")) for m in _patchable(model)]
    try:
        yield model
    finally:
        for m, fwd, ln1 in before:
            for name, value in (("forward", fwd), ("_e2edict_ln1", ln1), ("_e2edict_memo", None), ("_e2edict_qkv", None)):
                if value is None:
                    m.__dict__.pop(name, None)
                else:
                    m.__dict__[name] = value


def _patchable(model) -> list:
    """Each block's attention and first norm: the modules `use_fused_attention` changes."""
    return [
        m for b in model.blocks for m in (getattr(b, "attn", None), getattr(b, "ln1", None)) if isinstance(m, torch.nn.Module)
    ]


def use_unfused_attention(model) -> None:
    """Undo `use_fused_attention`: TransformerLens's own forward everywhere."""
    for m in _patchable(model):
        for name in ("forward", "_e2edict_ln1", "_e2edict_memo", "_e2edict_qkv"):
            m.__dict__.pop(name, None)
