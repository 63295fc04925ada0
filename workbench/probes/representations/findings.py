"""What the ``representations`` tables say about a run's phases: read from the stored tables, so the numbers of
a report, a notebook or the README regenerate when the run changes."""

from __future__ import annotations

import math

import polars as pl

from workbench.errors import InputError
from workbench.samples import OVERALL
from workbench.stats import correlation

#: A run has memorized once the train accuracy reaches this, and generalized once the test accuracy does.
MEMORIZED, GENERALIZED = 0.99, 0.95


def group_series(table: pl.DataFrame, metric: str, group: str, layer: int | None) -> pl.DataFrame:
    """(step, value) of a per-group metric at one block (``layer`` None: the rows without a block)."""
    d = table.filter((pl.col("metric") == metric) & (pl.col("group") == group) & pl.col("sample_id").is_null())
    d = d.filter(pl.col("layer") == layer) if layer is not None else d.filter(pl.col("layer").is_null())
    return d.select("step", "value").sort("step")


def _at(series: pl.DataFrame, step: int | None) -> float:
    if step is None:
        return math.nan
    d = series.filter(pl.col("step") == step)
    return float(d["value"][0]) if not d.is_empty() else math.nan


def _first(series: pl.DataFrame, level: float, after: int | None = None) -> int | None:
    d = series.filter((pl.col("value") >= level) & (pl.col("step") > (after if after is not None else -1)))
    return int(d["step"][0]) if not d.is_empty() else None


def cyclic_layer(table: pl.DataFrame) -> int | None:
    """The block whose answer means are spread over the fewest Fourier frequencies at the last checkpoint (the
    clearest circle), or None without cyclic labels."""
    d = table.filter((pl.col("metric") == "fourier_frequencies") & (pl.col("group") == OVERALL)
                     & pl.col("sample_id").is_null())
    if d.is_empty():
        return None
    last = d.filter(pl.col("step") == d["step"].max()).sort("value", "layer")
    return int(last["layer"][0])


def key_frequencies(table: pl.DataFrame, step: int, layer: int, group: str = OVERALL, share: float = 0.9) -> list[tuple[int, float]]:
    """The strongest frequencies of the answer means at ``step`` and ``layer`` that together hold ``share`` of
    their variance: [(frequency, share)], strongest first."""
    d = table.filter((pl.col("metric") == "fourier_power") & (pl.col("group") == group) & (pl.col("step") == step)
                     & (pl.col("layer") == layer)).sort("value", descending=True)
    out, total = [], 0.0
    for f, v in d.select("frequency", "value").iter_rows():
        if total >= share:
            break
        out.append((int(f), float(v)))
        total += v
    return out


