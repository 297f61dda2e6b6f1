"""`visionrecipe report RUN_DIR`: write report.html (and its PNGs) into a run directory.

    visionrecipe report runs/digits          # then open runs/digits/report.html
"""

from __future__ import annotations


def cmd_report(args) -> int:
    from visionrecipe.errors import VisionRecipeError

    try:
        from visionrecipe.evaluate.report import write_report
    except ImportError:
        raise VisionRecipeError("reports need matplotlib: pip install 'visionrecipe[report]'") from None

    path = write_report(args.run)
    print(f"wrote {path}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("report", help="write a self-contained report.html for a run")
    p.add_argument("run", help="run directory")
    p.set_defaults(func=cmd_report)
