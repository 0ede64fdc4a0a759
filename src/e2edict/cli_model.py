"""The ``e2edict`` commands about a model before anything trains: ``hooks`` (where an SAE can go)
and ``plan`` (the memory a training config needs per GPU, `e2edict.plan`)."""

from __future__ import annotations

import argparse
import os
import sys

from e2edict.errors import E2EDictError

EXIT_DOES_NOT_FIT = 1


def _cmd_hooks(args: argparse.Namespace) -> int:
    from e2edict.run import open_backbone

    quiet_third_party()  # a listing: no loading bar
    bb = open_backbone(args.model, args.backend, trust_remote_code=args.trust_remote_code)
    shapes = bb.hook_shapes()
    if args.transcoders:  # MLP pairs: short name, input hook, output hook, widths
        for short, (src, dst) in bb.mlp_pairs().items():
            print(f"{short}\t{src} -> {dst}\t{shapes[src][0]} -> {shapes[dst][0]}")
        return 0
    for name, shape in shapes.items():
        if _in_block(bb, name):  # only positions that can take an SAE
            print(f"{name}\t{shape[0]}")
    norm = bb.final_norm_name() if hasattr(bb, "final_norm_name") else None
    if norm is not None:
        last = f"{bb.blocks_path}.{bb.n_layers - 1}"
        print(
            f"({norm} is the final norm, the head's input, not a position: {last} is the last residual stream)", file=sys.stderr
        )
    return 0


def _in_block(bb, name: str) -> bool:
    try:
        bb.block_of(name)
    except E2EDictError:
        return False
    return True


def _cmd_plan(args: argparse.Namespace) -> int:
    from e2edict.config import load_config
    from e2edict.plan import GIB, memory_plan, size

    quiet_third_party()
    cfg = load_config(args.config, args.overrides)
    plan = memory_plan(cfg, args.gpus)
    print(plan.table())
    if args.gpu_memory is None:
        return 0
    advice = plan.advice(int(args.gpu_memory * GIB), cfg)
    print(advice or f"fits: {size(plan.total())} of {args.gpu_memory:g} GiB per GPU")
    return EXIT_DOES_NOT_FIT if advice else 0


def model_commands(sub) -> None:
    """hooks, plan."""
    h = sub.add_parser("hooks", help="list a model's hook points that can take an SAE, with widths")
    h.add_argument("model", nargs="?", default="tiny", help="tiny, a model folder, or a hub name")
    h.add_argument("--backend", choices=["transformer_lens", "huggingface"], default="transformer_lens")
    h.add_argument("--trust-remote-code", action="store_true", help="huggingface: run the repository's own model code")
    h.add_argument("--transcoders", action="store_true", help="list the MLPs a transcoder can replace: short name, hooks, widths")
    h.set_defaults(fn=_cmd_hooks)
    p = sub.add_parser(
        "plan",
        help="the memory a training config needs per GPU, from the model's config alone",
        description="Print the memory a training config needs on each GPU (model weights, gathered weights, fused head, "
        "SAE weights, gradients, optimizer state, activations kept for backward), counted on the meta device from "
        "the model's config without loading its weights. Exit 1 when --gpu-memory is given and it does not fit.",
    )
    p.add_argument("config", help="a training config (YAML)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, as for train")
    p.add_argument("--gpus", type=int, default=1, help="GPUs (torchrun processes) the run will use")
    p.add_argument("--gpu-memory", type=float, default=None, help="GiB per GPU: say whether it fits, and what would make it")
    p.set_defaults(fn=_cmd_plan)


def quiet_third_party() -> None:
    """Under --quiet also the libraries' bars (transformers' "Loading weights", datasets')."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
