"""Fused attention (``F.scaled_dot_product_attention``) for TransformerLens models.

TransformerLens computes attention as written: the [batch, heads, pos, pos] scores, a softmax,
the pattern times the values, each step a tensor in memory and a hook point. Training an SAE never
reads the scores or the pattern, and on a GPU this unfused attention made TransformerLens's
step 1.56x slower than the same model through Hugging Face (SDPA). So each attention module's
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
        return type(self).forward(self, query_input, key_input, value_input, past_kv_cache_entry,
                                  additive_attention_mask, attention_mask, position_bias)  # fmt: skip
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
            n += 1
    return n


@contextlib.contextmanager
def fused_attention_inside(model):
    """Inside: e2edict's fused attention (a backbone built here switches it on); after: each
    attention module's forward as it was on entry (TransformerLens's own where it was that)."""
    before = [(attn, attn.__dict__.get("forward")) for attn in _attention_modules(model)]
    try:
        yield model
    finally:
        for attn, fwd in before:
            if fwd is None:
                attn.__dict__.pop("forward", None)
            else:
                attn.forward = fwd


def _attention_modules(model) -> list:
    return [b.attn for b in model.blocks if getattr(b, "attn", None) is not None]


def use_unfused_attention(model) -> None:
    """Undo `use_fused_attention`: TransformerLens's own forward everywhere."""
    for block in model.blocks:
        attn = getattr(block, "attn", None)
        if attn is not None and "forward" in attn.__dict__:
            del attn.forward