def phase_summary(table: pl.DataFrame, final: pl.DataFrame | None = None, train: str = "train",
                  test: str = "test") -> dict:
    """Purity of the held-out group at the last block, and (cyclic labels) the Fourier structure of the answer
    means at the block where it is clearest, at the run's phases: the first checkpoint, memorized (train
    accuracy first ≥ 0.99), half (test accuracy first ≥ 0.5 after it), generalized (test accuracy first ≥ 0.95
    after it) and the last; with the correlations of purity with test accuracy across checkpoints."""
    groups = set(table["group"].unique().to_list())
    if not {train, test} <= groups:
        raise InputError(f"the representations table has groups {sorted(groups)}; the summary needs {train!r} "
                         f"and {test!r}")
    layers = sorted(table.filter(pl.col("metric") == "purity")["layer"].drop_nulls().unique().to_list())
    steps = sorted(table["step"].unique().to_list())
    train_acc, test_acc = group_series(table, "accuracy", train, None), group_series(table, "accuracy", test, None)
    mem = _first(train_acc, MEMORIZED)
    at = {"first": steps[0], "memorized": mem, "half": _first(test_acc, 0.5, mem),
          "generalized": _first(test_acc, GENERALIZED, mem), "last": steps[-1]}
    out: dict = {"steps": at, "layers": layers, "test_accuracy": {k: _at(test_acc, s) for k, s in at.items()}}
    purity = {}
    for layer in layers:
        s = group_series(table, "purity", test, layer)
        joined = s.join(test_acc.rename({"value": "acc"}), on="step")
        purity[layer] = {k: _at(s, st) for k, st in at.items()} | {
            "chance": _at(group_series(table, "purity_chance", test, layer), steps[-1]),
            "pearson": correlation(joined["value"].to_numpy(), joined["acc"].to_numpy(), "pearson")[0]
            if joined.height >= 3 else math.nan,
            "spearman": correlation(joined["value"].to_numpy(), joined["acc"].to_numpy(), "spearman")[0]
            if joined.height >= 3 else math.nan}
    out["test_purity"] = purity
    circle = cyclic_layer(table)
    if circle is not None:
        eff = group_series(table, "fourier_frequencies", OVERALL, circle)
        shuffled = group_series(table, "fourier_frequencies_shuffled", OVERALL, circle)
        test_eff = group_series(table, "fourier_frequencies", test, circle)
        out["fourier"] = {
            "layer": circle, "n_frequencies": int(table.filter(pl.col("metric") == "fourier_power")["frequency"].max()),
            "effective": {k: _at(eff, s) for k, s in at.items()},
            "test_effective": {k: _at(test_eff, s) for k, s in at.items()},
            "shuffled": _at(shuffled, steps[-1]),
            "key_frequencies": key_frequencies(table, steps[-1], circle),
            "layers_effective_last": {layer: _at(group_series(table, "fourier_frequencies", OVERALL, layer), steps[-1])
                                      for layer in layers}}
    if final is not None and not final.is_empty() and circle is not None:
        ang = final.filter((pl.col("metric") == "angle_agreement") & (pl.col("group") == OVERALL)
                           & (pl.col("layer") == circle)).sort("step")
        if not ang.is_empty():
            out["fourier"]["layout_angle"] = {
                "first": (int(ang["step"][0]), float(ang["value"][0]), int(ang["frequency"][0])),
                "last": (int(ang["step"][-1]), float(ang["value"][-1]), int(ang["frequency"][-1]))}
    return out


def summary_text(table: pl.DataFrame, final: pl.DataFrame | None = None) -> str:
    """A paragraph of the phase summary (empty without a train/test split)."""
    try:
        s = phase_summary(table, final)
    except InputError:
        return ""
    at, last = s["steps"], s["layers"][-1]
    p = s["test_purity"][last]

    def f(x, fmt=".2f"):
        return "n/a" if x != x else format(x, fmt)

    marks = [(k, at[k]) for k in ("first", "memorized", "half", "generalized", "last") if at[k] is not None]
    text = (f"Held-out samples' neighbourhood answer purity after block {last} (chance {f(p['chance'])}): "
            + ", ".join(f"{f(p[k])} at step {st} (test accuracy {f(s['test_accuracy'][k])})" for k, st in marks)
            + f"; across checkpoints it follows test accuracy at Pearson {f(p['pearson'], '+.2f')} (Spearman "
              f"{f(p['spearman'], '+.2f')}).")
    fo = s.get("fourier")
    if fo:
        keys = ", ".join(f"{k} ({v:.2f})" for k, v in fo["key_frequencies"])
        text += (f" The answer means after block {fo['layer']} spread their variance over "
                 + ", ".join(f"{f(fo['effective'][k], '.1f')}" for k, _ in marks)
                 + f" Fourier frequencies (effective number, of {fo['n_frequencies']}; {f(fo['shuffled'], '.1f')} with "
                   f"the answers' order shuffled) at those steps: at the end the frequencies {keys} hold most of it")
        last_eff = fo["effective"]["last"]
        # a third of the shuffled level or less: the variance sits on a few frequencies, not on noise
        text += (", so the answers lie on a few circles, as in the modular-addition solution."
                 if last_eff <= fo["shuffled"] / 3 else ", too many for a clear circular structure yet.")
        if "layout_angle" in fo:
            (s0, r0, _), (s1, r1, k1) = fo["layout_angle"]["first"], fo["layout_angle"]["last"]
            text += (f" In the 2-D layout of that block the answers go round in order (angle agreement, 1 = a "
                     f"perfect frequency-k walk) {r0:.2f} at step {s0} and {r1:.2f} (k = {k1}) at step {s1}.")
    return text


__all__ = ["GENERALIZED", "MEMORIZED", "cyclic_layer", "group_series", "key_frequencies", "phase_summary",
           "summary_text"]
