"""The ``workbench`` command: ``demo``, ``train``, ``measure``, ``report`` and ``numbers``."""

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


def measure_demo(run, device: str | None = None, overwrite: bool = False, timings: dict | None = None):
    """Measure a built-in grokking run with everything the demo shows (resumable: what is in the store already
    is kept). ``timings`` receives the seconds of each phase."""
    import time

    from workbench.measure import measure
    from workbench.toys.influence import grokking_influence

    timings = {} if timings is None else timings
    t = time.perf_counter()
    measure(run, [make_measurement(n) for n in DEMO_MEASUREMENTS], device=device, overwrite=overwrite)
    timings["measure"] = time.perf_counter() - t
    # Influence of the training pairs on held-out answers at the run's phases.
    t = time.perf_counter()
    grokking_influence(run, device=device, overwrite=overwrite)
    timings["influence"] = time.perf_counter() - t
    return run


def measured_demo_run(quick: bool | None = None, retrain: bool = False, device: str | None = None,
                      timings: dict | None = None):
    """The built-in run, trained if needed, measured by :func:`measure_demo`."""
    import time

    from workbench import toys

    timings = {} if timings is None else timings
    t = time.perf_counter()
    run = toys.ensure_run(quick=quick, retrain=retrain)
    timings["train"] = time.perf_counter() - t
    print(f"run: {run.root} ({len(run)} checkpoints)", flush=True)
    return measure_demo(run, device, retrain, timings)


def cmd_demo(args) -> Path:
    import time

    from workbench.report import run_report

    timings: dict = {}
    run = measured_demo_run(args.quick or None, args.retrain, args.device, timings)
    t = time.perf_counter()
    path = run_report(run, args.out)
    timings["report"] = time.perf_counter() - t
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()), flush=True)
    print(f"report: {path.resolve()}", flush=True)
    return path


def cmd_numbers(args) -> None:
    """Print the built-in run's named numbers, or rewrite (``--write``) / compare (``--check``) the spans and
    blocks of markdown files with them. Several runs: each number becomes the range over them."""
    import json

    from workbench.toys import numbers as N

    runs = [measure_demo(_open_run(r)) for r in args.run] if args.run else [measured_demo_run(args.quick or None)]
    nums = N.combine([N.grokking_numbers(r) for r in runs])
    if args.json:
        Path(args.json).write_text(json.dumps(N.as_json(nums), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    for path in args.write or []:
        p = Path(path)
        p.write_text(N.fill(p.read_text(encoding="utf-8"), nums), encoding="utf-8")
        print(f"numbers: rewrote {len(N.quoted(p.read_text(encoding='utf-8')))} quoted numbers in {p}")
    problems = []
    for path in args.check or []:
        problems += [f"{path}: {line}" for line in N.check(Path(path).read_text(encoding="utf-8"), nums)]
    if problems:
        raise InputError("quoted numbers differ from the run's:\n  " + "\n  ".join(problems)
                         + "\nrewrite them with: workbench numbers --write FILE (make numbers)")
    if not (args.write or args.check or args.json):
        print(N.markdown(nums))


def cmd_train(args) -> None:
    from workbench import toys

    run = toys.ensure_run(quick=args.quick or None, retrain=args.retrain, root=args.out)
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

    d = sub.add_parser("demo", help="train the built-in run if needed, measure it, write report.html")
    d.add_argument("--quick", action="store_true", help="the short test run instead of the full one")
    d.add_argument("--retrain", action="store_true", help="train and measure again from scratch")
    d.add_argument("--out", help="where to write the report (default: report.html in the run folder)")
    d.add_argument("--device", help="cuda or cpu (default: cuda when present)")
    d.set_defaults(func=cmd_demo)

    t = sub.add_parser("train", help="train the built-in run")
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

    n = sub.add_parser("numbers", help="the built-in run's quoted numbers, from its store; rewrite or check a README")
    n.add_argument("run", nargs="*", help="built-in run folders, e.g. other seeds (default: the built-in run); each "
                                          "is measured as the demo measures it if needed; several: each number "
                                          "becomes the range over them")
    n.add_argument("--quick", action="store_true", help="the short test run instead of the full one")
    n.add_argument("--write", action="append", metavar="FILE", help="rewrite the marked numbers of FILE (repeatable)")
    n.add_argument("--check", action="append", metavar="FILE", help="fail if FILE quotes other numbers (repeatable)")
    n.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    n.set_defaults(func=cmd_numbers)

    r = sub.add_parser("report", help="HTML report of a run folder, a notebook, or a folder of notebooks")
    r.add_argument("target")
    r.add_argument("--out")
    r.set_defaults(func=cmd_report)
    return p


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings on one line of their own, above the progress bars (the default also prints the source line,
    which lands in the middle of a bar)."""
    from tqdm import tqdm

    tqdm.write(f"warning: {category.__name__}: {message}", file=file or sys.stderr)


def main(argv: list[str] | None = None) -> int:
    import warnings

    warnings.showwarning = _show_warning
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except WorkbenchError as exc:
        print(f"workbench: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
