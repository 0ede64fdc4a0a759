"""Hugging Face backbone: any ``transformers`` causal LM, hook points named by module path.

Hook names: ``<module path>`` is the module's output (the first element when it returns a
tuple), ``<module path>:input`` its first input (the ``hidden_states`` argument). So
``transformer.h.2:input`` is GPT-2's residual stream entering block 2 (TransformerLens's
``blocks.2.hook_resid_pre``) and ``transformer.h.2`` the stream leaving it (``hook_resid_post``).

Shared prefix: the blocks before the first SAE run once (`embed_to` stops at the block's input).
`run_from` then runs the model's own forward with the earlier blocks taken out of its block list
and the block's input replaced by the given residual stream, so masks, rotary embeddings, final
norm, logit soft-capping and the head are exactly the model's. A model whose forward does not
allow removing blocks (checked once on load) runs the prefix again instead, with its output
replaced: the same numbers, without the saving.

Residual-stream hooks alone (block inputs and outputs), in training: the blocks are called one
after the other with the arguments the model's own forward gives them, each hook applied between
them, then the final norm (`e2edict.backbones.hf_blocks`), where that equals the model's own
forward (checked on load, `hf_probes.blocks_in_turn_match`); no read-back in any of the backbone's passes.
"""

from __future__ import annotations

import logging
import re

import torch
from torch import nn

from e2edict.backbones.activations import checked
from e2edict.backbones.base import Backbone
from e2edict.backbones.head import Head
from e2edict.backbones.hf_blocks import BlockCalls, passes
from e2edict.backbones.hf_probes import (
    blocks_in_turn_match,
    discover_hook_shapes,
    find_final_norm,
    fp32_norm,
    head_matches,
    is_mlp,
    mlp_under,
    outputs_feed_next,
    removal_keeps_logits,
)
from e2edict.backbones.in_turn import HookFn, KeptHooks, StopForward
from e2edict.backbones.naming import INPUT_SUFFIX, HookNames
from e2edict.errors import E2EDictError
from e2edict.precision import is_full
from e2edict.sources import bos_id  # the one BOS lookup

log = logging.getLogger(__name__)


def load_hf_causal_lm(
    name_or_path: str, device: str = "cpu", dtype: torch.dtype = torch.float32, trust_remote_code: bool = False
):
    """A frozen ``AutoModelForCausalLM`` and its tokenizer (None when the model ships none).

    ``tiny`` is the embedded model; a folder is read from disk; anything else is a hub name,
    fetched by ``transformers`` (from its cache when ``HF_HUB_OFFLINE=1``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from e2edict.backbones.transformer_lens import resolve_model_path

    path = resolve_model_path(name_or_path)
    source = str(path) if path is not None else name_or_path
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError... for bad names and files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise E2EDictError(f"cannot load Hugging Face model {name_or_path!r}: {first}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception:  # a model folder without tokenizer files: token data (.npy, shards) still works
        tokenizer = None
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(device), tokenizer


def _block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's list of transformer blocks: the first `ModuleList` as long as the layer count."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    for path, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and (n is None or len(mod) == n):
            return path, mod
    raise E2EDictError(f"cannot find the transformer blocks of {type(model).__name__} (no ModuleList of {n} layers)")


def _tanh_gelus(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """GPT-2's GELU formula modules (transformers' ``NewGELUActivation``), whose forward the
    backbone's own passes run as one kernel (`e2edict.backbones.activations`)."""
    from transformers.activations import NewGELUActivation

    return checked([(m, "forward") for m in model.modules() if type(m) is NewGELUActivation])


