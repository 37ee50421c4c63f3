"""Diagnostics: ArviZ conversion, metrics, function-space tools, plots and the HTML report.

Submodules are imported on use (``marginalize.core.arviz`` is the one place that
talks to ArviZ).
"""
