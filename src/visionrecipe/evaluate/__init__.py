"""Scoring a run, and the report built from the scores.

    import visionrecipe
    visionrecipe.evaluate("runs/x", split="test")   # this package is callable: scoring.evaluate_run

scoring.py computes the metrics; report.py writes report.html from them.
"""

from visionrecipe import make_callable

make_callable(__name__, "visionrecipe.evaluate.scoring", "evaluate_run")
