"""TransformerLens backbone: the embedded model, any GPT-2-architecture Hugging Face folder
(converted offline), or a TransformerLens model name (downloaded by TransformerLens itself)."""

from __future__ import annotations

import contextlib
import io
import json
import re
import warnings
from functools import partial
from pathlib import Path

import torch
from torch.nn.utils import parametrize

from e2edict.backbones.activations import checked, swapped
from e2edict.backbones.base import Backbone
from e2edict.backbones.head import Head
from e2edict.backbones.in_turn import HookFn, KeptHooks, StopForward, blocks_in_turn
from e2edict.backbones.tl_attention import use_fused_attention
from e2edict.errors import E2EDictError
from e2edict.precision import is_full
from e2edict.sources import bos_id  # the one BOS lookup

EMBEDDED = {"tiny"}
_RESID_RE = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|post)$")


def resolve_model_path(name_or_path: str) -> Path | None:
    """A local folder for ``name_or_path`` (an embedded name or a path), or None for a hub name."""
    from e2edict.assets import ASSETS_DIR

    if name_or_path in EMBEDDED:
        return ASSETS_DIR / name_or_path
    p = Path(name_or_path).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise E2EDictError(f"model folder {str(p)!r} has no config.json")
        return p
    return None


def _gpt2_folder_to_hooked(path: Path, device: str, dtype: torch.dtype):
    from transformer_lens import HookedTransformer
    from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        hf_cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise E2EDictError(f"model folder {str(path)!r}: config.json is unreadable ({e})") from None
    archs = hf_cfg.get("architectures") or [hf_cfg.get("model_type", "?")]
    if "GPT2LMHeadModel" not in archs:
        raise E2EDictError(
            f"model folder {str(path)!r} is a {archs[0]}; the TransformerLens backend converts GPT2LMHeadModel folders"
        )
    hf = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32, trust_remote_code=False)
    cfg = gpt2_hooked_config(hf.config, path.name, device, dtype)
    tokenizer = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").exists() else None
    with warnings.catch_warnings():
        # e2edict relies on HookedTransformer's hook names and start/stop_at_layer on purpose.
        warnings.filterwarnings("ignore", message="HookedTransformer is deprecated", category=DeprecationWarning)
        model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    state = convert_gpt2_weights(hf, cfg)
    # No weight processing: hook activations equal the Hugging Face model's hidden states.
    model.load_and_process_state_dict(
        state, fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False
    )
    model.to(dtype)
    return model.to(device)


def gpt2_hooked_config(c, name: str, device: str, dtype: torch.dtype):
    """TransformerLens's config of a Hugging Face GPT-2 config (weights kept as they are: no processing)."""
    from transformer_lens import HookedTransformerConfig

    return HookedTransformerConfig(
        d_model=c.n_embd,
        d_head=c.n_embd // c.n_head,
        n_heads=c.n_head,
        d_mlp=c.n_inner or 4 * c.n_embd,
        n_layers=c.n_layer,
        n_ctx=c.n_positions,
        eps=c.layer_norm_epsilon,
        d_vocab=c.vocab_size,
        act_fn=c.activation_function,
        use_attn_scale=c.scale_attn_weights,
        scale_attn_by_inverse_layer_idx=c.scale_attn_by_inverse_layer_idx,
        normalization_type="LN",
        original_architecture="GPT2LMHeadModel",
        model_name=name,
        tokenizer_prepends_bos=False,
        default_prepend_bos=True,
        dtype=dtype,
        device=device,
    )


def load_hooked_transformer(
    name_or_path: str, device: str = "cpu", dtype: torch.dtype = torch.float32, process_weights: bool = False
):
    """Load a `HookedTransformer` with frozen weights. TransformerLens's messages ("Moving model
    to device", "Changing model dtype") are dropped: they say nothing a user asked about, and
    stdout stays machine-readable (``e2edict hooks``)."""
    with contextlib.redirect_stdout(io.StringIO()):
        return _load_hooked_transformer(name_or_path, device, dtype, process_weights)


