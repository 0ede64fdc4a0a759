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
forward (checked on load, `_check_plain`); no read-back in any of the backbone's passes.
"""

from __future__ import annotations

import logging
import re

import torch
from torch import nn

from e2edict.backbones.activations import checked
from e2edict.backbones.base import Backbone
from e2edict.backbones.head import Head
from e2edict.backbones.hf_blocks import BlockCalls, first_tensor, passes
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


def _is_mlp(path: str) -> bool:
    """A module path whose last part names an MLP (``mlp``, ``feed_forward`` is not matched)."""
    return "mlp" in path.rpartition(".")[2].lower()


def _key(t) -> tuple[int, int]:
    return (t.data_ptr(), t.numel()) if isinstance(t, torch.Tensor) else (id(t), -1)


def _fp32_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)`` computed in fp32 (fp32 input and parameters), whatever the model's dtype."""
    params = {k: v.float() for k, v in norm.named_parameters()}
    return torch.func.functional_call(norm, params, (x.float(),))


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
        self.naming = HookNames("module", self.blocks_path, self._mlp_of)
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
        self.plain = False  # blocks called in turn (`_run_plain`), once `_check_plain` has passed
        self._removable: dict[int, bool] = {}  # `_check_block_removal` per first block run
        self.shared_prefix = self._check_block_removal(self.n_layers // 2)
        self._outputs_feed_next = self._check_outputs_feed_next()  # block i's output placed at block i+1's input
        self._final_norm = self._find_final_norm()  # the head's input: fp32 under bf16 (`run_from`), named by `e2edict hooks`
        self._head_ok = self._check_head()
        self._blocks_in_turn = BlockCalls(model, self.blocks, self._embed_dim, self._gelus)
        self._kept = KeptHooks(lambda name, fn: self._register({name: fn})[0])  # hooks inside blocks (`keep_hooks`)
        self.plain = self._check_plain()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def unembed(self) -> torch.Tensor:
        return self.model.get_output_embeddings().weight.T

    def _mlp_of(self, block: str) -> str | None:
        """The MLP module directly under ``block`` (a module path), where it has exactly one."""
        depth = block.count(".") + 1
        mlps = [h for h in self.hook_shapes() if h.startswith(block + ".") and _is_mlp(h) and h.count(".") == depth]
        return mlps[0] if len(mlps) == 1 else None

    def head(self) -> Head | None:
        return super().head() if self._head_ok else None

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
        out): block inputs always, other modules' inputs where they are not already another
        module's output. The final norm is listed (a downstream hook may read it), though no SAE
        can sit there (`block_of`)."""
        if self._shapes is not None:
            return self._shapes
        shapes: dict[str, tuple[int, ...]] = {}
        seen: set[int] = set()
        alive: list[torch.Tensor] = []  # seen tensors stay referenced, so no new tensor reuses an id
        started = [False]
        head = self.model.get_output_embeddings()
        block_ids = {id(b) for b in self.blocks}
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
                if ok(x) and (id(module) in block_ids or id(x) not in seen or _is_mlp(name)):
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

        for name, mod in self.model.named_modules():
            # no dropout: in eval mode its output is its input, the activation before it
            if not name or isinstance(mod, nn.ModuleList | nn.Dropout):
                continue
            handles.append(mod.register_forward_pre_hook(pre(name), with_kwargs=True))
            handles.append(mod.register_forward_hook(post(name)))
        try:
            with torch.no_grad():
                self.model(input_ids=torch.zeros((1, 2), dtype=torch.long, device=self.device), use_cache=False)
        finally:
            for h in handles:
                h.remove()
        self._shapes = shapes
        return shapes

    def mlp_pairs(self) -> dict[str, tuple[str, str]]:
        """Every MLP module inside a block (a module whose name contains ``mlp``, as in GPT-2,
        Llama, Gemma, Pythia): ``path -> (path:input, path)``."""
        shapes = self.hook_shapes()
        pairs = {}
        for name in shapes:
            if name.endswith(INPUT_SUFFIX) or not _is_mlp(name):
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
        where the model feeds each block's output unchanged to the next (`_check_outputs_feed_next`)."""
        m = self._block_re.match(hook_name)
        if not self._outputs_feed_next or m is None or hook_name != f"{self.blocks_path}.{m.group(1)}":
            return None
        nxt = int(m.group(1)) + 1
        return f"{self.blocks_path}.{nxt}{INPUT_SUFFIX}" if nxt < self.n_layers else None

    def _check_outputs_feed_next(self) -> bool:
        """Whether each block's output is exactly the next block's input (nothing between blocks
        in the model's loop), seen on `_probe_tokens`."""
        if self.n_layers < 2:
            return False
        outs: dict[int, torch.Tensor] = {}
        ins: dict[int, torch.Tensor] = {}

        def post(i):
            return lambda m, args, out: outs.__setitem__(i, first_tensor(out))

        def pre(i):
            return lambda m, args, kwargs: ins.__setitem__(i, args[0] if args else kwargs["hidden_states"])

        handles = [b.register_forward_hook(post(i)) for i, b in enumerate(self.blocks)]
        handles += [b.register_forward_pre_hook(pre(i), with_kwargs=True) for i, b in enumerate(self.blocks)]
        self._probe(handles)
        ok = all(i in outs and i + 1 in ins and torch.equal(outs[i], ins[i + 1]) for i in range(self.n_layers - 1))
        if not ok:
            log.info("block outputs of %s stay at the block (something runs between blocks)", self.name)
        return ok

    def _probe_tokens(self, batch: int = 1) -> torch.Tensor:
        """The load checks' input: long enough that a sliding-window attention masks something
        (a shorter probe cannot tell a sliding-window block from a global one), rows differing."""
        cfg = self.model.config.get_text_config() if hasattr(self.model.config, "get_text_config") else self.model.config
        window = max(int(getattr(cfg, k, None) or 0) for k in ("sliding_window", "window_size"))
        n = min(self.n_ctx, max(4, window + 2))
        rows = [torch.arange(n) if r % 2 == 0 else torch.arange(n - 1, -1, -1) for r in range(batch)]
        return torch.stack(rows).to(self.device) % max(2, self.d_vocab)

    def _probe(self, handles: list, batch: int = 1):
        """The model's own output on `_probe_tokens`, without a graph, with ``handles`` in place (then removed)."""
        tokens = self._probe_tokens(batch)
        try:
            with torch.no_grad():
                return self.model(input_ids=tokens, use_cache=False)
        finally:
            for h in handles:
                h.remove()

    def _head_input(self, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The model's logits on `_probe_tokens` and its output embeddings' input (None where they
        were not called with one)."""
        got: list[torch.Tensor] = []
        handle = self.model.get_output_embeddings().register_forward_pre_hook(lambda m, args: got.append(args[0]))
        logits = self._probe([handle], batch).logits
        return logits, (got[0] if got else None)

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
        return _fp32_norm(norm, got[0]) if norm is not None else got[0]

    def final_norm_name(self) -> str | None:
        """The module path of the final norm (the head's input), where one was found."""
        return next((n for n, m in self.model.named_modules() if m is self._final_norm), None) if self._final_norm else None

    def _find_final_norm(self) -> nn.Module | None:
        """The module whose output is the head's input (the final norm), found on `_probe_tokens`;
        None where the head's input is not one module's output."""
        outputs: dict[tuple[int, int], nn.Module] = {}  # by storage and size: the head may get a view of it
        got: list[torch.Tensor] = []
        handles = [
            m.register_forward_hook(lambda mod, args, out: outputs.__setitem__(_key(out), mod))
            for name, m in self.model.named_modules()
            if "norm" in type(m).__name__.lower() and not name.startswith(self.blocks_path + ".")
        ]
        handles.append(self.model.get_output_embeddings().register_forward_pre_hook(lambda m, args: got.append(args[0])))
        self._probe(handles)
        norm = outputs.get(_key(got[0])) if got else None
        if norm is None:
            return None
        with torch.no_grad():  # the fp32 recomputation must give the model's own output
            x = torch.randn(1, 4, self._embed_dim, device=self.device, dtype=got[0].dtype)
            same = torch.allclose(_fp32_norm(norm, x), norm(x).float(), atol=1e-4, rtol=1e-4)
        return norm if same else None

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

    def keep_hooks(self, names) -> None:
        if self.plain:  # otherwise every run is the model's own forward, with hooks registered per run
            super().keep_hooks(names)

    def _run_plain(self, resid: torch.Tensor, layer: int, hooks: dict[str, HookFn], hidden: bool):
        """`run_from` for block input and output hooks and kept hooks inside blocks: blocks
        ``layer..`` called in turn, boundary hooks between them; the final hidden states with
        ``hidden``, else None after the last hook."""
        resid = self._in_turn(
            hooks, lambda pre, post, inside: self._blocks_in_turn.run(resid, layer, pre, post, not hidden, inside)
        )
        return None if resid is None else self._hidden(resid)

    def _hidden(self, resid: torch.Tensor) -> torch.Tensor:
        """The final norm of the last block's output: in fp32 when the model is held in bf16."""
        if is_full(resid.dtype):
            return self._final_norm(resid)
        return _fp32_norm(self._final_norm, resid)

    def _check_plain(self) -> bool:
        """Whether `_run_plain` gives the model's own final hidden states (the head's input) on
        `_probe_tokens` of batch 2, from the middle block and from the first, with the arguments
        recorded at batch 1: then nothing the model does between its blocks is missed."""
        if self._final_norm is None or not (self.n_layers == 1 or self._outputs_feed_next):
            return False
        tokens = self._probe_tokens(batch=2)
        _, want = self._head_input(batch=2)
        try:
            with torch.no_grad():
                ours = [
                    self._run_plain(self.embed_to(tokens, layer), layer, {}, hidden=True)
                    for layer in sorted({0, self.n_layers // 2})
                ]
        except Exception as e:  # a block that cannot be called with the arguments recorded at batch 1
            log.info("blocks called in turn off for %s: %s", self.name, e)
            self._blocks_in_turn.clear()
            return False
        same = want is not None and all(o.shape == want.shape and torch.allclose(o, want, atol=1e-5, rtol=1e-4) for o in ours)
        if not same:
            log.info("blocks called in turn off for %s: their output differs from the model's forward", self.name)
            self._blocks_in_turn.clear()
        return same

    def _check_block_removal(self, layer: int) -> bool:
        """Whether running from ``layer`` with the blocks before it removed gives the full model's
        logits; checked once per layer, as a model may give a block its mask by its index in the
        list (Gemma 2's alternating sliding-window blocks: removing an odd number swaps them)."""
        if self.n_layers < 2:
            return False
        if layer <= 0:
            return True  # nothing to take out
        if layer in self._removable:
            return self._removable[layer]
        tokens = self._probe_tokens()
        ref = self._probe([]).logits
        with torch.no_grad():
            try:
                got = self._run_from(self.embed_to(tokens, layer), layer, {}, True, remove=True)
            except Exception as e:  # the model's forward indexes its blocks in a way removal breaks
                log.info("shared prefix off for %s: %s", self.name, e)
                self._removable[layer] = False
                return False
        same = got is not None and got.shape == ref.shape and torch.allclose(got, ref, atol=1e-4, rtol=1e-4)
        if not same:
            log.info("shared prefix off for %s from block %d: removing blocks changes the logits", self.name, layer)
        self._removable[layer] = bool(same)
        return bool(same)

    def _check_head(self) -> bool:
        """Whether the logits are exactly the head applied to the head's input (no scaling or other
        step after the output embeddings that `Head` does not know), so the fused KL may be used."""
        try:
            ref, x = self._head_input()
            if x is None:
                return False
            with torch.no_grad():
                ours = self._build_head().logits(x.reshape(-1, x.shape[-1]))[:, : self.d_vocab]
        except Exception as e:  # an unusual head (a tuple input, a custom module): keep the logits path
            log.info("fused head off for %s: %s", self.name, e)
            return False
        same = ours.shape == ref.reshape(-1, ref.shape[-1]).shape and torch.allclose(
            ours, ref.reshape(-1, ref.shape[-1]).float(), atol=1e-4, rtol=1e-4
        )
        if not same:
            log.info("fused head off for %s: the logits are not the output embeddings of the final hidden states", self.name)
        return bool(same)
