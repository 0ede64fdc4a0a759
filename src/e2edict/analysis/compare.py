"""`e2edict compare`: a table of runs (Markdown and CSV) and the plots researchers read first:
L0 and alive latents against CE-loss increase with one Pareto frontier per SAE type, downstream
explained variance by layer, the SAE output/input norm ratio by position, and, for runs that
`e2edict interp` has evaluated, each interpretability figure against L0 per SAE type."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from e2edict.analysis.runs import COLUMNS, FinishedRun, rows  # noqa: E402
from e2edict.interpret.table import HEADLINE  # noqa: E402

TYPE_COLORS = {"local": "tab:blue", "e2e": "tab:orange", "e2e+ds": "tab:green"}
LINE_STYLES = ["-", "--", ":", "-."]  # runs of one type: one colour, a style each


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both coordinates (lower is better on each), sorted by x."""
    front: list[tuple[float, float]] = []
    best_y = math.inf
    for x, y in sorted(points):
        if y < best_y:
            front.append((x, y))
            best_y = y
    return front


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def write_tables(table: list[dict[str, Any]], out: Path, name: str = "runs", columns: list[str] = COLUMNS) -> tuple[Path, Path]:
    md, csv_path = out / f"{name}.md", out / f"{name}.csv"
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in table:
        lines.append("| " + " | ".join(_fmt(row[c]).replace("|", "\\|") for c in columns) + " |")
    md.write_text("\n".join(lines) + "\n")
    with open(csv_path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=columns)
        w.writeheader()
        for row in table:
            w.writerow({c: ("" if row[c] is None else row[c]) for c in columns})
    return md, csv_path


