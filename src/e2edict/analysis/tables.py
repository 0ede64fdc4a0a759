"""The tables the command prints: runs side by side, one column per run (and SAE)."""

from __future__ import annotations

import math
from typing import Any


def format_table(runs: dict[str, dict[str, Any]]) -> str:
    """One column per run (and SAE): L0, alive, CE-loss increase, KL, explained variance (and a
    transcoder run's replacement and completeness scores)."""
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
    if any("replacement_score" in r.get("graph", {}) for _, r, _ in cols):  # transcoder runs' attribution graphs
        rows.insert(-1, ("replacement score", lambda r, m: _graph(r, "replacement_score")))
        rows.insert(-1, ("completeness score", lambda r, m: _graph(r, "completeness_score")))
    table = [["", *[c[0] for c in cols]]]
    for label, fn in rows:
        table.append([label, *[fn(r, m) for _, r, m in cols]])
    return _aligned(table)


def _graph(res: dict[str, Any], key: str) -> str:
    v = res.get("graph", {}).get(key)
    return "-" if v is None else f"{v:.4f}"


def format_interp_table(runs: dict[str, dict[str, Any]]) -> str:
    """interp.json side by side: one column per run (and SAE), one row per headline figure."""
    from e2edict.interpret.table import headline

    cols = []
    for name, res in runs.items():
        for h, entry in res["saes"].items():
            cols.append((name if len(res["saes"]) == 1 else f"{name}:{h}", headline(entry)))
    keys = list(dict.fromkeys(k for _, c in cols for k in c))
    table = [["", *[c[0] for c in cols]]]
    for k in keys:
        table.append([k, *[("-" if c.get(k) is None or math.isnan(c[k]) else f"{c[k]:.4f}") for _, c in cols]])
    return _aligned(table)


def _aligned(table: list[list[str]]) -> str:
    """Rows of cells as text: the first column left-aligned, the rest right-aligned, a rule under the header."""
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = [
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
        for row in table
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