class HFBackbone(Backbone):
    """A ``transformers`` causal LM behind the `Backbone` interface."""

    def __init__(self, model: nn.Module, tokenizer, name: str):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.blocks_path, self.blocks = _block_list(model)
        self.naming = HookNames("module", self.blocks_path, lambda block: mlp_under(self.hook_shapes(), block))
        self.n_layers = len(self.blocks)
        self._block_re = re.compile(rf"^{re.escape(self.blocks_path)}\.(\d+)(?:[.:]|$)")
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.n_ctx = int(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 2048)
        self.d_vocab = model.get_output_embeddings().weight.shape[0]
        found = bos_id(tokenizer)
        self.bos_token_id = int(found if found is not None else (bos_id(cfg) or 0))
        self._shapes: dict[str, tuple[int, ...]] | None = None
        self._embed_dim = model.get_input_embeddings().embedding_dim
        self._gelus = _tanh_gelus(model)  # before the checks below, which run as every pass will
        self.plain = False  # blocks called in turn (`_run_plain`), once `hf_probes.blocks_in_turn_match` has passed
        self._removable: dict[int, bool] = {}  # `_check_block_removal` per first block run
        self.shared_prefix = self._check_block_removal(self.n_layers // 2)
        self._outputs_feed_next = outputs_feed_next(self)  # block i's output placed at block i+1's input
        self._final_norm = find_final_norm(self)  # the head's input: fp32 under bf16 (`run_from`), named by `e2edict hooks`
        self.head_ok = head_matches(self)
        self._blocks_in_turn = BlockCalls(model, self.blocks, self._embed_dim, self._gelus)
        self._kept = KeptHooks(lambda name, fn: self._register({name: fn})[0])  # hooks inside blocks (`keep_hooks`)
        self.plain = blocks_in_turn_match(self)
        if not self.plain:
            self._blocks_in_turn.clear()

    def unembed(self) -> torch.Tensor:
        return self.model.get_output_embeddings().weight.T

    def _build_head(self) -> Head:
        lm = self.model.get_output_embeddings()
        cfg = self.model.config.get_text_config() if hasattr(self.model.config, "get_text_config") else self.model.config
        cap = getattr(cfg, "final_logit_softcapping", None) or 0.0
        return Head.padded(lm.weight.detach().T, getattr(lm, "bias", None), cap)

    # --- hook names -------------------------------------------------------------------------
    def _module(self, hook: str) -> tuple[nn.Module, bool]:
        path, is_input = (hook[: -len(INPUT_SUFFIX)], True) if hook.endswith(INPUT_SUFFIX) else (hook, False)
        try:
            return self.model.get_submodule(path), is_input
        except AttributeError:
            raise E2EDictError(f"model {self.name!r} has no module {path!r}") from None

    def hook_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every module activation from the first block on that is [batch, pos, d] (dropouts left
        out; `hf_probes.discover_hook_shapes`), found once."""
        if self._shapes is None:
            self._shapes = discover_hook_shapes(self)
        return self._shapes

    def mlp_pairs(self) -> dict[str, tuple[str, str]]:
        """Every MLP module inside a block (a module whose name contains ``mlp``, as in GPT-2,
        Llama, Gemma, Pythia): ``path -> (path:input, path)``."""
        shapes = self.hook_shapes()
        pairs = {}
        for name in shapes:
            if name.endswith(INPUT_SUFFIX) or not is_mlp(name):
                continue
            if name + INPUT_SUFFIX in shapes:
                pairs[name] = (name + INPUT_SUFFIX, name)
        return pairs

    def block_of(self, hook_name: str) -> int:
        m = self._block_re.match(hook_name)
        if not m:
            raise E2EDictError(f"hook {hook_name!r} is not inside a transformer block ({self.blocks_path}.N)")
        return int(m.group(1))

    def next_block_input(self, hook_name: str) -> str | None:
        """``<blocks>.(i+1):input`` for the output hook ``<blocks>.i`` of every block but the last,
        where the model feeds each block's output unchanged to the next (`hf_probes.outputs_feed_next`)."""
        m = self._block_re.match(hook_name)
        if not self._outputs_feed_next or m is None or hook_name != f"{self.blocks_path}.{m.group(1)}":
            return None
        nxt = int(m.group(1)) + 1
        return f"{self.blocks_path}.{nxt}{INPUT_SUFFIX}" if nxt < self.n_layers else None

    def is_block_input(self, hook_name: str) -> bool:
        return hook_name == f"{self.blocks_path}.{self.block_of(hook_name)}{INPUT_SUFFIX}"

    def resid_hooks_after(self, hook_name: str) -> list[str]:
        """Every later block's input and the last block's output (the final residual stream)."""
        layer = self.block_of(hook_name)
        block_out = hook_name == f"{self.blocks_path}.{layer}"
        first = layer + 2 if block_out else layer + 1
        hooks = [f"{self.blocks_path}.{j}{INPUT_SUFFIX}" for j in range(first, self.n_layers)]
        final = f"{self.blocks_path}.{self.n_layers - 1}"
        if final != hook_name:
            hooks.append(final)
        return hooks

    # --- forward passes ---------------------------------------------------------------------
    def _register(self, hooks: dict[str, HookFn]) -> list:
        handles = []
        for name, fn in hooks.items():
            module, is_input = self._module(name)
            if is_input:

                def pre(module, args, kwargs, fn=fn):
                    if args:
                        new = fn(args[0])
                        return None if new is None else ((new, *args[1:]), kwargs)
                    new = fn(kwargs["hidden_states"])
                    return None if new is None else (args, {**kwargs, "hidden_states": new})

                handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            else:

                def post(module, args, out, fn=fn):
                    if isinstance(out, (tuple, list)):
                        new = fn(out[0])
                        return None if new is None else type(out)((new, *out[1:]))
                    return fn(out)

                handles.append(module.register_forward_hook(post))
        return handles

    @torch.compiler.disable  # hooks and an exception; it runs without a graph, before the compiled runs
    def embed_to(self, tokens: torch.Tensor, layer: int) -> torch.Tensor:
        got: list[torch.Tensor] = []

        def stop(module, args, kwargs):
            got.append(args[0] if args else kwargs["hidden_states"])
            raise StopForward

        handle = self.blocks[layer].register_forward_pre_hook(stop, with_kwargs=True)
        try:
            with torch.no_grad(), passes(self._gelus):
                self.model(input_ids=tokens, use_cache=False)
        except StopForward:
            pass
        finally:
            handle.remove()
        if self.plain:  # recorded here, outside a compiled region, for the runs from this residual stream
            self._blocks_in_turn.arguments(got[0])
        return got[0]

    def run_from(self, resid: torch.Tensor, layer: int, hooks: dict[str, HookFn], logits: bool = True, hidden: bool = False):
        hooks = self.at_block_inputs(hooks)
        if self.plain and (hidden or not logits) and self._plain_hooks(hooks):
            return self._run_plain(resid, layer, hooks, hidden)
        remove = self._check_block_removal(layer)  # before any hook below is in place (it runs the model)
        if not hidden:
            if not logits:
                hooks = self.stop_after_last(hooks)
            return self._run_from(resid, layer, hooks, logits, remove)
        got: list[torch.Tensor] = []

        def take(module, args):
            got.append(args[0])
            raise StopForward

        # In bf16 the final norm runs in fp32 here (see `_fp32_norm`); the model's own forward stops at its input.
        norm = self._final_norm if not is_full(resid.dtype) else None
        module = norm if norm is not None else self.model.get_output_embeddings()
        handle = module.register_forward_pre_hook(take)
        try:
            self._run_from(resid, layer, hooks, True, remove)
        finally:
            handle.remove()
        if not got:
            return None
        return fp32_norm(norm, got[0]) if norm is not None else got[0]

    def final_norm_name(self) -> str | None:
        """The module path of the final norm (the head's input), where one was found."""
        return next((n for n, m in self.model.named_modules() if m is self._final_norm), None) if self._final_norm else None

    def _run_from(self, resid: torch.Tensor, layer: int, hooks: dict[str, HookFn], logits: bool, remove: bool):
        def inject(module, args, kwargs):
            if args:
                return (resid, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": resid}

        # Injection first, so a hook at this block's input sees the given residual stream.
        handles = [self.blocks[layer].register_forward_pre_hook(inject, with_kwargs=True, prepend=True)]
        if not logits:

            def stop(module, args):
                raise StopForward

            handles.append(self.model.get_output_embeddings().register_forward_pre_hook(stop))
        handles += self._register(hooks)
        parent_path, _, attr = self.blocks_path.rpartition(".")
        parent = self.model.get_submodule(parent_path) if parent_path else self.model
        # The input embeddings' values never reach a block (the residual stream is injected); only
        # their shape makes the model build its masks and positions.
        embeds = torch.zeros((*resid.shape[:2], self._embed_dim), dtype=resid.dtype, device=resid.device)
        try:
            if remove and layer > 0:
                setattr(parent, attr, nn.ModuleList(list(self.blocks)[layer:]))
            with passes(self._gelus):
                out = self.model(inputs_embeds=embeds, use_cache=False)
        except StopForward:
            return None
        finally:
            setattr(parent, attr, self.blocks)
            for h in handles:
                h.remove()
        return out.logits

    def _boundary(self, hook: str) -> tuple[int, bool] | None:
        m = self._block_re.match(hook)
        if m is None:
            return None
        base = f"{self.blocks_path}.{m.group(1)}"
        return (int(m.group(1)), hook != base) if hook in (base, base + INPUT_SUFFIX) else None

    def _recompute_context(self):
        return passes(self._gelus)

    def keep_hooks(self, names) -> None:
        if self.plain:  # otherwise every run is the model's own forward, with hooks registered per run
            super().keep_hooks(names)

    def _run_plain(self, resid: torch.Tensor, layer: int, hooks: dict[str, HookFn], hidden: bool):
        """`run_from` for block input and output hooks and kept hooks inside blocks: blocks
        ``layer..`` called in turn, boundary hooks between them; the final hidden states with
        ``hidden``, else None after the last hook."""
        resid = self._in_turn(
            hooks, lambda pre, post, inside, redo: self._blocks_in_turn.run(resid, layer, pre, post, not hidden, inside, redo)
        )
        return None if resid is None else self._hidden(resid)

    def _hidden(self, resid: torch.Tensor) -> torch.Tensor:
        """The final norm of the last block's output: in fp32 when the model is held in bf16."""
        if is_full(resid.dtype):
            return self._final_norm(resid)
        return fp32_norm(self._final_norm, resid)

    def _check_block_removal(self, layer: int) -> bool:
        """Whether the run from ``layer`` may take the blocks before it out of the model's block
        list (`hf_probes.removal_keeps_logits`), probed once per layer."""
        if self.n_layers < 2:
            return False
        if layer <= 0:
            return True  # nothing to take out
        if layer not in self._removable:
            self._removable[layer] = removal_keeps_logits(self, layer)
        return self._removable[layer]
