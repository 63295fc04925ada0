"""The ``workbench`` command: ``demo``, ``train``, ``measure`` and ``report``."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from workbench.errors import InputError, WorkbenchError

#: Measurements the CLI knows by name, as "module:class" so that nothing heavy loads until used.
MEASUREMENTS: dict[str, str] = {
    "basic": "workbench.probes.basic.measurement:LossAccuracy",
    "routing": "workbench.probes.routing.measurement:RoutingStats",
    "pathways": "workbench.probes.pathways.measurement:RoutingPathways",
    "calibration": "workbench.probes.calibration.measurement:Calibration",
    "probes": "workbench.probes.linear.measurement:LinearProbeAccuracy",
}
#: What ``workbench demo`` measures on the built-in run.
DEMO_MEASUREMENTS: list[str] = ["basic", "routing", "calibration", "pathways", "probes"]


def make_measurement(name: str):
    if name not in MEASUREMENTS:
        raise InputError(f"unknown measurement {name!r}; known: {', '.join(sorted(MEASUREMENTS))}")
    mod, _, cls = MEASUREMENTS[name].partition(":")
    return getattr(importlib.import_module(mod), cls)()


def _open_run(path: str):
    from workbench.runs import Run

    return Run.from_folder(path)


def cmd_demo(args) -> Path:
    from workbench import toys
    from workbench.measure import measure
    from workbench.toys.influence import grokking_influence
    from workbench.report import run_report

    run = toys.ensure_run(quick=args.quick or None, retrain=args.retrain)
    print(f"run: {run.root} ({len(run)} checkpoints)", flush=True)
    measure(run, [make_measurement(n) for n in DEMO_MEASUREMENTS], device=args.device, overwrite=args.retrain)
    # Influence of the training pairs on held-out answers at the run's phases (a few seconds on the CPU).
    grokking_influence(run, device=args.device, overwrite=args.retrain)
    path = run_report(run, args.out)
    print(f"report: {path.resolve()}", flush=True)
    return path


def cmd_train(args) -> None:
    from workbench import toys

    # Trains here even where the package ships the run (which `demo` installs instead of training).
    run = toys.ensure_run(quick=args.quick or None, retrain=args.retrain, root=args.out, shipped=False)
    print(f"run: {run.root}")


def cmd_measure(args) -> None:
    from workbench.measure import measure

    run = _open_run(args.run)
    names = args.probe or DEMO_MEASUREMENTS
    store = measure(run, [make_measurement(n) for n in names], device=args.device, overwrite=args.overwrite)
    print(f"store: {store.root}")


def cmd_report(args) -> None:
    from workbench.report import render_notebook, run_report

    target = Path(args.target)
    if target.suffix == ".ipynb":
        print(f"report: {render_notebook(target, args.out).resolve()}")
    elif target.is_dir() and not (target / "run.json").exists() and list(target.glob("*.ipynb")):
        out_dir = Path(args.out or "reports")
        for nb in sorted(target.glob("*.ipynb")):
            print(f"report: {render_notebook(nb, out_dir / (nb.stem + '.html')).resolve()}", flush=True)
    else:
        print(f"report: {run_report(_open_run(args.target), args.out).resolve()}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="workbench", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="install (or train) the built-in run if needed, measure it, write report.html")
    d.add_argument("--quick", action="store_true", help="the short test run instead of the full one")
    d.add_argument("--retrain", action="store_true", help="train and measure again from scratch")
    d.add_argument("--out", help="where to write the report (default: report.html in the run folder)")
    d.add_argument("--device", help="cuda or cpu (default: cuda when present)")
    d.set_defaults(func=cmd_demo)

    t = sub.add_parser("train", help="train the built-in run here (the demo installs the shipped one)")
    t.add_argument("--quick", action="store_true")
    t.add_argument("--retrain", action="store_true")
    t.add_argument("--out", help="folder for the run (default: under $WORKBENCH_HOME/runs)")
    t.set_defaults(func=cmd_train)

    m = sub.add_parser("measure", help="measure a run folder into its store")
    m.add_argument("run", help="a built-in run folder or a folder of HF checkpoints")
    m.add_argument("--probe", action="append", help=f"measurement name (repeatable): {', '.join(MEASUREMENTS)}")
    m.add_argument("--device")
    m.add_argument("--overwrite", action="store_true", help="measure again even if parts exist")
    m.set_defaults(func=cmd_measure)

    r = sub.add_parser("report", help="HTML report of a run folder, a notebook, or a folder of notebooks")
    r.add_argument("target")
    r.add_argument("--out")
    r.set_defaults(func=cmd_report)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except WorkbenchError as exc:
        print(f"workbench: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
