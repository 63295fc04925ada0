"""What the ``coherence`` table says about a run's phases: read from the stored table, so the numbers of a
report, a notebook or the README regenerate when the run changes."""

from __future__ import annotations

import math

import polars as pl

from workbench.errors import InputError
from workbench.stats import correlation

#: A run has memorized once the train accuracy reaches this, and generalized once the test accuracy does.
MEMORIZED, GENERALIZED = 0.99, 0.95
#: Where the gradients are taken: every tracked matrix, or those inside the blocks (the output head left out).
WHERE = ("all", "blocks")


def overall(table: pl.DataFrame, metric: str, group: str, labels: str = "true") -> pl.DataFrame:
    """(step, value) of an overall metric of one set, by step."""
    d = table.filter((pl.col("metric") == metric) & (pl.col("group") == group) & (pl.col("labels") == labels)
                     & pl.col("layer").is_null() & pl.col("module").is_null())
    return d.select("step", "value").sort("step")


def blocks(table: pl.DataFrame, group: str, labels: str = "true") -> pl.DataFrame:
    """(step, value): the m-coherence of one set over the matrices inside the blocks together, from the per-block
    rows (m-coherence_l · E‖g_l‖² summed over blocks, over Σ E‖g_l‖²)."""
    d = table.filter((pl.col("group") == group) & (pl.col("labels") == labels) & pl.col("layer").is_not_null()
                     & pl.col("module").is_null() & pl.col("metric").is_in(["m_coherence", "mean_norm_sq"]))
    if d.is_empty():
        return pl.DataFrame(schema={"step": pl.Int64, "value": pl.Float64})
    w = d.pivot(on="metric", index=["step", "layer"], values="value")
    return (w.group_by("step").agg(value=(pl.col("m_coherence") * pl.col("mean_norm_sq")).sum()
                                   / pl.col("mean_norm_sq").sum()).sort("step"))


def m_coherence(table: pl.DataFrame, group: str, labels: str = "true", where: str = "all") -> pl.DataFrame:
    """(step, value): m-coherence of one set over every tracked matrix (``where="all"``) or the blocks'."""
    if where not in WHERE:
        raise InputError(f"where must be one of {WHERE}, not {where!r}")
    return overall(table, "m_coherence", group, labels) if where == "all" else blocks(table, group, labels)


def first_step(table: pl.DataFrame, group: str, level: float) -> int | None:
    """The first step at which ``group``'s accuracy (true labels) reaches ``level``, or None."""
    d = overall(table, "accuracy", group).filter(pl.col("value") >= level)
    return int(d["step"][0]) if not d.is_empty() else None


def _at(series: pl.DataFrame, step: int | None) -> float:
    if step is None:
        return math.nan
    d = series.filter(pl.col("step") == step)
    return float(d["value"][0]) if not d.is_empty() else math.nan


