"""interp.json's headline figures (the rows of the table `e2edict interp` prints, the columns and
plots of `e2edict compare`) and how a new interp.json joins an earlier one; free of the metrics'
heavy imports."""

from __future__ import annotations

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


def merge_interp(old: dict | None, new: dict) -> dict:
    """A new interp.json over an earlier one of the same run: the metrics run now replace theirs,
    the others are kept (``e2edict interp RUN --metrics autointerp`` keeps the probing figures)."""
    if not old:
        return new
    out = {**old, **{k: v for k, v in new.items() if k != "saes"}}
    out["metrics"] = sorted(set(old.get("metrics", [])) | set(new.get("metrics", [])))
    out["saes"] = {h: {**(old.get("saes") or {}).get(h, {}), **e} for h, e in new["saes"].items()}
    return out
