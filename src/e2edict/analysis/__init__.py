"""Offline analysis of run directories: tables, Pareto plots, dictionary geometry, HTML reports."""
