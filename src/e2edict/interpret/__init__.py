"""Are the features any good? Interpretability metrics of SAEs, with the field's definitions:
sparse probing and feature absorption (SAEBench's), explanations scored without an LLM (Gao et
al. 2024's n-gram patterns) and autointerp with one (SAEBench's detection protocol). One module
a metric; `e2edict.interpret.suite` runs them together (`docs/interpretability.md`)."""

from e2edict.interpret.suite import METRICS, InterpOptions, interpret_saes
from e2edict.interpret.table import headline

__all__ = ["METRICS", "InterpOptions", "headline", "interpret_saes"]
