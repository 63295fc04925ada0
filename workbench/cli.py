"""The ``workbench`` command: ``demo``, ``train``, ``measure``, ``report``, ``numbers`` and ``store verify``.

Measurements are found through the registry (:func:`workbench.measure.registry`): ``--probe NAME`` takes any
registered name, ``--option [NAME.]FIELD=VALUE`` sets any of its fields, and the files given with ``--samples``,
``--documents`` and ``--queries`` go to the measurements that take them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from workbench.errors import InputError, WorkbenchError

# The subcommands import the package (torch, polars, plotly: seconds) when they run, so that `workbench --help`
# and a mistyped command answer at once.


def parse_options(pairs: list[str]) -> list[tuple[str | None, str, object]]:
    """``[NAME.]FIELD=VALUE`` pairs as (measurement name or None, field, value); values are read as JSON
    (numbers, true/false, null, lists), else kept as text."""
    out = []
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise InputError(f"--option takes FIELD=VALUE or NAME.FIELD=VALUE, not {pair!r}")
        name, _, field = key.rpartition(".")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        out.append((name or None, field, value))
    return out


def parse_steps(pairs: list[str]) -> dict[str, int]:
    """``NAME=STEP`` pairs of ``--checkpoint-step`` as a mapping of checkpoint names to steps."""
    out = {}
    for pair in pairs:
        name, sep, step = pair.rpartition("=")
        if not sep or not name or not step.strip().isdigit():
            raise InputError(f"--checkpoint-step takes NAME=STEP (a folder name and a step number), not {pair!r}")
        out[name] = int(step)
    return out


def build_measurements(names: list[str], inputs: dict, options: list[tuple[str | None, str, object]]) -> list:
    """Measurements by registered name, each given the ``inputs`` and ``options`` that are fields of it."""
    from workbench.measure import measurement_class

    classes = [measurement_class(n) for n in names]
    fields = {cls.name: {f.name for f in dataclasses.fields(cls)} for cls in classes}
    for key in ("documents", "queries"):
        if key in inputs and not any(key in f for f in fields.values()):
            raise InputError(f"--{key} is not taken by {', '.join(names)}; add the probe that takes it "
                             "(--probe influence)")
    for name, field, _ in options:
        targets = [name] if name else [n for n in names if field in fields[n]]
        if not targets or any(n not in fields or field not in fields[n] for n in targets):
            raise InputError(f"--option {(name + '.') if name else ''}{field}: no chosen probe ({', '.join(names)}) "
                             "has that option")
    out = []
    for cls in classes:
        kwargs = {k: v for k, v in inputs.items() if k in fields[cls.name]}
        kwargs |= {f: v for n, f, v in options if (n or cls.name) == cls.name and f in fields[cls.name]}
        out.append(cls(**kwargs))
    return out


def _tokenizer(run, path: str | None):
    from transformers import AutoTokenizer

    source = path or run.checkpoints[0].source
    try:
        return AutoTokenizer.from_pretrained(source, revision=None if path else run.checkpoints[0].revision)
    except (OSError, ValueError) as exc:
        raise InputError(f"no tokenizer could be loaded from {source} ({exc}); pass --tokenizer with a folder (or hub "
                         "id) that holds the model's tokenizer") from exc


def _run_samples(run, samples, overwrite: bool) -> None:
    """Give ``run`` these samples and keep them in its folder for later measurements; samples other than those
    it was measured on are refused unless ``overwrite``."""
    from workbench.samples import SampleSet

    kept = run.folder / "samples.parquet"
    if kept.exists() and not overwrite and SampleSet.load(kept).digest() != samples.digest():
        raise InputError(f"{run.folder} was measured on other samples (its samples.parquet); pass --overwrite to "
                         "measure the chosen probes again on these")
    samples.save(kept)
    run.samples = samples


def measure_demo(run, device: str | None = None, overwrite: bool = False, timings: dict | None = None):
    """Measure a built-in grokking run with everything the demo shows (resumable: what is in the store already
    is kept). ``timings`` receives the seconds of each phase."""
    import time

    from workbench.measure import demo_measurements, measure
    from workbench.toys.influence import grokking_influence

    timings = {} if timings is None else timings
    t = time.perf_counter()
    measure(run, demo_measurements(), device=device, overwrite=overwrite)
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

    from workbench.runs import Run
    from workbench.toys import numbers as N

    runs = [measure_demo(Run.from_folder(r)) for r in args.run] if args.run else [measured_demo_run(args.quick or None)]
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
    from workbench.measure import demo_measurements, measure
    from workbench.runs import Run
    from workbench.samples import read_samples

    run = Run.from_folder(args.run, steps=parse_steps(args.checkpoint_step or []) or None)
    names = args.probe or demo_measurements()
    options = parse_options(args.option or [])
    files = {k: getattr(args, k) for k in ("samples", "documents", "queries") if getattr(args, k)}
    tokenizer = _tokenizer(run, args.tokenizer) if files else None
    inputs = {}
    for what, info_name, id_name in (("documents", "document_info", "doc_id"), ("queries", "query_info", "query_id")):
        if what in files:
            inputs[what], info = read_samples(files[what], tokenizer)
            inputs[info_name] = info.rename({"sample_id": id_name})
    if inputs:
        inputs["tokenizer"] = tokenizer
    measurements = build_measurements(names, inputs, options)  # checked before the samples are kept
    if "samples" in files:
        _run_samples(run, read_samples(files["samples"], tokenizer)[0], args.overwrite)
    store = measure(run, measurements, steps=args.step, device=args.device, overwrite=args.overwrite,
                    truncate=args.truncate, wait=args.wait, memory_budget=args.memory_budget)
    if os.environ.get("RANK", "0") == "0":  # under torchrun: said once
        print(f"store: {store.root}")


def cmd_report(args) -> None:
    from workbench.report import render_notebook, run_report
    from workbench.runs import Run

    target = Path(args.target)
    if target.suffix == ".ipynb":
        print(f"report: {render_notebook(target, args.out).resolve()}")
    elif target.is_dir() and not (target / "run.json").exists() and list(target.glob("*.ipynb")):
        out_dir = Path(args.out or "reports")
        for nb in sorted(target.glob("*.ipynb")):
            print(f"report: {render_notebook(nb, out_dir / (nb.stem + '.html')).resolve()}", flush=True)
    else:
        print(f"report: {run_report(Run.from_folder(args.target), args.out, args.probe).resolve()}")


def cmd_store_verify(args) -> int:
    from workbench.store import Store

    from workbench.errors import StoreError

    root = Path(args.store)
    if (root / "store").is_dir():  # a run folder: its store
        root = root / "store"
    elif (root / "run.json").exists() or (root / "samples.parquet").exists() or (root / "config.json").exists():
        raise StoreError(f"{root} is a run folder without a store: measure it first (workbench measure {root})")
    store = Store(root)
    problems = store.verify()
    fixed = store.repair() if args.repair and problems else []
    for p in problems:
        print(f"{'repaired' if p in fixed else 'found'}: {p}")
    left = [p for p in problems if p not in fixed and p.repairable]
    if not problems:
        print(f"store {root}: every part reads and holds what its name says")
    elif left:
        print(f"{len(left)} problem(s) left: `workbench store verify {args.store} --repair` removes them (a resume "
              "measures the removed parts again)")
    return 1 if left else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="workbench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
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

    m = sub.add_parser("measure", help="measure a run folder (built-in, or a folder of HF checkpoints) into its store")
    m.add_argument("run", help="a built-in run folder or a folder of HF checkpoints (one subfolder per step)")
    m.add_argument("--probe", action="append",
                   help="measurement name (repeatable; default: the demo's), e.g. basic, routing, pathways, "
                        "calibration, probes, influence, forgetting")
    m.add_argument("--samples", help="JSONL, JSON, CSV or Parquet file of samples: text, or prompt and completion "
                                     "(or text and target); optional id and group. Kept as the run's samples")
    m.add_argument("--documents", help="influence: the documents, a samples file (default: the run's samples)")
    m.add_argument("--queries", help="influence: the queries, a samples file with prompt and completion")
    m.add_argument("--tokenizer", help="folder or hub id of the tokenizer (default: the first checkpoint's folder)")
    m.add_argument("--option", action="append", metavar="[NAME.]FIELD=VALUE",
                   help="set a measurement's option (repeatable), e.g. tau=0.5 or influence.strategy=kfac")
    m.add_argument("--step", action="append", type=int, help="measure only this checkpoint step (repeatable)")
    m.add_argument("--device", help="cuda or cpu (default: cuda when present)")
    m.add_argument("--overwrite", action="store_true",
                   help="measure again from scratch (the old table stays until the new one is complete)")
    m.add_argument("--checkpoint-step", action="append", metavar="NAME=STEP",
                   help="the step of a checkpoint folder whose name does not say it (repeatable), e.g. final-v2=5000")
    m.add_argument("--truncate", action="store_true",
                   help="cut samples longer than the model's positions (default: refuse them)")
    m.add_argument("--wait", action="store_true", help="wait for another process writing the store to finish")
    m.add_argument("--memory-budget", metavar="SIZE",
                   help="most memory a capture holds in per-sample tensors (e.g. 4GiB); past it they stream to "
                        "memory-mapped files beside the store (default: no bound)")
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
    r.add_argument("--probe", action="append", help="only these measurements' sections (repeatable)")
    r.set_defaults(func=cmd_report)

    st = sub.add_parser("store", help="check a run's store")
    st_sub = st.add_subparsers(dest="store_command", required=True)
    v = st_sub.add_parser("verify", help="list the parts of a store that cannot be read or hold the wrong rows")
    v.add_argument("store", help="a run folder (its store/) or a store folder")
    v.add_argument("--repair", action="store_true", help="remove the bad parts, so that a resume measures them again")
    v.set_defaults(func=cmd_store_verify)
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
        rc = args.func(args)
    except WorkbenchError as exc:
        print(f"workbench: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    return rc if isinstance(rc, int) else 0  # a command returns an exit status, or something else on success


if __name__ == "__main__":
    sys.exit(main())