def phase_summary(table: pl.DataFrame, train: str = "train", test: str = "test") -> dict:
    """m-coherence of the train set, the held-out set and the random-label control (over every tracked matrix,
    and over the blocks' matrices only) at the run's phases: the first checkpoint, when the run memorized
    (train accuracy first ≥ 0.99) and generalized (test accuracy first ≥ 0.95), and the last; each set's
    lowest and highest value and the mean over the plateau between memorization and generalization; and the
    Pearson and Spearman correlations of each set's m-coherence with the test accuracy from memorization on."""
    groups = set(table["group"].unique().to_list())
    if not {train, test} <= groups:
        raise InputError(f"the coherence table has groups {sorted(groups)}; the summary needs {train!r} and {test!r}")
    steps = sorted(table["step"].unique().to_list())
    at = {"first": steps[0], "memorized": first_step(table, train, MEMORIZED),
          "generalized": first_step(table, test, GENERALIZED), "last": steps[-1]}
    test_acc = overall(table, "accuracy", test)
    sets = {"train": (train, "true"), "test": (test, "true"), "random": (train, "random")}
    out: dict = {"steps": at, "m": {k: _at(overall(table, "n", g, lab), steps[-1]) for k, (g, lab) in sets.items()},
                 "accuracy": {k: {g: _at(overall(table, "accuracy", g), s) for g in (train, test)} for k, s in at.items()}}
    for where in WHERE:
        values, extremes, correlations = {}, {}, {}
        for name, (g, labels) in sets.items():
            s = m_coherence(table, g, labels, where)
            if s.is_empty():
                continue
            values[name] = {k: _at(s, step) for k, step in at.items()}
            lo, hi = s.sort("value").row(0), s.sort("value").row(-1)
            mem, gen = at["memorized"], at["generalized"]
            plateau = s.filter((pl.col("step") >= (mem if mem is not None else steps[-1]))
                               & (pl.col("step") < (gen if gen is not None else steps[-1] + 1)))
            before = s.filter(pl.col("step") <= (mem if mem is not None else steps[-1])).sort("value")
            extremes[name] = {"min": {"step": int(lo[0]), "value": float(lo[1])},
                              "max": {"step": int(hi[0]), "value": float(hi[1])},
                              "min_until_memorized": {"step": int(before["step"][0]), "value": float(before["value"][0])},
                              "plateau_mean": float(plateau["value"].mean()) if plateau.height else math.nan}
            late = s.join(test_acc.rename({"value": "acc"}), on="step").filter(
                pl.col("step") >= (at["memorized"] if at["memorized"] is not None else steps[0]))
            try:
                correlations[name] = {m: correlation(late["value"].to_numpy(), late["acc"].to_numpy(), m)[0]
                                      for m in ("pearson", "spearman")}
            except InputError:  # fewer than 3 checkpoints from memorization on
                correlations[name] = {"pearson": math.nan, "spearman": math.nan}
        out[where] = {"at": values, "extremes": extremes, "correlation_with_test_accuracy": correlations}
    return out


def summary_text(table: pl.DataFrame) -> str:
    """A paragraph of the phase summary, or an empty string when the table has no train/test split."""
    try:
        s = phase_summary(table)
    except InputError:
        return ""
    at = s["steps"]

    def f(x):
        return "n/a" if x != x else f"{x:.1f}"

    b = s["blocks"]["at"] if s["blocks"]["at"] else s["all"]["at"]
    triple = lambda k: f"{f(b['train'][k])}, {f(b['test'][k])} and {f(b['random'][k])}"  # noqa: E731
    parts = [f"at step {at['first']} {triple('first')}"]
    if at["memorized"] is not None:
        parts.append(f"at the first measured checkpoint with the train set memorized (step {at['memorized']}) "
                     f"{triple('memorized')}")
    if at["generalized"] is not None:
        parts.append(f"at the first with the test set learned (step {at['generalized']}) {triple('generalized')}")
    parts.append(f"at the last step ({at['last']}) {triple('last')}")
    where = "the blocks' matrices" if s["blocks"]["at"] else "every tracked matrix"
    text = (f"m-coherence over {where} (1: orthogonal per-example gradients; m = {s['m']['train']:.0f}: identical) "
            "of the train set, the held-out set and the train set with random labels: " + "; ".join(parts) + ".")
    key = "blocks" if s["blocks"]["at"] else "all"
    ex = s[key]["extremes"].get("train")
    if ex:
        low = ex["min_until_memorized"]
        text += (f" While the run memorized, the train set's fell to {low['value']:.2f} (step {low['step']}); "
                 f"between memorization and generalization it averaged {ex['plateau_mean']:.2f}, the held-out set's "
                 f"{s[key]['extremes']['test']['plateau_mean']:.2f} and the control's "
                 f"{s[key]['extremes']['random']['plateau_mean']:.2f}.")
    corr = s[key]["correlation_with_test_accuracy"].get("test")
    if corr and corr["spearman"] == corr["spearman"]:
        text += (f" From memorization on, the held-out set's m-coherence follows test accuracy at Spearman "
                 f"{corr['spearman']:+.2f} (the train set's {s[key]['correlation_with_test_accuracy']['train']['spearman']:+.2f},"
                 f" the control's {s[key]['correlation_with_test_accuracy']['random']['spearman']:+.2f}).")
    return text


__all__ = ["GENERALIZED", "MEMORIZED", "WHERE", "blocks", "first_step", "m_coherence", "overall", "phase_summary",
           "summary_text"]
