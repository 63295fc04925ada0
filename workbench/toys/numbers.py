"""The numbers the README and the notebooks quote about the built-in grokking run, read from its store.

Typed numbers go stale: the run's recipe changes, or a machine trains a slightly different run. So every number
quoted about the built-in run has a name here and is computed from the run's store (and its ``run.json``):

- :func:`grokking_numbers` returns ``{name: Number}`` for a measured built-in run;
- the README holds each number as a marked span, ``<!--n:NAME-->1,650<!--/n-->`` (HTML comments, invisible
  when rendered), and each generated table as a block between ``<!--numbers:NAME-->`` and ``<!--/numbers-->``;
- :func:`fill` rewrites every span and block of a text from the numbers (``workbench numbers RUN --write
  README.md``, or ``make numbers``), :func:`check` lists the ones that differ (the tests run it against the
  run the tests train);
- :func:`combine` merges the numbers of several runs (seeds, thread counts): a number they disagree on becomes
  the range ``low–high``, and :func:`check` accepts any run whose value lies inside a quoted range.

The notebooks compute the same numbers in their cells (:func:`grokking_numbers` on the run they use), so their
prose never types one.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import polars as pl

from workbench.errors import InputError
from workbench.probes.calibration.measurement import scalar_table
from workbench.probes.coherence import findings as coherence_findings
from workbench.probes.influence.findings import same_answer_share, score_matrix
from workbench.probes.influence.measurement import influence_tables
from workbench.probes.pathways.figures import correlation_table
from workbench.probes.representations import findings as representation_findings
from workbench.stats import correlation
from workbench.toys.train import GENERALIZED_ACC, MEMORIZED_ACC

#: The thresholds of the run's phases: memorized when train accuracy first reaches MEMORIZED, generalized when
#: test accuracy first reaches GENERALIZED (the same as :func:`workbench.toys.influence.phase_steps`).
MEMORIZED, GENERALIZED = MEMORIZED_ACC, GENERALIZED_ACC  # one definition, with the training's phases

SPAN = re.compile(r"<!--n:(?P<name>[\w.@-]+)-->(?P<text>.*?)<!--/n-->", re.S)
BLOCK = re.compile(r"<!--numbers:(?P<name>[\w.@-]+)-->\n(?P<text>.*?)\n?<!--/numbers-->", re.S)
RANGE = re.compile(r"^(?P<lo>-?[\d,.]+)–(?P<hi>-?[\d,.]+)$")


@dataclass(frozen=True)
class Number:
    """One quoted number: its value (None for text such as a table) and how the README writes it."""

    value: float | None
    text: str


def _num(value, fmt: str) -> Number:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return Number(None, "undefined")
    return Number(float(value), format(value, fmt))


def _step(value) -> Number:
    return Number(None, "never") if value is None else Number(int(value), f"{int(value):,}")


def _text(text: str) -> Number:
    return Number(None, text)


def _sign(x: float, fmt: str = ".2f") -> str:
    return format(x, fmt).replace("-", "−")


# --- reading the store -------------------------------------------------------------------------------------------
def _means(store, probe: str) -> pl.DataFrame:
    t = store.table(probe)
    return t.filter(pl.col("sample_id").is_null()) if "sample_id" in t.columns else t


def _series(table: pl.DataFrame, metric: str, group: str) -> dict[int, float]:
    d = table.filter((pl.col("metric") == metric) & (pl.col("group") == group) & pl.col("layer").is_null()
                     if "layer" in table.columns else (pl.col("metric") == metric) & (pl.col("group") == group))
    return dict(d.sort("step").select("step", "value").iter_rows())


def _first(series: dict[int, float], level: float, after: int = -1) -> int | None:
    return next((s for s, v in sorted(series.items()) if s > after and v is not None and v >= level), None)


def phases(store) -> dict:
    """The steps of the run's phases from its ``basic`` table: ``mem`` (train accuracy first ≥ 0.99), ``half``
    (test accuracy first ≥ 0.5 after ``mem``), ``gen`` (first ≥ 0.95 after ``mem``), ``full`` (first 1.0) and
    ``last``; a phase the run never reaches is None."""
    if "basic" not in store.probes():
        raise InputError(f"the store at {store.root} has no 'basic' table; measure the run first (workbench demo)")
    basic = _means(store, "basic")
    train, test = _series(basic, "accuracy", "train"), _series(basic, "accuracy", "test")
    steps = sorted(test)
    mem = _first(train, MEMORIZED)
    after = mem if mem is not None else -1
    return {"steps": steps, "train": train, "test": test, "loss": _series(basic, "loss", "test"), "mem": mem,
            "half": _first(test, 0.5, after), "gen": _first(test, GENERALIZED, after),
            "full": _first(test, 1.0, after), "last": steps[-1]}


def _phase_table(ph: dict) -> str:
    marks = [ph["steps"][0], ph["mem"], _first(ph["test"], 0.25, ph["mem"] or -1), ph["half"],
             _first(ph["test"], 0.75, ph["mem"] or -1), ph["gen"], ph["full"], ph["last"]]
    cols = sorted({s for s in marks if s is not None})
    head = "| step | " + " | ".join(f"{s:,}" for s in cols) + " |"
    rows = [head, "|---" * (len(cols) + 1) + "|"]
    for label, series, fmt in (("train accuracy", ph["train"], ".3f"), ("test accuracy", ph["test"], ".3f"),
                               ("test loss", ph["loss"], ".2f")):
        rows.append(f"| {label} | " + " | ".join(format(series[s], fmt) for s in cols) + " |")
    return "\n".join(rows)


def _basic_numbers(run, ph: dict) -> dict[str, Number]:
    out = {
        "checkpoints": _step(len(ph["steps"])),
        "steps": _step(ph["last"]),
        "mem_step": _step(ph["mem"]),
        "test_acc_at_mem": _num(ph["test"].get(ph["mem"]) if ph["mem"] is not None else None, ".2f"),
        "test_loss_at_0": _num(ph["loss"][ph["steps"][0]], ".2f"),
        "test_loss_at_mem": _num(ph["loss"].get(ph["mem"]) if ph["mem"] is not None else None, ".2f"),
        "half_step": _step(ph["half"]),
        "gen_step": _step(ph["gen"]),
        "full_step": _step(ph["full"]),
        "gen_margin": _step(ph["last"] - ph["gen"] if ph["gen"] is not None else None),
        "test_acc_last": _num(ph["test"][ph["last"]], ".3f"),
        "phase_table": _text(_phase_table(ph)),
    }
    seconds = (run.info or {}).get("seconds") if run is not None else None
    if seconds is not None:  # machine-dependent: quoted with the machine, never checked
        out["train_seconds"] = _num(round(seconds), ".0f")
    if run is not None and (run.info or {}).get("machine"):  # where the run was trained (its bits depend on it)
        out["train_machine"] = _text(run.info["machine"])
    return out


def _routing_numbers(store, ph: dict) -> dict[str, Number]:
    if "routing" not in store.probes() or ph["mem"] is None:
        return {}
    r = store.table("routing").filter((pl.col("metric") == "load_entropy") & (pl.col("group") == "all"))
    n_exp = store.table("routing").filter(pl.col("metric") == "expert_load")["expert"].n_unique()
    mean = dict(r.group_by("step").agg(pl.col("value").mean()).select("step", "value").iter_rows())
    steps = [s for s in ph["steps"] if s >= ph["mem"]]
    ent, acc = [mean[s] for s in steps], [ph["test"][s] for s in steps]
    layers = sorted(r["layer"].unique().to_list())
    at = {(s, layer): v for s, layer, v in r.select("step", "layer", "value").iter_rows()}
    per_layer = ", ".join(f"L{layer} {at[(ph['mem'], layer)]:.2f} → {at[(ph['last'], layer)]:.2f}"
                          for layer in layers)
    return {
        "moe_layers": _step(len(layers)),
        "experts": _step(n_exp),
        "even_load_entropy": _num(math.log(n_exp), ".2f"),
        "load_entropy_pearson": _text(_sign(correlation(ent, acc, "pearson")[0])),
        "load_entropy_spearman": _text(_sign(correlation(ent, acc, "spearman")[0])),
        "load_entropy_layers": _text(per_layer),
    }


def _probe_numbers(store, ph: dict) -> dict[str, Number]:
    if "probes" not in store.probes():
        return {}
    t = store.table("probes").filter((pl.col("metric") == "accuracy") & pl.col("layer").is_not_null())
    have = sorted(t["step"].unique().to_list())

    def span(step):
        v = t.filter(pl.col("step") == step)["value"]
        return f"{v.min():.2f} to {v.max():.2f}"

    out = {}
    for name, step in (("mem", ph["mem"]), ("half", ph["half"]), ("last", ph["last"])):
        if step in have:
            out[f"probe_at_{name}"] = _text(span(step))
    best = dict(t.group_by("step").agg(pl.col("value").max()).iter_rows())
    # the first checkpoint from which the best block's probe stays at 0.99 or more
    stays = next((s for s in have if all(best[x] >= 0.99 for x in have if x >= s)), None)
    out["probe_best_high_from"] = _step(stays)
    return out


def _calibration_numbers(store, ph: dict) -> dict[str, Number]:
    if "calibration" not in store.probes():
        return {}
    wide = scalar_table(store.table("calibration"))
    test = {r["step"]: r for r in wide.filter(pl.col("group") == "test").iter_rows(named=True)}
    train = {r["step"]: r for r in wide.filter(pl.col("group") == "train").iter_rows(named=True)}
    first, last = ph["steps"][0], ph["last"]
    peak = max(test, key=lambda s: test[s]["ece"])
    out = {
        "test_ece_first": _num(test[first]["ece"], ".2f"),
        "test_ece_peak": _num(test[peak]["ece"], ".2f"),
        "test_ece_peak_step": _step(peak),
        "test_conf_at_peak": _num(test[peak]["confidence"], ".2f"),
        "test_acc_at_peak": _num(test[peak]["accuracy"], ".2f"),
        "test_auroc_first": _num(test[first]["auroc"], ".2f"),
        "test_ece_last": _num(test[last]["ece"], ".3f"),
        "test_auroc_last": _num(test[last]["auroc"], ".2f"),
    }
    if ph["mem"] is not None:
        out["train_ece_max_after_mem"] = _num(max(train[s]["ece"] for s in train if s >= ph["mem"]), ".2f")
        out["test_auroc_at_mem"] = _num(test[ph["mem"]]["auroc"], ".2f")
    if ph["gen"] is not None:
        out["test_auroc_at_gen"] = _num(test[ph["gen"]]["auroc"], ".2f")
        out["test_ece_at_gen"] = _num(test[ph["gen"]]["ece"], ".3f")
    return out


def _influence_numbers(store, ph: dict) -> dict[str, Number]:
    if "influence" not in store.probes():
        return {}
    tables = influence_tables(store)
    share = same_answer_share(tables, 10)
    means = share.group_by("step").agg(pl.col("top", "bottom", "chance").mean()).sort("step")
    steps = means["step"].to_list()
    trend = ", ".join(f"{top:.2f} at step {s:,} (test accuracy {ph['test'][s]:.2f})"
                      for s, top in means.select("step", "top").iter_rows())
    # The commuted pair: when b + a is a training pair, is it in the top 10 of the query a + b?
    docs = set(tables["documents"]["doc_id"].to_list())
    counts, n = [], 0
    for s in steps:
        mat, q_ids, d_ids = score_matrix(tables["scores"], s)
        top = mat.topk(min(10, len(d_ids)), dim=1).indices.tolist()
        hits, n = 0, 0
        for qi, q in enumerate(q_ids):
            a, b = q.split("+")
            if f"{b}+{a}" in docs:
                n += 1
                hits += f"{b}+{a}" in {d_ids[j] for j in top[qi]}
        counts.append(hits)
    return {
        "influence_steps": _text(", ".join(f"{s:,}" for s in steps)),
        "influence_queries": _step(tables["queries"].height),
        "same_answer_trend": _text(trend),
        "same_answer_chance": _num(means["chance"][0], ".2f"),
        "same_answer_bottom_first": _num(means["bottom"][0], ".2f"),
        "same_answer_bottom_last": _num(means["bottom"][-1], ".2f"),
        "commuted_in_top10": _text(f"{min(counts)} to {max(counts)}" if min(counts) != max(counts) else str(counts[0])),
        "commuted_queries": _step(n),
    }


def _pathway_numbers(store, ph: dict) -> dict[str, Number]:
    if "pathways" not in store.probes():
        return {}
    table = store.table("pathways", final=False)
    means = table.filter(pl.col("sample_id").is_null() & pl.col("layer").is_null())
    dist = _series(means, "distance", "train")
    corr = correlation_table(store.table("pathways", final=True))

    def r(of: str, window: str, method: str) -> Number:
        d = corr.filter((pl.col("group") == "train") & (pl.col("of") == of) & (pl.col("window") == window))
        return _text(_sign(float(d[method][0]))) if not d.is_empty() else _text("undefined")

    out = {
        "distance_first": _num(dist[ph["steps"][0]], ".1f"),
        "distance_last": _num(dist[ph["last"]], ".1f"),
        "distance_pearson_all": r("distance", "all", "pearson"),
        "distance_spearman_all": r("distance", "all", "spearman"),
        "distance_pearson_rise": r("distance", "rise", "pearson"),
        "distance_spearman_rise": r("distance", "rise", "spearman"),
        "consistency_raw_spearman_all": r("consistency_raw_median", "all", "spearman"),
        "consistency_raw_spearman_rise": r("consistency_raw_median", "rise", "spearman"),
    }
    top = max(dist, key=dist.get)
    out |= {"distance_max": _num(dist[top], ".1f"), "distance_max_step": _step(top)}
    after = {s: v for s, v in dist.items() if s > top}
    if after:
        low = min(after, key=after.get)
        out |= {"distance_min_after": _num(after[low], ".1f"), "distance_min_after_step": _step(low)}
    if ph["mem"] is not None:
        out["distance_at_mem"] = _num(dist[ph["mem"]], ".1f")
    return out


def _coherence_numbers(store, ph: dict) -> dict[str, Number]:
    if "coherence" not in store.probes():
        return {}
    table = store.table("coherence", final=False)
    s = coherence_findings.phase_summary(table)
    out = {"coh_m": _step(s["m"]["train"]), "coh_mem_step": _step(s["steps"]["memorized"]),
           "coh_checkpoints": _step(table["step"].n_unique()),
           "coh_gen_step": _step(s["steps"]["generalized"])}
    for where, prefix in (("blocks", "coh"), ("all", "coh_all")):
        w = s[where]
        for name, at in w["at"].items():
            out |= {f"{prefix}_{name}_{k}": _num(v, ".1f") for k, v in at.items()}
        for name, ex in w["extremes"].items():
            out[f"{prefix}_{name}_plateau"] = _num(ex["plateau_mean"], ".2f")
            out[f"{prefix}_{name}_max"] = _num(ex["max"]["value"], ".1f")
            out[f"{prefix}_{name}_max_step"] = _step(ex["max"]["step"])
        ex = w["extremes"]
        out[f"{prefix}_control_vs_train"] = _text(
            "above" if ex["random"]["plateau_mean"] > ex["train"]["plateau_mean"] else "below")
        low = w["extremes"]["train"]["min_until_memorized"]
        out |= {f"{prefix}_train_low": _num(low["value"], ".2f"), f"{prefix}_train_low_step": _step(low["step"])}
        for name, r in w["correlation_with_test_accuracy"].items():
            out[f"{prefix}_{name}_spearman"] = _text(_sign(r["spearman"]))
    return out


def _representation_numbers(store, ph: dict) -> dict[str, Number]:
    if "representations" not in store.probes():
        return {}
    s = representation_findings.phase_summary(store.table("representations", final=False),
                                              store.table("representations", final=True))
    out = {"rep_k": _step((store.options("representations") or {}).get("k", 10))}
    phases = ("first", "memorized", "half", "generalized", "last")
    purity, last = s["test_purity"], s["layers"][-1]
    out |= {f"rep_purity_{k}": _num(purity[last][k], ".2f") for k in (*phases, "chance")}
    out |= {f"rep_purity_{m}": _text(_sign(purity[last][m])) for m in ("pearson", "spearman")}
    out["rep_last_block"] = _step(last)
    for k in phases:  # over the blocks, by block number: the shape may change with the run
        out[f"rep_purity_blocks_{k}"] = _text(", ".join(f"L{layer} {p[k]:.2f}" for layer, p in purity.items()))
    fo = s.get("fourier")
    if fo:
        out |= {"rep_fourier_layer": _step(fo["layer"]), "rep_fourier_n": _step(fo["n_frequencies"]),
                "rep_fourier_shuffled": _num(fo["shuffled"], ".1f"),
                "rep_fourier_keys": _text(", ".join(f"{k} ({v:.2f})" for k, v in fo["key_frequencies"])),
                "rep_fourier_blocks_last": _text(", ".join(f"L{layer} {v:.1f}" for layer, v
                                                           in fo["layers_effective_last"].items()))}
        out |= {f"rep_fourier_{k}": _num(v, ".1f") for k, v in fo["effective"].items()}
        out |= {f"rep_fourier_test_{k}": _num(v, ".1f") for k, v in fo["test_effective"].items()}
        if "layout_angle" in fo:
            for k, (step, r, freq) in fo["layout_angle"].items():
                out |= {f"rep_angle_{k}": _num(r, ".2f"), f"rep_angle_{k}_step": _step(step),
                        f"rep_angle_{k}_k": _step(freq)}
    return out


def grokking_numbers(run, store=None) -> dict[str, Number]:
    """Every quoted number of a measured built-in grokking run (``workbench demo`` measures all it needs);
    families that are not measured are left out."""
    store = store if store is not None else run.store
    ph = phases(store)
    out = _basic_numbers(run, ph)
    for part in (_routing_numbers, _probe_numbers, _calibration_numbers, _influence_numbers, _pathway_numbers,
                 _coherence_numbers, _representation_numbers):
        out |= part(store, ph)
    return out


#: Numbers that depend on the machine (quoted with the machine's description; :func:`check` skips them).
MACHINE_DEPENDENT = frozenset({"train_seconds"})


# --- several runs --------------------------------------------------------------------------------------------------
def combine(runs: Sequence[dict[str, Number]]) -> dict[str, Number]:
    """The numbers of several runs of the same recipe (seeds, thread counts): where they agree, the number;
    where numeric values differ, the range ``low–high`` in the same format; text that differs is an error
    (quote it from one run, or leave it out)."""
    if not runs:
        raise InputError("combine needs the numbers of at least one run")
    out = {}
    for name in runs[0]:
        got = [r[name] for r in runs if name in r]
        texts = {n.text for n in got}
        if len(texts) == 1 or name in MACHINE_DEPENDENT:
            out[name] = got[0] if len(texts) == 1 else _range(got)
        elif all(n.value is not None for n in got):
            out[name] = _range(got)
        else:
            raise InputError(f"the runs disagree on {name!r} ({sorted(texts)}), which is text, not a number")
    return out


def _range(got: Sequence[Number]) -> Number:
    lo, hi = min(got, key=lambda n: n.value), max(got, key=lambda n: n.value)
    return Number(None, f"{lo.text}–{hi.text}")


# --- the README's spans and blocks -----------------------------------------------------------------------------------
def quoted(text: str) -> dict[str, str]:
    """The numbers a text quotes: ``{name: text}`` of its spans and blocks."""
    out = {m["name"]: m["text"] for m in SPAN.finditer(text)}
    out |= {m["name"]: m["text"].strip("\n") for m in BLOCK.finditer(text)}
    return out


def fill(text: str, numbers: dict[str, Number]) -> str:
    """``text`` with every span and block rewritten from ``numbers``; a name it quotes that ``numbers`` lacks is
    an error (a number that can no longer be computed must leave the text, not stay stale)."""
    missing = sorted(set(quoted(text)) - set(numbers))
    if missing:
        raise InputError(f"the text quotes numbers the run does not give: {missing}; measure them or remove them")
    text = SPAN.sub(lambda m: f"<!--n:{m['name']}-->{numbers[m['name']].text}<!--/n-->", text)
    return BLOCK.sub(lambda m: f"<!--numbers:{m['name']}-->\n{numbers[m['name']].text}\n<!--/numbers-->", text)


def _parse(text: str) -> float | None:
    try:
        return float(text.replace(",", "").replace("−", "-"))
    except ValueError:
        return None


def _matches(quoted_text: str, number: Number) -> bool:
    quoted_text = " ".join(quoted_text.split())  # a span may be wrapped over lines
    if quoted_text == " ".join(number.text.split()):
        return True
    m = RANGE.match(quoted_text.replace("−", "-"))
    value = number.value if number.value is not None else _parse(number.text)
    if m and value is not None:
        lo, hi = _parse(m["lo"]), _parse(m["hi"])
        mine = _parse(number.text)  # compare at the quoted precision
        return lo is not None and hi is not None and mine is not None and lo <= mine <= hi
    return False


def check(text: str, numbers: dict[str, Number]) -> list[str]:
    """Where ``text`` quotes a number other than ``numbers`` give (outside a quoted range), one line each;
    machine-dependent numbers are not compared."""
    problems = []
    for name, got in quoted(text).items():
        if name in MACHINE_DEPENDENT:
            continue
        if name not in numbers:
            problems.append(f"{name}: quoted as {got!r}, but the run does not give it")
        elif not _matches(got, numbers[name]):
            problems.append(f"{name}: quoted {got!r}, the run gives {numbers[name].text!r}")
    return problems


def as_json(numbers: dict[str, Number]) -> dict:
    return {k: {"value": v.value, "text": v.text} for k, v in sorted(numbers.items())}


def markdown(numbers: dict[str, Number], names: Iterable[str] | None = None) -> str:
    """The numbers as a markdown list (``workbench numbers RUN``'s output)."""
    lines = []
    for name in names or sorted(numbers):
        text = numbers[name].text
        lines.append(f"- `{name}`:" + ("\n\n" + text + "\n" if "\n" in text else f" {text}"))
    return "\n".join(lines)


__all__ = ["GENERALIZED", "MACHINE_DEPENDENT", "MEMORIZED", "Number", "as_json", "check", "combine", "fill",
           "grokking_numbers", "markdown", "phases", "quoted"]
