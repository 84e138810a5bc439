"""Evaluation: running attacks over data sets, attack suites with per-sample worst case and
gradient-masking checks, and the resumable SQLite store of runs.

``advkit.evaluate(model, x, y, threat, suite="lean")`` is the entry point.
"""

from advkit.evaluation.accuracy import accuracy
from advkit.evaluation.batching import (
    curve_rows,
    curves,
    finite_or_none,
    merge,
    run_attack,
    sweep,
    table_rows,
)
from advkit.evaluation.checks import Check
from advkit.evaluation.engine import EvaluationReport, ExpectedLogits, evaluate, read_report
from advkit.evaluation.store import DEFAULT_STORE, Store
from advkit.evaluation.suites import SUITES, Stage, Suite, get_suite

__all__ = ["Check", "DEFAULT_STORE", "EvaluationReport", "ExpectedLogits", "SUITES", "Stage",
           "Store", "Suite", "accuracy", "curve_rows", "curves", "evaluate", "finite_or_none",
           "get_suite", "merge", "read_report", "run_attack", "sweep", "table_rows"]
