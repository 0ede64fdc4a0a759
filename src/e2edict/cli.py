"""The ``e2edict`` command. Bad input ends in one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from e2edict.analysis.tables import format_interp_table, format_table
from e2edict.cli_model import model_commands, quiet_third_party
from e2edict.errors import E2EDictError
from e2edict.rundir import RunDir
from e2edict.version import __version__

EXIT_BAD_INPUT = 2


def _cmd_train(args: argparse.Namespace) -> int:
    from e2edict.config import load_config
    from e2edict.overrides import run_name_for
    from e2edict.trainer import Interrupted, train

    if args.resume:
        if args.config or args.overrides or args.out:
            raise E2EDictError("--resume RUN_DIR takes no config, overrides or --out: the run's config.yaml is used")
        run_dir = Path(args.resume)
        cfg = RunDir(run_dir).read_config()
    else:
        if not args.config:
            raise E2EDictError("train needs a CONFIG file (or --resume RUN_DIR)")
        cfg = load_config(args.config, args.overrides)
        run_dir = args.out
        if run_dir is None and args.overrides:  # runs that differ get folders that differ
            named = run_name_for(cfg.name, args.overrides)
            if named != cfg.name:
                cfg.name = named
                print(f"e2edict: run name {named!r} (from the overrides; set name=... or --out to choose)", file=sys.stderr)
    try:
        run_dir = train(cfg, out=run_dir, overwrite=args.overwrite, progress=not args.quiet, resume=bool(args.resume))
    except Interrupted as e:
        print(f"e2edict: {e}", file=sys.stderr)
        return 130
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 reports
        return 0
    result = RunDir(run_dir).read_eval()
    print(format_table({cfg.name: result}))
    print(f"run directory: {run_dir}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from e2edict.evaluation import evaluate_and_record
    from e2edict.run import load_run_dir

    graphs = {
        k: getattr(args, k) for k in ("graph_prompts", "graph_tokens", "graph_max_features") if getattr(args, k) is not None
    }
    for key, least in (("graph_prompts", 0), ("graph_tokens", 2), ("graph_max_features", 1)):  # a transcoder run's graphs
        if graphs.get(key, least) < least:
            raise E2EDictError(f"--{key.replace('_', '-')} must be at least {least}, got {graphs[key]}")
    run = load_run_dir(args.run_dir, args.data, max(args.tokens or 0, args.alive_tokens or 0) or None)
    for key, value in graphs.items():
        setattr(run.cfg.eval, key, value)
    result, _ = evaluate_and_record(
        run.rundir, run.cfg, run.backbone, run.saes, run.eval_seqs, args.tokens, args.alive_tokens, progress=not args.quiet
    )
    print(format_table({run.cfg.name: result}))
    return 0


def _interp_options(args: argparse.Namespace):
    from e2edict.interpret import METRICS, InterpOptions
    from e2edict.interpret.absorption import AbsorptionConfig
    from e2edict.interpret.autointerp import AutointerpConfig

    metrics = tuple(m.strip() for m in args.metrics.split(",") if m.strip()) if args.metrics else METRICS
    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip()) if args.tasks is not None else None
    llm = None
    if args.llm_url or args.llm_model:
        llm = AutointerpConfig(url=args.llm_url or "", model=args.llm_model or "", api_key=args.llm_key,
                               concurrency=args.llm_concurrency, timeout=args.llm_timeout)  # fmt: skip
    ab = AbsorptionConfig(min_probe_f1=args.absorption_min_f1, min_letters=args.absorption_min_letters,
                          max_words=args.absorption_max_words)  # fmt: skip
    kw = {"tasks": tasks} if tasks is not None else {}
    return InterpOptions(metrics=metrics, latents=args.latents, contexts=args.contexts, task_data=args.task_data,
                         text_column=args.text_column, label_column=args.label_column, task_split=args.task_split,
                         probe_train=args.probe_train, probe_test=args.probe_test, absorption=ab, llm=llm,
                         **kw).check()  # fmt: skip


def _cmd_interp(args: argparse.Namespace) -> int:
    from e2edict.interpret import interpret_saes
    from e2edict.interpret.reading import Reader
    from e2edict.interpret.table import merge_interp

    opts = _interp_options(args)
    if opts.task_data:  # a bad data set is named before any model loads
        opts.probing_tasks()
    results = {}
    for target in _interp_targets(args):
        rundir, name, backbone, saes, seqs, batch = target()
        seqs = seqs[: max(4, -(-args.tokens // seqs.shape[1]))]
        reader = Reader(backbone, saes, batch_size=batch)
        result = interpret_saes(reader, seqs, opts, rundir.autointerp_cache, progress=not args.quiet, quiet=args.quiet)
        result = merge_interp(rundir.read_interp(), result)
        rundir.write_interp(result)
        results[name] = result
        if not args.quiet:
            print(f"e2edict: wrote {rundir.interp_file}", file=sys.stderr)
    print(format_interp_table(results))
    return 0


def _interp_targets(args: argparse.Namespace):
    """One loader per thing to evaluate: each run directory, or the SAEs of ``--saes``."""
    from e2edict.run import load_foreign_saes, load_run_dir

    if args.saes:
        if args.run_dirs or not args.out:
            raise E2EDictError("--saes SPEC takes no RUN_DIR and needs --out DIR (where interp.json goes)")
        RunDir(args.out).check_free(overwrite=True)

        def foreign():
            backbone, saes, seqs = load_foreign_saes(args.saes, args.model, args.backend, args.data, args.tokens, args.ctx)
            return RunDir(args.out), Path(args.out).name, backbone, saes, seqs, 16

        return [foreign]
    if not args.run_dirs:
        raise E2EDictError("interp needs RUN_DIR(s), or --saes SPEC --model MODEL --out DIR")
    for d in args.run_dirs:
        RunDir(d).require()

    def loader(d):
        def load():
            run = load_run_dir(d, args.data, args.tokens)
            return run.rundir, run.cfg.name, run.backbone, run.saes, run.eval_seqs, run.cfg.eval.batch_size

        return load

    return [loader(d) for d in args.run_dirs]


def _cmd_compare(args: argparse.Namespace) -> int:
    from e2edict.analysis.runs import load_runs

    runs = load_runs(args.run_dirs)
    print(format_table({r.name: r.eval for r in runs}))
    if any(r.interp for r in runs):
        print()
        print(format_interp_table({r.name: r.interp for r in runs if r.interp}))
    if args.out:
        from e2edict.analysis.compare import compare_with_geometry

        written = compare_with_geometry(runs, Path(args.out), progress=not args.quiet)
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
    from e2edict.analysis.report import write_report
    from e2edict.evaluation import evaluate_and_record
    from e2edict.run import load_run_dir

    run = load_run_dir(args.run_dir, tokens=args.tokens)
    rundir, cfg, backbone, saes = run.rundir, run.cfg, run.backbone, run.saes
    densities = rundir.read_densities(list(saes)) if rundir.has_eval() else None
    if densities is not None:
        result = rundir.read_eval()
    else:  # the same evaluation `e2edict eval` runs, written to the run directory
        result, densities = evaluate_and_record(rundir, cfg, backbone, saes, run.eval_seqs, progress=not args.quiet)
    seqs = run.eval_seqs[: max(1, -(-args.tokens // cfg.data.n_ctx))]  # where to search for top contexts
    index = write_report(
        rundir,
        backbone,
        saes,
        seqs,
        result,
        rundir.config_text(),
        densities,
        n_features=args.features,
        per_page=args.per_page,
        k=args.contexts,
        batch_size=cfg.eval.batch_size,
        run_name=cfg.name,
        progress=not args.quiet,
        interp=rundir.read_interp(),
    )
    print(f"report: {index}")
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    from e2edict.saes.import_e2e import convert

    for hook, folder in convert(args.checkpoint, args.config, args.out).items():
        print(f"{hook} -> {folder}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from e2edict.plan import model_layers
    from e2edict.saes.circuit_tracer_format import export_circuit_tracer

    rundir = RunDir(args.run_dir).require()
    cfg = rundir.read_config()
    n_layers = model_layers(cfg)
    config = export_circuit_tracer(rundir.load_saes(), cfg.model.name, n_layers, Path(args.out), args.overwrite)
    checked = f"all {n_layers} layers" if n_layers is not None else "layers 0.. without a gap (the model's layer count unread)"
    print(f"wrote circuit-tracer's transcoder set ({checked}; {config['feature_input_hook']} -> "
          f"{config['feature_output_hook']}) to {args.out}")  # fmt: skip
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
        source, args.model, args.ctx, Path(args.out), args.packing, args.shard_rows, args.overwrite, args.trust_remote_code,
        progress=not args.quiet,
    )  # fmt: skip
    print(
        f"wrote {m['sequences']} sequences of {m['n_ctx']} tokens ({m['tokens']} tokens, {len(m['shards'])} shards) to {args.out}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="e2edict", description="End-to-end sparse dictionary learning.")
    ap.add_argument("--version", action="version", version=f"e2edict {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    _run_commands(sub)
    _analysis_commands(sub)
    _interp_command(sub)
    _data_commands(sub)
    model_commands(sub)
    return ap


def _run_commands(sub) -> None:
    """train, eval, import-e2e-sae, sweep."""
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
    e.add_argument("--graph-prompts", type=int, help="attribution graphs of a transcoder run (default: eval.graph_prompts)")
    e.add_argument("--graph-tokens", type=int, help="tokens of each graph's prompt (default: eval.graph_tokens)")
    e.add_argument("--graph-max-features", type=int, help="feature budget of one graph (default: eval.graph_max_features)")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(fn=_cmd_eval)

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
    x = sub.add_parser("export", help="write a run's SAEs in another tool's format: circuit-tracer")
    x.add_argument("format", choices=["circuit-tracer"], help="circuit-tracer: a transcoder set (docs/transcoders.md)")
    x.add_argument("run_dir", help="a run directory of transcoders, one per layer")
    x.add_argument("--out", required=True, help="the folder to write (config.yaml, layer_{i}.safetensors)")
    x.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    x.set_defaults(fn=_cmd_export)


def _analysis_commands(sub) -> None:
    """compare, report."""
    r = sub.add_parser(
        "report",
        help="write a static HTML report with a feature browser",
        description="Write RUN_DIR/report/index.html: config, metrics, training curves and, per SAE, "
        "a paginated feature browser (top contexts, activation histogram, promoted/suppressed tokens).",
    )
    r.add_argument("run_dir")
    r.add_argument("--tokens", type=int, default=65_536, help="held-out tokens to search for top contexts")
    r.add_argument(
        "--features",
        type=int,
        default=200,
        help="features shown per SAE (densest first up to 10%% of tokens, the near-always-on ones last)",
    )
    r.add_argument("--per-page", type=int, default=50)
    r.add_argument("--contexts", type=int, default=8, help="top contexts per feature")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.set_defaults(fn=_cmd_report)
    c = sub.add_parser(
        "compare",
        help="compare runs: table, Pareto plots, dictionary geometry",
        description="Print finished runs side by side; with --out, write runs.md/csv, Pareto plots "
        "(L0 and alive vs CE-loss increase), downstream EV and norm-ratio plots, and geometry tables.",
    )
    c.add_argument("run_dirs", nargs="+")
    c.add_argument("--out", help="folder for the tables and plots")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(fn=_cmd_compare)


def _interp_command(sub) -> None:
    from e2edict.interpret.absorption import AbsorptionConfig

    i = sub.add_parser(
        "interp",
        help="interpretability of a run's SAEs: sparse probing, absorption, explanations, autointerp; writes interp.json",
        description="Evaluate how interpretable each SAE's features are (docs/interpretability.md): SAEBench's sparse "
        "probing and feature absorption, n-gram explanations scored without an LLM, and SAEBench's autointerp through an "
        "OpenAI-compatible endpoint. Writes RUN_DIR/interp.json and prints a table.",
    )
    i.add_argument("run_dirs", nargs="*", metavar="RUN_DIR")
    i.add_argument("--metrics", help="comma-separated: sparse_probing, absorption, explanations, autointerp (default: all)")
    i.add_argument("--tokens", type=int, default=32_768, help="held-out tokens for explanations and autointerp")
    i.add_argument("--data", help="held-out data instead of the run's data.eval")
    i.add_argument("--latents", type=int, default=100, help="latents explained per SAE (sampled among the alive)")
    i.add_argument("--contexts", type=int, default=20, help="top contexts an n-gram explanation is built from")
    i.add_argument("--tasks", help="built-in probing tasks, comma-separated (source, testament, dialogue; '' for none)")
    i.add_argument("--task-data", help="a labelled data set for probing: .jsonl/.csv/.parquet or a Hugging Face name")
    i.add_argument("--text-column", default="text")
    i.add_argument("--label-column", default="label")
    i.add_argument("--task-split", default="train", help="Hugging Face data sets: the split")
    i.add_argument("--probe-train", type=int, default=1000, help="texts per probing task's training split")
    i.add_argument("--probe-test", type=int, default=250, help="texts per probing task's test split")
    d = AbsorptionConfig()
    i.add_argument("--absorption-min-f1", type=float, default=d.min_probe_f1, help="a letter's probe F1 bar (SAEBench: 0.6)")
    i.add_argument("--absorption-min-letters", type=int, default=d.min_letters, help="letters needed (SAEBench: 20)")
    i.add_argument("--absorption-max-words", type=int, default=None, help="at most this many words (default: every one)")
    i.add_argument("--llm-url", help="OpenAI-compatible endpoint, e.g. https://api.openai.com/v1 or http://localhost:8000/v1")
    i.add_argument("--llm-model", help="the endpoint's model name")
    i.add_argument("--llm-key", help="API key (default: $OPENAI_API_KEY); never written anywhere")
    i.add_argument("--llm-concurrency", type=int, default=8, help="calls in flight at once")
    i.add_argument("--llm-timeout", type=float, default=60.0, help="seconds before a call is retried")
    i.add_argument("--saes", help="SAEs from elsewhere (anything saes.init_from accepts) instead of a run directory")
    i.add_argument("--model", default="tiny", help="with --saes: the model they read")
    i.add_argument("--backend", choices=["transformer_lens", "huggingface"], default="transformer_lens")
    i.add_argument("--ctx", type=int, default=128, help="with --saes: tokens per held-out sequence")
    i.add_argument("--out", help="with --saes: the folder for interp.json and the autointerp cache")
    i.add_argument("--quiet", action="store_true", help="no progress bars or notes")
    i.set_defaults(fn=_cmd_interp)


def _data_commands(sub) -> None:
    """tokenize."""
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
    tk.add_argument("--quiet", action="store_true", help="no progress bar")
    tk.set_defaults(fn=_cmd_tokenize)


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
    for opt in ("tokens", "alive_tokens", "features", "per_page", "contexts", "ctx", "max_tokens", "shard_rows",
                "latents", "probe_train", "probe_test", "llm_concurrency", "absorption_max_words"):
        if getattr(args, opt, None) is not None and getattr(args, opt) <= 0:
            print(f"e2edict: error: --{opt.replace('_', '-')} must be positive", file=sys.stderr)
            return EXIT_BAD_INPUT
    try:
        if getattr(args, "quiet", False):
            quiet_third_party()
        return args.fn(args)
    except E2EDictError as e:
        print(f"e2edict: error: {' '.join(str(e).split(chr(10)))}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("e2edict: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