def _load_hooked_transformer(name_or_path: str, device: str, dtype: torch.dtype, process_weights: bool):
    path = resolve_model_path(name_or_path)
    if path is not None:
        model = _gpt2_folder_to_hooked(path, device, dtype)
    else:
        from transformer_lens import HookedTransformer

        loader = HookedTransformer.from_pretrained if process_weights else HookedTransformer.from_pretrained_no_processing
        try:
            model = loader(name_or_path, device=device, dtype=dtype)
        except Exception as e:  # TransformerLens raises many types for unknown or unreachable names
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise E2EDictError(f"cannot load model {name_or_path!r}: {first}") from None
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class TLBackbone(Backbone):
    """A `HookedTransformer` behind the `Backbone` interface."""

    def __init__(self, model, name: str, fused_attention: bool = True):
        self.model = model
        self.fused_attention = use_fused_attention(model) > 0 if fused_attention else False
        self.name = name
        self.n_layers = model.cfg.n_layers
        self.n_ctx = model.cfg.n_ctx
        tok = self.tokenizer = model.tokenizer
        self.d_vocab = model.cfg.d_vocab
        self.bos_token_id = int(bos_id(tok) or 0)
        self._shapes: dict[str, tuple[int, ...]] | None = None
        # GPT-2's GELU formula as one kernel in the backbone's own runs (`e2edict.backbones.activations`)
        mlps = [getattr(b, "mlp", None) for b in model.blocks]
        self._gelus = checked([(m, "act_fn") for m in mlps if getattr(getattr(m, "act_fn", None), "__name__", "") == "gelu_new"])
        self._kept = KeptHooks(self._register_kept)  # hooks inside blocks for `_run_plain` (`keep_hooks`)

    @property
    def blocks(self) -> torch.nn.ModuleList:
        return self.model.blocks

    def unembed(self) -> torch.Tensor:
        return self.model.W_U

    def _build_head(self) -> Head:
        u = self.model.unembed
        cap = getattr(self.model.cfg, "output_logits_soft_cap", 0.0) or 0.0
        return Head.padded(u.W_U.detach(), u.b_U.detach(), cap)

    def _move_to(self, dtype: torch.dtype) -> None:
        with contextlib.redirect_stdout(io.StringIO()):  # TransformerLens prints "Changing model dtype"
            self.model.to(dtype)

    def hook_shapes(self) -> dict[str, tuple[int, ...]]:
        if self._shapes is None:
            shapes: dict[str, tuple[int, ...]] = {}

            def record(act, hook):
                if hook.name.startswith("blocks.") and act.dim() == 3 and act.shape[2] > 1:
                    shapes[hook.name] = tuple(act.shape[2:])

            toks = torch.zeros((1, 2), dtype=torch.long, device=self.model.cfg.device)
            with torch.no_grad():
                self.model.run_with_hooks(toks, fwd_hooks=[(lambda n: True, record)], return_type=None)
            self._shapes = shapes
        return self._shapes

    def embed_to(self, tokens: torch.Tensor, layer: int) -> torch.Tensor:
        with torch.no_grad(), self._weights_once(), swapped(self._gelus):
            return self.model(tokens, stop_at_layer=layer)

    def _weights_once(self):
        """With an adapter, each adapted (parametrized) weight is computed once per pass, however
        often the attention reads it (its shape, the fused q/k/v check); a no-op without one."""
        return parametrize.cached() if self.adapter is not None else contextlib.nullcontext()

    @contextlib.contextmanager
    def _recompute_context(self):
        with self._weights_once(), swapped(self._gelus):
            yield

    def run_from(self, resid: torch.Tensor, layer: int, hooks: dict[str, HookFn], logits: bool = True, hidden: bool = False):
        with self._weights_once(), swapped(self._gelus):
            return self._run_from(resid, layer, self.at_block_inputs(hooks), logits, hidden)

    def next_block_input(self, hook_name: str) -> str | None:
        """``blocks.(i+1).hook_resid_pre`` for ``blocks.i.hook_resid_post`` of every block but the
        last (TransformerLens feeds a block's output to the next unchanged)."""
        m = _RESID_RE.match(hook_name)
        if m is None or m.group(2) != "post" or int(m.group(1)) + 1 >= self.n_layers:
            return None
        return f"blocks.{int(m.group(1)) + 1}.hook_resid_pre"

    def _boundary(self, hook_name: str) -> tuple[int, bool] | None:
        m = _RESID_RE.match(hook_name)
        return None if m is None else (int(m.group(1)), m.group(2) == "pre")

    def _register_kept(self, name: str, fn: HookFn):
        # a torch hook on the HookPoint, not TransformerLens's own: its reset_hooks leaves it in place
        return self.model.hook_dict[name].register_forward_hook(lambda module, args, out: fn(out))

    def _run_from(self, resid: torch.Tensor, layer: int, hooks: dict[str, HookFn], logits: bool, hidden: bool):
        if self._plain_hooks(hooks):
            return self._run_plain(resid, layer, hooks, logits, hidden)

        def wrap(fn, act, hook):
            return fn(act)

        if not (logits or hidden):
            hooks = self.stop_after_last(hooks)
        fwd = [(name, partial(wrap, fn)) for name, fn in hooks.items()]
        try:
            with self.model.hooks(fwd_hooks=fwd):
                out = self.model(resid, start_at_layer=layer, stop_at_layer=self.n_layers)
                if hidden:
                    return self._final_hidden(out)
                return self._head(out) if logits else None
        except StopForward:
            return None

    def _run_plain(self, resid: torch.Tensor, layer: int, hooks: dict[str, HookFn], logits: bool, hidden: bool):
        """`run_from` for hooks on the residual stream and kept hooks inside blocks (`keep_hooks`):
        the blocks are called one after the other and each residual hook is applied between them,
        with none of TransformerLens's hook machinery (no hook registered and removed per call,
        no exception to stop early), which a compiler sees as one straight function. Without
        logits or hidden states the run ends after the last hooked block."""

        def blocks(pre, post, inside, recompute) -> torch.Tensor | None:
            call = lambda i, x: self.model.blocks[i](x)  # noqa: E731
            return blocks_in_turn(resid, layer, self.n_layers, call, pre, post, not (logits or hidden), inside, recompute)

        resid = self._in_turn(hooks, blocks)
        if resid is None:
            return None
        if hidden:
            return self._final_hidden(resid)
        return self._head(resid) if logits else None

    def _final_norm(self, residual: torch.Tensor) -> torch.Tensor:
        m = self.model
        return m.ln_final(residual) if m.cfg.normalization_type is not None else residual

    def _final_hidden(self, residual: torch.Tensor) -> torch.Tensor:
        """The head's input in fp32 also when the model is held in bf16: TransformerLens's norm
        rounds its output to the model's dtype, and the fused KL needs the unrounded states (a
        bf16 rounding of both runs' states is as large as the difference a small KL is made of)."""
        m, kind = self.model, self.model.cfg.normalization_type
        if is_full(residual.dtype) or kind not in ("LN", "LNPre", "RMS", "RMSPre"):
            return self._final_norm(residual)
        x, eps = residual.float(), m.cfg.eps
        w = m.ln_final.w.float() if kind in ("LN", "RMS") else None
        if kind in ("LN", "LNPre"):
            b = m.ln_final.b.float() if kind == "LN" else None
            return torch.nn.functional.layer_norm(x, x.shape[-1:], w, b, eps)
        x = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
        return x * w if w is not None else x

    def _head(self, residual: torch.Tensor) -> torch.Tensor:
        """Final norm and unembedding as TransformerLens computes them (its hook points fire), but
        with ``x @ W_U`` read in place: TransformerLens's `Unembed` copies ``W_U.T`` on every call."""
        m = self.model
        x = m.unembed.hook_in(self._final_norm(residual))
        out = torch.addmm(m.unembed.b_U, x.reshape(-1, x.shape[-1]), m.unembed.W_U).view(*x.shape[:-1], -1)
        out = m.unembed.hook_out(out)
        cap = getattr(m.cfg, "output_logits_soft_cap", 0.0) or 0.0
        return cap * torch.tanh(out / cap) if cap > 0 else out
