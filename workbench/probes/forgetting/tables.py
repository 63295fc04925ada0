"""Tables across forgetting runs: accuracy before and after, forget gap and ratio, the task × task matrix, and
the predictors."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import polars as pl
import torch

from workbench.errors import InputError
from workbench.probes.forgetting.functions import forget_gap, forget_ratio
from workbench.probes.forgetting.measurement import Forgetting
from workbench.runs import Run
from workbench.samples import split_group
from workbench.stats import correlation


def forgetting_results(runs: Mapping[str, Run] | Sequence[Run], chance: float = 0.5) -> pl.DataFrame:
    """One row per forgotten task × measured task × split (``forget``, ``train``, ``test``): accuracy before
    (step 0) and after (last checkpoint), forget gap and forget ratio (the flipped form for flipped runs)."""
    runs = list(runs.values()) if isinstance(runs, Mapping) else list(runs)
    rows = []
    for run in runs:
        opts = run.info.get("forgetting")
        if opts is None:
            raise InputError(f"run {run.name!r} is not a forgetting run (made by forget())")
        t = Forgetting.table(run.store)
        acc = t.filter(pl.col("metric") == "option_accuracy")
        first, last = min(acc["step"]), max(acc["step"])
        for g in acc["group"].unique(maintain_order=True).to_list():
            a0 = acc.filter((pl.col("group") == g) & (pl.col("step") == first))["value"][0]
            a1 = acc.filter((pl.col("group") == g) & (pl.col("step") == last))["value"][0]
            measured, split = split_group(g)
            rows.append({
                "forgot": opts["task"], "task": measured, "split": split, "labels": opts["labels"],
                "acc_ft": a0, "acc_forget": a1, "forget_gap": forget_gap(a1, chance),
                "forget_ratio": forget_ratio(a0, a1, chance, flipped=opts["labels"] == "flipped"),
            })
    return pl.DataFrame(rows)


def matrix(results: pl.DataFrame, split: str = "test", value: str = "forget_ratio") -> tuple[list[str], torch.Tensor]:
    """The task × task matrix from :func:`forgetting_results`: row = task forgotten, column = task measured."""
    d = results.filter(pl.col("split") == split)
    names = sorted(set(d["forgot"].to_list()) | set(d["task"].to_list()))
    m = torch.full((len(names), len(names)), float("nan"), dtype=torch.float64)
    for a, b, v in d.select("forgot", "task", value).iter_rows():
        m[names.index(a), names.index(b)] = v
    return names, m


def predictor_table(runs: Mapping[str, Run] | Sequence[Run], chance: float = 0.5, split: str = "test") -> pl.DataFrame:
    """Per forgotten task: initial relative confidence and representation variability on its forget set (step 0),
    and the forget ratio on the forget set and on ``split``."""
    runs = list(runs.values()) if isinstance(runs, Mapping) else list(runs)
    res = forgetting_results(runs, chance)
    rows = []
    for run in runs:
        task = run.info["forgetting"]["task"]
        t = Forgetting.table(run.store)
        at0 = t.filter((pl.col("step") == t["step"].min()) & (pl.col("group") == f"{task}:forget"))
        get = lambda m: at0.filter(pl.col("metric") == m)["value"]  # noqa: E731
        mine = res.filter((pl.col("forgot") == task) & (pl.col("task") == task))
        ratio = {s: v for s, v in mine.select("split", "forget_ratio").iter_rows()}
        rows.append({"task": task, "confidence": float(get("confidence")[0]),
                     "variability": float(get("variability")[0]) if len(get("variability")) else float("nan"),
                     "forget_ratio_forget": ratio.get("forget", float("nan")),
                     f"forget_ratio_{split}": ratio.get(split, float("nan"))})
    return pl.DataFrame(rows)


def predictor_correlations(predictors: pl.DataFrame, target: str = "forget_ratio_test",
                           method: str = "spearman") -> pl.DataFrame:
    """Correlation of each predictor with the forget ratio across tasks (coefficient and p-value)."""
    rows = []
    for p in ("confidence", "variability"):
        r, pv = correlation(predictors[p].to_numpy(), predictors[target].to_numpy(), method)
        rows.append({"predictor": p, "target": target, "method": method, "r": r, "p_value": pv,
                     "n_tasks": predictors.height})
    return pl.DataFrame(rows)


__all__ = ["forgetting_results", "matrix", "predictor_correlations", "predictor_table"]
