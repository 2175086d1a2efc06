"""``rwft sweep`` and ``rwft report``: comparative experiments (``rwft.experiments``), registered like any plugin.

The commands import their package only when they run, so ``rwft --help`` stays fast and
``rwft.core`` never imports Ray.
"""

from __future__ import annotations

from rwft.core.hookspecs import Register, hookimpl


def sweep(argv: list[str]) -> int:
    from rwft.experiments.cli import sweep_main

    return sweep_main(argv)


def report(argv: list[str]) -> int:
    from rwft.experiments.cli import report_main

    return report_main(argv)


@hookimpl
def register_commands(register: Register) -> None:
    register("sweep", sweep, "sweep centralised and federated trials over a search space (Ray Tune)")
    register("report", report, "Markdown/HTML report with figures of a sweep or a run directory")
