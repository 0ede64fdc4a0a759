"""interp.json's headline figures: the table `e2edict interp` prints and the columns and plots
of `e2edict compare` (kept free of the metrics' heavy imports)."""

from __future__ import annotations

import math

K_VALUES = (1, 2, 5, 10)  # sparse probing's k (`e2edict.interpret.probing`)
HEADLINE = ("probe_llm_acc", *(f"probe_top{k}_acc" for k in K_VALUES), "absorption_fraction", "full_absorption",
            "split_features", "ngram_precision", "ngram_recall", "tokenset_precision", "tokenset_recall",
            "autointerp_score")  # fmt: skip


def headline(entry: dict) -> dict[str, float]:
    """One SAE's headline figures (the table's rows, `compare`'s columns)."""
    out: dict[str, float] = {}
    sp = entry.get("sparse_probing")
    if sp:
        out["probe_llm_acc"] = sp["llm_test_accuracy"]
        for k in K_VALUES:
            out[f"probe_top{k}_acc"] = sp[f"sae_top_{k}_test_accuracy"]
    ab = entry.get("absorption")
    if ab and "skipped" not in ab:
        out["absorption_fraction"] = ab["mean_absorption_fraction"]
        out["full_absorption"] = ab["mean_full_absorption"]
        out["split_features"] = ab["mean_num_split_features"]
    ex = entry.get("explanations")
    if ex and "skipped" not in ex:
        out["ngram_precision"] = ex["precision"]["mean"]
        out["ngram_recall"] = ex["recall"]["mean"]
        out["tokenset_precision"] = ex["token_set_precision"]["mean"]
        out["tokenset_recall"] = ex["token_set_recall"]["mean"]
    ai = entry.get("autointerp")
    if ai:
        out["autointerp_score"] = ai["score"]
    return out


def format_interp_table(runs: dict[str, dict]) -> str:
    """One column per run (and SAE), one row per headline figure."""
    cols = []
    for name, res in runs.items():
        for h, entry in res["saes"].items():
            cols.append((name if len(res["saes"]) == 1 else f"{name}:{h}", headline(entry)))
    keys = list(dict.fromkeys(k for _, c in cols for k in c))
    table = [["", *[c[0] for c in cols]]]
    for k in keys:
        table.append([k, *[("-" if k not in c or c[k] is None or math.isnan(c[k]) else f"{c[k]:.4f}") for _, c in cols]])
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = [
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths, strict=True)))
        for r in table
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def merge_interp(old: dict | None, new: dict) -> dict:
    """A new interp.json over an earlier one of the same run: the metrics run now replace theirs,
    the others are kept (``e2edict interp RUN --metrics autointerp`` keeps the probing figures)."""
    if not old:
        return new
    out = {**old, **{k: v for k, v in new.items() if k != "saes"}}
    out["metrics"] = sorted(set(old.get("metrics", [])) | set(new.get("metrics", [])))
    out["saes"] = {h: {**(old.get("saes") or {}).get(h, {}), **e} for h, e in new["saes"].items()}
    return out
