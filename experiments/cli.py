"""``rwft sweep`` and ``rwft report`` (registered by ``rwft.plugins.commands_experiments``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from rwft.core.errors import RwftError


def sweep_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="rwft sweep", description="Run a sweep of centralised and federated "
                                     "trials (Ray Tune, or --backend local), then its tables and report.")
    parser.add_argument("sweep", nargs="?", metavar="SWEEP.yaml", help="sweep file (see examples/sweep_smoke.yaml)")
    parser.add_argument("overrides", nargs="*", help="output_dir=DIR, resources.cpu=N, ... or config key=value "
                                                     "for every trial (data.root=...)")
    parser.add_argument("--resume", metavar="SWEEP_DIR", help="continue an interrupted sweep; finished trials "
                                                             "are not run again")
    parser.add_argument("--backend", choices=("ray", "local"), default="ray",
                        help="ray (default): Ray Tune schedules the trials; local: one after another, no Ray")
    parser.add_argument("--address", help="an existing Ray cluster (ray://HOST:10001 or HOST:6379); default: a "
                                          "local Ray runtime on this machine's cores")
    args = parser.parse_args(list(argv))
    try:
        return _sweep(args)
    except RwftError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _sweep(args: argparse.Namespace) -> int:
    from rwft.experiments.report import write_report
    from rwft.experiments.results import write_tables
    from rwft.experiments.sweep import load_sweep, resolve_resume, run_local, run_ray, save_resolved

    overrides = list(args.overrides)
    if args.sweep and "=" in args.sweep:  # `rwft sweep --resume DIR k=v`: argparse takes k=v as the file
        overrides.insert(0, args.sweep)
        args.sweep = None
    if args.resume:
        if args.sweep:
            raise RwftError("pass either a sweep file or --resume SWEEP_DIR, not both.")
        sweep = resolve_resume(args.resume, overrides)
    elif args.sweep:
        sweep = load_sweep(args.sweep, overrides)
        if (sweep.sweep_dir / "trials").is_dir() and any((sweep.sweep_dir / "trials").iterdir()):
            raise RwftError(f"{sweep.sweep_dir} already holds a sweep. Continue it with --resume {sweep.sweep_dir}, "
                            "or choose a new output_dir=DIR.")
    else:
        raise RwftError("name a sweep file (rwft sweep SWEEP.yaml) or a sweep to continue (--resume SWEEP_DIR).")
    save_resolved(sweep)
    print(f"rwft sweep: {sweep.total} trial(s) x {sweep.cpu:g} CPU, {sweep.gpu:g} GPU each -> {sweep.sweep_dir} "
          f"({args.backend} backend)", file=sys.stderr, flush=True)
    if args.backend == "local":
        run_local(sweep)
    else:
        run_ray(sweep, resume=bool(args.resume), address=args.address)
    tables = write_tables(sweep.sweep_dir, sweep.param_keys())
    report = write_report(sweep.sweep_dir, tables)
    failed = tables.results[tables.results["status"] != "complete"]
    print(f"rwft sweep: {len(tables.results) - len(failed)} of {sweep.total} trials complete.\n"
          f"  results: {sweep.sweep_dir / 'results.csv'}\n  summary: {sweep.sweep_dir / 'summary.csv'}\n"
          f"  report:  {report}\n  TensorBoard (HParams compares the trials): tensorboard --logdir "
          f"{sweep.sweep_dir / 'trials'}", file=sys.stderr)
    if len(failed):
        print(f"rwft sweep: not complete: {', '.join(failed['trial'])}. Continue with: rwft sweep --resume "
              f"{sweep.sweep_dir}", file=sys.stderr)
        return 1
    return 0


def report_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="rwft report", description="Markdown + HTML report with figures of a "
                                     "sweep, or of one rwft train / rwft simulate run directory.")
    parser.add_argument("directory", metavar="SWEEP_DIR|RUN_DIR")
    args = parser.parse_args(list(argv))
    from rwft.experiments.report import write_report

    try:
        path = write_report(Path(args.directory))
    except RwftError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"rwft report: {path} (and {path.with_suffix('.html').name}, figures/)", file=sys.stderr)
    return 0