def _finish(fig, ax, path: Path, **legend) -> None:
    """Grid, a legend when something is labelled, and the PNG."""
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**legend)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _scatter_with_fronts(table: list[dict[str, Any]], xkey: str, xlabel: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for typ in sorted({r["type"] for r in table}):
        pts = [(r[xkey], r["ce_loss_increase"]) for r in table if r["type"] == typ and r[xkey] is not None]
        if not pts:
            continue
        color = TYPE_COLORS.get(typ)
        ax.scatter(*zip(*pts, strict=True), label=typ, color=color, alpha=0.8)
        front = pareto_front(pts)
        if len(front) > 1:
            ax.plot(*zip(*front, strict=True), color=color, lw=1.5)
    for r in table:
        if r[xkey] is not None:
            ax.annotate(
                r["run"], (r[xkey], r["ce_loss_increase"]), fontsize=7, alpha=0.7, xytext=(3, 3), textcoords="offset points"
            )
    ax.set_xlabel(xlabel)
    ax.set_ylabel("CE-loss increase (nats)")
    _finish(fig, ax, path, title="SAE type")


def _layer_key(hook: str) -> tuple[int, int]:
    m = re.match(r"blocks\.(\d+)\.", hook)
    return (int(m.group(1)) if m else 0, 1 if hook.endswith("resid_post") else 0)


def _downstream_plot(runs: list[FinishedRun], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for i, r in enumerate(runs):
        for hook, m in r.eval["saes"].items():
            ds = m.get("downstream_explained_variance") or {}
            if not ds:
                continue
            hooks = sorted(ds, key=_layer_key)
            label = r.name if len(r.eval["saes"]) == 1 else f"{r.name}:{hook}"
            ax.plot(
                range(len(hooks)),
                [ds[h] for h in hooks],
                marker="o",
                label=label,
                color=TYPE_COLORS.get(r.preset),
                ls=LINE_STYLES[i % len(LINE_STYLES)],
            )
            ax.set_xticks(
                range(len(hooks)), [h.replace("blocks.", "").replace("hook_", "") for h in hooks], rotation=30, fontsize=7
            )
    ax.set_ylabel("downstream explained variance")
    ax.set_xlabel("later residual-stream hook")
    _finish(fig, ax, path, fontsize=7)


def _norm_ratio_plot(runs: list[FinishedRun], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for i, r in enumerate(runs):
        for hook, m in r.eval["saes"].items():
            by_pos = m.get("norm_ratio_by_position")
            if by_pos:
                label = r.name if len(r.eval["saes"]) == 1 else f"{r.name}:{hook}"
                ax.plot(
                    range(len(by_pos)),
                    by_pos,
                    label=label,
                    color=TYPE_COLORS.get(r.preset),
                    lw=1,
                    ls=LINE_STYLES[i % len(LINE_STYLES)],
                )
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("position in sequence")
    ax.set_ylabel("‖SAE output‖ / ‖SAE input‖")
    _finish(fig, ax, path, fontsize=7)


def _prefix_plot(runs: list[FinishedRun], path: Path) -> None:
    """CE-loss increase with each Matryoshka prefix alone spliced in, against the prefix's size."""
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for i, r in enumerate(runs):
        for hook, m in r.eval["saes"].items():
            pre = m.get("prefixes")
            if not pre:
                continue
            label = r.name if len(r.eval["saes"]) == 1 else f"{r.name}:{hook}"
            ax.plot(
                [p["size"] for p in pre],
                [p["ce_loss_increase"] for p in pre],
                marker="osD^v"[i % 5],
                label=label,
                color=TYPE_COLORS.get(r.preset),
                ls=LINE_STYLES[i % len(LINE_STYLES)],
            )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prefix size (latents)")
    ax.set_ylabel("CE-loss increase, prefix alone (nats)")
    _finish(fig, ax, path, fontsize=7)


def _interp_plot(table: list[dict[str, Any]], path: Path) -> bool:
    """Each interpretability figure against L0, one colour per SAE type (as the Pareto plots)."""
    keys = [k for k in HEADLINE if any(r[k] is not None and not math.isnan(r[k]) for r in table)]
    if not keys:
        return False
    cols = min(3, len(keys))
    nrows = -(-len(keys) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        for typ in sorted({r["type"] for r in table}):
            pts = [(r["l0"], r[key]) for r in table if r["type"] == typ and r[key] is not None and r["l0"] is not None]
            if pts:
                ax.scatter(*zip(*pts, strict=True), label=typ, color=TYPE_COLORS.get(typ), alpha=0.8)
        ax.set_xlabel("L0", fontsize=8)
        ax.set_title(key, fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, title="SAE type", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def per_run(runs: list[FinishedRun]) -> list[dict[str, Any]]:
    """One row per run, its SAEs spliced in together: mean L0 and explained variance over them, the
    lowest CE-loss score, and a transcoder run's graph scores (eval.json ``graph``)."""
    out = []
    for r in runs:
        ms = list(r.eval["saes"].values())
        mean = {k: sum(m[k] for m in ms) / len(ms) for k in ("l0", "explained_variance", "alive")}
        scores = [m["ce_loss_score"] for m in ms if m.get("ce_loss_score") is not None]
        graph = r.eval.get("graph", {})
        out.append({
            "run": r.name, "type": r.preset, "ce_loss_increase": r.eval["ce_loss_increase"], "kl": r.eval["kl"], **mean,
            "min_ce_loss_score": min(scores) if scores else None,
            "replacement_score": graph.get("replacement_score"), "completeness_score": graph.get("completeness_score"),
        })  # fmt: skip
    return out


def compare(runs: list[FinishedRun], out: Path) -> dict[str, Path]:
    """Write runs.md, runs.csv and the PNG plots into ``out``; return what was written."""
    out.mkdir(parents=True, exist_ok=True)
    table = rows(runs)
    md, csv_path = write_tables(table, out)
    written = {"table_md": md, "table_csv": csv_path}
    for key, label, name in (
        ("l0", "L0 (active latents per token)", "l0_vs_ce.png"),
        ("alive", "alive latents", "alive_vs_ce.png"),
    ):
        _scatter_with_fronts(table, key, label, out / name)
        written[name] = out / name
    if any(len(r.eval["saes"]) > 1 for r in runs):  # several SAEs (e.g. a transcoder per MLP): one row per run
        whole = per_run(runs)
        cols = ["run", "type", "l0", "explained_variance", "alive", "ce_loss_increase", "kl", "min_ce_loss_score"]
        cols += [k for k in ("replacement_score", "completeness_score") if any(w[k] is not None for w in whole)]
        written["per_run_md"], written["per_run_csv"] = write_tables(whole, out, "per_run", cols)
        _scatter_with_fronts(whole, "l0", "mean L0 over the run's SAEs", out / "mean_l0_vs_ce.png")
        written["mean_l0_vs_ce.png"] = out / "mean_l0_vs_ce.png"
    if any("prefixes" in m for r in runs for m in r.eval["saes"].values()):  # Matryoshka SAEs
        _prefix_plot(runs, out / "prefix_ce.png")
        written["prefix_ce.png"] = out / "prefix_ce.png"
    if _interp_plot(table, out / "interp_vs_l0.png"):
        written["interp_vs_l0.png"] = out / "interp_vs_l0.png"
    _downstream_plot(runs, out / "downstream_ev.png")
    _norm_ratio_plot(runs, out / "norm_ratio.png")
    written["downstream_ev.png"] = out / "downstream_ev.png"
    written["norm_ratio.png"] = out / "norm_ratio.png"
    return written


def compare_with_geometry(runs: list[FinishedRun], out: Path, progress: bool = False) -> dict[str, Path]:
    """`compare` plus the dictionary geometry of every SAE of the runs."""
    from e2edict.analysis.geometry import geometry, write_geometry
    from e2edict.errors import E2EDictError
    from e2edict.rundir import RunDir

    written = compare(runs, out)
    folders = {}
    for r in runs:
        for hook in r.eval["saes"]:
            label = r.name if len(r.eval["saes"]) == 1 else f"{r.name}:{hook}"
            folders[label] = RunDir(r.path).sae_folder(hook)
    missing = [str(f) for f in folders.values() if not f.is_dir()]
    if missing:
        raise E2EDictError(f"SAE folder(s) missing: {', '.join(missing)}")
    geo_rows, dists = geometry(folders, progress=progress)
    written.update(write_geometry(geo_rows, dists, out))
    return written
