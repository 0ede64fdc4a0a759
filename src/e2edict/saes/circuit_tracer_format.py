"""circuit-tracer's transcoder-set layout, which e2edict writes (``e2edict export circuit-tracer``).

Attribution graphs (circuit-tracer, decoderesearch/circuit-tracer) replace every MLP of a model by
a transcoder. Its folder for a set of per-layer transcoders holds ``config.yaml`` and one
``layer_{i}.safetensors`` per transformer block, which its ``load_transcoder`` reads as:

- ``W_enc`` [d_sae, d_model] (SAELens's and e2edict's ``W_enc`` transposed), ``b_enc`` [d_sae];
- ``W_dec`` [d_sae, d_model], ``b_dec`` [d_model]: the dictionary e2edict decodes with (unit rows,
  times a loaded SAE's fixed row scale);
- ``activation_function.threshold`` [d_sae] for a JumpReLU (e2edict's JumpReLU and BatchTopK);
- ``W_skip`` [d_model, d_model] for a skip transcoder, applied as ``x W_skip^T`` (e2edict's layout).

It computes ``act(x W_enc^T + b_enc) W_dec + b_dec (+ x W_skip^T)`` with ``act`` from the config:
``activation: relu``, ``activation: topk`` with ``k`` (the k largest pre-activations, without a
ReLU: e2edict's TopK also zeroes a negative one among them), or, with no ``activation`` key, the
JumpReLU ``z 1[z > θ]`` (e2edict's ``ReLU(z) 1[z > θ]``: the same for θ > 0). ``config.yaml`` also
names the model and the hooks each transcoder reads and writes inside ``blocks.{layer}.``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file

from e2edict.atomic import write_folder_atomic
from e2edict.errors import E2EDictError
from e2edict.saes.base import SAE

ACTIVATIONS = {"standard": "relu", "topk": "topk", "jumprelu": None}  # SAELens architecture -> config's activation
_HOOK = re.compile(r"^blocks\.(\d+)\.(.+)$")


def export_circuit_tracer(
    saes: dict[str, SAE], model_name: str, n_layers: int | None, out: Path, overwrite: bool = False
) -> dict[str, Any]:
    """Write ``saes`` (a run's transcoders, keyed by input hook) as a circuit-tracer transcoder set
    in ``out`` (whole or not at all; an existing non-empty folder only with ``overwrite``); return
    the config written. ``n_layers``: the model's block count, every one of which needs a
    transcoder (None: the layers 0..max present must be whole)."""
    out = Path(out)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise E2EDictError(f"{str(out)!r} exists and is not an empty folder; --overwrite replaces it")
    config, files = transcoder_set(saes, model_name, n_layers)

    def fill(tmp: Path) -> None:
        for layer, tensors in files.items():
            save_file(tensors, str(tmp / f"layer_{layer}.safetensors"))
        (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")

    try:
        write_folder_atomic(out, fill)
    except OSError as e:
        raise E2EDictError(f"cannot write {str(out)!r}: {e.strerror or e}") from None
    return config


def transcoder_set(
    saes: dict[str, SAE], model_name: str, n_layers: int | None
) -> tuple[dict[str, Any], dict[int, dict[str, torch.Tensor]]]:
    """The set as circuit-tracer holds it: its ``config.yaml`` and each layer's tensors (fp32, CPU)."""
    by_layer, hook_in, hook_out = _layers(saes, n_layers)
    first = by_layer[0]
    arch = first.saelens_architecture
    config: dict[str, Any] = {
        "model_kind": "transcoder_set",
        "model_name": model_name,
        "feature_input_hook": hook_in,
        "feature_output_hook": hook_out,
    }
    if ACTIVATIONS[arch] is not None:
        config["activation"] = ACTIVATIONS[arch]
    if arch == "topk":
        config["k"] = int(first.k)
    return config, {layer: _tensors(sae) for layer, sae in by_layer.items()}


def activation(pre: torch.Tensor, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """circuit-tracer's activation of a layer's pre-activations ``x W_enc^T + b_enc``."""
    if config.get("activation") == "relu":
        return torch.relu(pre)
    if config.get("activation") == "topk":
        top = torch.topk(pre, k=min(int(config["k"]), pre.shape[-1]), dim=-1)
        return torch.zeros_like(pre).scatter_(-1, top.indices, top.values)
    return pre * (pre > tensors["activation_function.threshold"].to(pre))


def _layers(saes: dict[str, SAE], n_layers: int | None) -> tuple[dict[int, SAE], str, str]:
    """The transcoders by layer, and the hooks (after ``blocks.{layer}.``) they all read and write."""
    not_transcoders = [h for h, s in saes.items() if s.hook_name_out is None]
    if not_transcoders:
        raise E2EDictError(
            f"{not_transcoders[0]!r} holds an SAE, not a transcoder: circuit-tracer replaces each MLP by a transcoder "
            "(train with saes.kind: transcoder)"
        )
    by_layer: dict[int, SAE] = {}
    tails: set[tuple[str, str]] = set()
    for hook, sae in saes.items():
        m_in, m_out = _HOOK.match(hook), _HOOK.match(sae.hook_name_out or "")
        if m_in is None or m_out is None or m_in.group(1) != m_out.group(1):
            raise E2EDictError(
                f"transcoder {hook!r} -> {sae.hook_name_out!r}: circuit-tracer needs TransformerLens hooks of one block "
                "(blocks.L.ln2.hook_normalized -> blocks.L.hook_mlp_out)"
            )
        by_layer[int(m_in.group(1))] = sae
        tails.add((m_in.group(2), m_out.group(2)))
        _check_architecture(hook, sae)
    if len(tails) > 1:
        raise E2EDictError(
            f"the transcoders read and write different hooks per layer ({sorted(tails)}); circuit-tracer takes one pair"
        )
    if len({(s.saelens_architecture, getattr(s, "k", None)) for s in by_layer.values()}) > 1:
        raise E2EDictError("the transcoders have different architectures; circuit-tracer's config gives one activation")
    expected = range(n_layers if n_layers is not None else max(by_layer) + 1)
    missing = [layer for layer in expected if layer not in by_layer]
    if missing:
        raise E2EDictError(
            f"circuit-tracer needs a transcoder at every layer; the run has none at layer{'s' if len(missing) > 1 else ''} "
            f"{', '.join(map(str, missing))}"
        )
    ((hook_in, hook_out),) = tails
    return dict(sorted(by_layer.items())), hook_in, hook_out


def _check_architecture(hook: str, sae: SAE) -> None:
    arch = sae.saelens_architecture
    if arch not in ACTIVATIONS:
        raise E2EDictError(
            f"transcoder {hook!r} is {sae.architecture!r}: circuit-tracer's transcoders are ReLU, TopK or JumpReLU"
        )
    if getattr(sae, "apply_b_dec_to_input", False):
        raise E2EDictError(f"transcoder {hook!r} subtracts b_dec from its input, which circuit-tracer does not")
    if arch == "jumprelu":
        threshold = sae.saelens_tensors()["threshold"]
        if not bool((threshold > 0).all()):
            raise E2EDictError(
                f"transcoder {hook!r} has a threshold <= 0, where circuit-tracer's JumpReLU (no ReLU) would pass negatives"
            )


def _tensors(sae: SAE) -> dict[str, torch.Tensor]:
    t = {k: v.detach().float().to("cpu") for k, v in sae.saelens_tensors().items()}
    out = {"W_enc": t["W_enc"].T.contiguous(), "W_dec": t["W_dec"].contiguous(), "b_enc": t["b_enc"], "b_dec": t["b_dec"]}
    if "threshold" in t:
        out["activation_function.threshold"] = t["threshold"].contiguous()
    if sae.W_skip is not None:
        out["W_skip"] = sae.W_skip.detach().float().to("cpu").contiguous()
    return out
