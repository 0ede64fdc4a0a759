"""The ``e2edict`` command. Bad input ends in one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from e2edict import __version__
from e2edict.errors import E2EDictError

EXIT_BAD_INPUT = 2


def _cmd_train(args: argparse.Namespace) -> int:
    from e2edict.config import load_config
    from e2edict.trainer import Interrupted, train

    if args.resume:
        if args.config or args.overrides or args.out:
            raise E2EDictError("--resume RUN_DIR takes no config, overrides or --out: the run's config.yaml is used")
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").is_file():
            raise E2EDictError(f"{str(run_dir)!r} is not a run directory (no config.yaml)")
        cfg = load_config(run_dir / "config.yaml")
    else:
        if not args.config:
            raise E2EDictError("train needs a CONFIG file (or --resume RUN_DIR)")
        cfg = load_config(args.config, args.overrides)
        run_dir = args.out
    try:
        run_dir = train(cfg, out=run_dir, overwrite=args.overwrite, progress=not args.quiet, resume=bool(args.resume))
    except Interrupted as e:
        print(f"e2edict: {e}", file=sys.stderr)
        return 130
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 reports
        return 0
    result = json.loads((run_dir / "eval.json").read_text())
    print(format_table({cfg.name: result}))
    print(f"run directory: {run_dir}")
    return 0


def _evaluate_and_write(run, tokens: int | None = None, alive_tokens: int | None = None):
    """Evaluate a loaded run on its eval data and write eval.json and sparsity.safetensors."""
    import torch

    from e2edict.evaluation import evaluate_backbone
    from e2edict.trainer import write_eval, write_sparsity

    cfg = run.cfg
    densities: dict[str, torch.Tensor] = {}
    result = evaluate_backbone(
        run.backbone,
        run.saes,
        run.eval_seqs,
        tokens=tokens or cfg.eval.tokens,
        alive_tokens=alive_tokens or cfg.eval.alive_tokens,
        batch_size=cfg.eval.batch_size,
        densities=densities,
    )
    write_eval(run.path, result)
    write_sparsity(run.path, densities)
    return result, densities


def _cmd_eval(args: argparse.Namespace) -> int:
    from e2edict.run import load_run_dir

    run = load_run_dir(args.run_dir, args.data, max(args.tokens or 0, args.alive_tokens or 0) or None)
    result, _ = _evaluate_and_write(run, args.tokens, args.alive_tokens)
    print(format_table({run.cfg.name: result}))
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from e2edict.analysis.runs import load_runs

    runs = load_runs(args.run_dirs)
    print(format_table({r.name: r.eval for r in runs}))
    if args.out:
        from e2edict.analysis.compare import compare_with_geometry

        written = compare_with_geometry(runs, Path(args.out))
        print(f"wrote {', '.join(sorted(p.name for p in written.values()))} to {args.out}")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from e2edict.sweep import run_sweep

    dirs = run_sweep(args.sweep, dry_run=args.dry_run, progress=not args.quiet)
    if not args.dry_run:
        from e2edict.analysis.runs import load_runs

        print(format_table({r.name: r.eval for r in load_runs(dirs)}))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from safetensors.torch import load_file

    from e2edict.analysis.report import write_report
    from e2edict.evaluation import density_from_log10
    from e2edict.run import load_run_dir
    from e2edict.trainer import sae_folder

    run = load_run_dir(args.run_dir, tokens=args.tokens)
    run_dir, cfg, backbone, saes = run.path, run.cfg, run.backbone, run.saes
    files = {h: sae_folder(run_dir, h) / "sparsity.safetensors" for h in saes}
    if (run_dir / "eval.json").is_file() and all(f.is_file() for f in files.values()):
        result = json.loads((run_dir / "eval.json").read_text())
        densities = {h: density_from_log10(load_file(str(f))["sparsity"]) for h, f in files.items()}
    else:  # the same evaluation `e2edict eval` runs, written to the run directory
        result, densities = _evaluate_and_write(run)
    seqs = run.eval_seqs[: max(1, -(-args.tokens // cfg.data.n_ctx))]  # where to search for top contexts
    index = write_report(
        run_dir,
        backbone,
        saes,
        seqs,
        result,
        (run_dir / "config.yaml").read_text(),
        densities,
        n_features=args.features,
        per_page=args.per_page,
        k=args.contexts,
        batch_size=cfg.eval.batch_size,
    )
    print(f"report: {index}")
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    from e2edict.saes.import_e2e import convert

    for hook, folder in convert(args.checkpoint, args.config, args.out).items():
        print(f"{hook} -> {folder}")
    return 0


def _cmd_hooks(args: argparse.Namespace) -> int:
    from e2edict.run import open_backbone

    bb = open_backbone(args.model, args.backend, trust_remote_code=args.trust_remote_code)
    shapes = bb.hook_shapes()
    if args.transcoders:  # MLP pairs: short name, input hook, output hook, widths
        for short, (src, dst) in bb.mlp_pairs().items():
            print(f"{short}\t{src} -> {dst}\t{shapes[src][0]} -> {shapes[dst][0]}")
        return 0
    for name, shape in shapes.items():
        print(f"{name}\t{shape[0]}")
    return 0


def _cmd_tokenize(args: argparse.Namespace) -> int:
    from e2edict.tokenize_shards import tokenize_to_shards

    source = {
        "path": args.source,
        "split": args.split,
        "name": args.name,
        "column": args.column,
        "streaming": args.streaming,
        "max_tokens": args.max_tokens,
    }
    m = tokenize_to_shards(
        source, args.model, args.ctx, Path(args.out), args.packing, args.shard_rows, args.overwrite, args.trust_remote_code
    )
    print(
        f"wrote {m['sequences']} sequences of {m['n_ctx']} tokens ({m['tokens']} tokens, {len(m['shards'])} shards) to {args.out}"
    )
    return 0


def format_table(runs: dict[str, dict[str, Any]]) -> str:
    """One column per run (and SAE): L0, alive, CE-loss increase, KL, explained variance."""
    cols: list[tuple[str, dict[str, Any], dict[str, Any]]] = []
    for name, res in runs.items():
        for hook, m in res["saes"].items():
            cols.append((name if len(res["saes"]) == 1 else f"{name}:{hook}", res, m))
    rows = [
        ("SAE position", lambda r, m: next(h for h, v in r["saes"].items() if v is m)),
        ("writes", lambda r, m: m.get("hook_name_out") or "(its input)"),
        ("L0", lambda r, m: f"{m['l0']:.2f}"),
        ("alive / d_sae", lambda r, m: f"{m['alive']} / {m['d_sae']}"),
        ("CE clean", lambda r, m: f"{r['ce_loss_clean']:.4f}"),
        ("CE spliced", lambda r, m: f"{r['ce_loss_spliced']:.4f}"),
        ("CE-loss increase", lambda r, m: f"{r['ce_loss_increase']:.4f}"),
        ("KL", lambda r, m: f"{r['kl']:.4f}"),
        ("explained variance", lambda r, m: f"{m['explained_variance']:.4f}"),
        ("MSE", lambda r, m: f"{m['mse']:.4g}"),
        ("eval tokens", lambda r, m: str(r["tokens"])),
    ]
    table = [["", *[c[0] for c in cols]]]
    for label, fn in rows:
        table.append([label, *[fn(r, m) for _, r, m in cols]])
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = [
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
        for row in table
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="e2edict", description="End-to-end sparse dictionary learning.")
    ap.add_argument("--version", action="version", version=f"e2edict {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser("train", help="train SAEs from a YAML config", description="Train SAEs from a YAML config.")
    t.add_argument("config", nargs="?", help="YAML config file")
    t.add_argument("overrides", nargs="*", metavar="dotted.key=value", help="config overrides")
    t.add_argument("--out", help="run directory (default: out/runs/<name>)")
    t.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from its newest intact checkpoint")
    t.set_defaults(fn=_cmd_train)

    e = sub.add_parser(
        "eval",
        help="evaluate a run's SAEs; writes eval.json",
        description="Evaluate a run directory's SAEs on held-out tokens; writes RUN_DIR/eval.json.",
    )
    e.add_argument("run_dir")
    e.add_argument("--tokens", type=int, help="evaluation tokens (default: the run's eval.tokens)")
    e.add_argument("--data", help="evaluation data instead of the run's data.eval")
    e.add_argument("--alive-tokens", type=int, help="window for alive / feature density (default: eval.alive_tokens)")
    e.set_defaults(fn=_cmd_eval)

    c = sub.add_parser(
        "compare",
        help="compare runs: table, Pareto plots, dictionary geometry",
        description="Print finished runs side by side; with --out, write runs.md/csv, Pareto plots "
        "(L0 and alive vs CE-loss increase), downstream EV and norm-ratio plots, and geometry tables.",
    )
    c.add_argument("run_dirs", nargs="+")
    c.add_argument("--out", help="folder for the tables and plots")
    c.set_defaults(fn=_cmd_compare)

    im = sub.add_parser(
        "import-e2e-sae",
        help="convert a checkpoint of the reference e2e_sae code to SAELens-layout folders",
        description="Convert the reference implementation's samples_N.pt (tensors only, loaded with "
        "weights_only) and final_config.yaml into one SAELens-layout folder per SAE position.",
    )
    im.add_argument("checkpoint")
    im.add_argument("config")
    im.add_argument("--out", required=True)
    im.set_defaults(fn=_cmd_import)

    w = sub.add_parser(
        "sweep",
        help="run a grid of configs, then compare them",
        description="Train every run of SWEEP.yaml that is not finished (resuming unfinished ones), "
        "then write the comparison tables and plots.",
    )
    w.add_argument("sweep")
    w.add_argument("--dry-run", action="store_true", help="list what would run")
    w.add_argument("--quiet", action="store_true", help="no progress bars")
    w.set_defaults(fn=_cmd_sweep)

    r = sub.add_parser(
        "report",
        help="write a static HTML report with a feature browser",
        description="Write RUN_DIR/report/index.html: config, metrics, training curves and, per SAE, "
        "a paginated feature browser (top contexts, activation histogram, promoted/suppressed tokens).",
    )
    r.add_argument("run_dir")
    r.add_argument("--tokens", type=int, default=65_536, help="held-out tokens to search for top contexts")
    r.add_argument("--features", type=int, default=200, help="features shown per SAE (densest first)")
    r.add_argument("--per-page", type=int, default=50)
    r.add_argument("--contexts", type=int, default=8, help="top contexts per feature")
    r.set_defaults(fn=_cmd_report)

    tk = sub.add_parser("tokenize", help="pack a text or token source into shards for random-access training data")
    tk.add_argument("source", help="a file, glob, folder, dataset name, tiny or tiny-val")
    tk.add_argument("--model", required=True, help="whose tokenizer: tiny, a model folder, or a hub name")
    tk.add_argument("--ctx", type=int, required=True, help="tokens per sequence (data.n_ctx)")
    tk.add_argument("--out", required=True, help="the shard folder to write")
    tk.add_argument("--split", default="train", help="Hugging Face datasets: the split")
    tk.add_argument("--name", default=None, help="Hugging Face datasets: the configuration name")
    tk.add_argument("--column", default=None, help="text or token column (default: input_ids if present, else text)")
    tk.add_argument("--streaming", action="store_true", help="stream a Hugging Face dataset instead of downloading it whole")
    tk.add_argument("--max-tokens", type=int, default=None, help="stop after this many tokens")
    tk.add_argument("--packing", choices=["auto", "bos", "rows"], default="auto")
    tk.add_argument("--shard-rows", type=int, default=65_536, help="sequences per shard file")
    tk.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    tk.add_argument("--trust-remote-code", action="store_true", help="run the tokenizer repository's own code")
    tk.set_defaults(fn=_cmd_tokenize)
    h = sub.add_parser("hooks", help="list a model's hook points that can take an SAE, with widths")
    h.add_argument("model", nargs="?", default="tiny", help="tiny, a model folder, or a hub name")
    h.add_argument("--backend", choices=["transformer_lens", "huggingface"], default="transformer_lens")
    h.add_argument("--trust-remote-code", action="store_true", help="huggingface: run the repository's own model code")
    h.add_argument("--transcoders", action="store_true", help="list the MLPs a transcoder can replace: short name, hooks, widths")
    h.set_defaults(fn=_cmd_hooks)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args, extra = ap.parse_known_args(argv)
    # overrides may come after options (`train c.yaml --out d a.b=1`): argparse leaves those over
    if getattr(args, "overrides", None) is not None:
        args.overrides += [e for e in extra if "=" in e and not e.startswith("-")]
        extra = [e for e in extra if not ("=" in e and not e.startswith("-"))]
    if extra:
        ap.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "fn", None) is None:
        ap.print_help()
        return 0
    for opt in ("tokens", "alive_tokens", "features", "per_page", "contexts", "ctx", "max_tokens", "shard_rows"):
        if getattr(args, opt, None) is not None and getattr(args, opt) <= 0:
            print(f"e2edict: error: --{opt.replace('_', '-')} must be positive", file=sys.stderr)
            return EXIT_BAD_INPUT
    try:
        return args.fn(args)
    except E2EDictError as e:
        print(f"e2edict: error: {' '.join(str(e).split(chr(10)))}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("e2edict: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
