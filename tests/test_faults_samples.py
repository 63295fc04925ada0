"""Faults in samples: ids that are not integers, negative or outside the vocabulary, targets with another
ignore value than -100, samples longer than the model's positions, and the reserved overall group."""

import numpy as np
import polars as pl
import pytest
import torch

import workbench
from tests.tiny_models import random_tokens, tiny_model
from workbench import CaptureSpec, LossAccuracy, SampleSet, capture, measure
from workbench.errors import InputError, StoreError, TokenizerMismatchError
from workbench.samples import DEFAULT_GROUP, IGNORE, OVERALL, read_samples

# Tiny models: a second thread only adds synchronization (and contention on a shared machine).
pytestmark = pytest.mark.usefixtures("one_thread")


def one(x, y=None, group="g"):
    return SampleSet(ids=["s"], groups=[group], input_ids=[x], targets=[y if y is not None else [IGNORE] * len(x)])


# --- at the boundary: the set itself -----------------------------------------------------------------------------
@pytest.mark.parametrize("bad, what", [([3, 4.0, 5], "4.0 \\(float\\) at position 1"),
                                       ([3, True, 5], "True \\(bool\\) at position 1"),
                                       ([3, np.float32(4), 5], "np.float32\\(4.0\\) \\(float32\\)")])
def test_token_ids_that_are_not_integers_are_refused(bad, what):
    with pytest.raises(InputError, match=f"sample 's' hold {what}.*integers"):
        one(bad)
    with pytest.raises(InputError, match="targets of sample 's'"):
        one([3, 4, 5], [IGNORE, bad[1], IGNORE])


def test_integer_arrays_are_taken_and_float_arrays_refused():
    s = SampleSet(ids=[np.int64(0)], groups=["g"], input_ids=[np.array([3, 4], dtype=np.int32)],
                  targets=[torch.tensor([4, IGNORE])])
    assert s.input_ids == [[3, 4]] and type(s.input_ids[0][0]) is int and s.targets == [[4, IGNORE]]
    assert s.ids == ["0"]
    with pytest.raises(InputError, match="float32 array"):
        one(torch.tensor([3.0, 4.0]))
    assert SampleSet.from_token_lists([np.array([5, 6, 7])]).input_ids == [[5, 6, 7]]


def test_negative_ids_and_other_ignore_values_are_refused():
    with pytest.raises(InputError, match="negative input id \\(-3\\)"):
        one([1, -3, 2])
    with pytest.raises(InputError, match="the target -1.*-100"):
        one([1, 2, 3], [2, 3, -1])
    assert one([1, 2, 3], [2, 3, IGNORE]).targets == [[2, 3, IGNORE]]


def test_the_overall_group_name_is_reserved():
    for name in (OVERALL, f"{OVERALL}:train"):
        with pytest.raises(InputError, match=f"group '{name}' uses the reserved name 'all'"):
            one([1, 2], group=name)
    assert SampleSet.from_token_lists([[1, 2, 3]]).group_names == [DEFAULT_GROUP] != [OVERALL]


def test_a_samples_file_named_like_the_overall_group_gets_the_default_group(tmp_path):
    f = tmp_path / "all.jsonl"
    f.write_text('{"text": "a b"}\n{"text": "b a", "group": "x"}\n')
    samples, _ = read_samples(f, lambda text, **kw: {"input_ids": [3 + ord(c) % 5 for c in text.split()]})
    assert samples.groups == [DEFAULT_GROUP, "x"]


def test_duplicate_ids_are_named():
    with pytest.raises(InputError, match="'a' is given twice"):
        SampleSet(ids=["a", "b", "a"], groups=["g"] * 3, input_ids=[[1]] * 3, targets=[[IGNORE]] * 3)


# --- against the model ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")  # 96 tokens, 64 positions (rotary: it would run past them without an error)


def test_ids_outside_the_vocabulary_are_refused_naming_the_sample(llama):
    with pytest.raises(TokenizerMismatchError, match="reach 96 \\(first in sample 's'\\).*vocabulary has 96"):
        capture(llama, one([3, 96, 4]))
    with pytest.raises(TokenizerMismatchError, match="reach 200"):  # a target: cross-entropy would fail inside
        capture(llama, one([3, 4, 5], [4, 200, IGNORE]))


def test_samples_longer_than_the_models_positions_are_refused_or_cut_when_asked(llama):
    long = SampleSet(ids=["short", "long"], groups=["g", "g"], input_ids=[[5] * 10, list(range(3, 73))],
                     targets=[[5] * 9 + [IGNORE], list(range(4, 74))])
    with pytest.raises(InputError, match="1 sample\\(s\\) are longer than the model's 64 positions: 'long' \\(70 "
                                         "tokens\\).*truncate=True"):
        capture(llama, long)
    cut = capture(llama, long, truncate=True)
    by_hand = capture(llama, SampleSet(ids=long.ids, groups=long.groups, input_ids=[[5] * 10, list(range(3, 67))],
                                       targets=[[5] * 9 + [IGNORE], list(range(4, 68))]))
    torch.testing.assert_close(cut.loss, by_hand.loss)
    assert cut.n_tokens.tolist() == [10, 64]


def test_the_built_in_model_refuses_long_samples_in_a_measurement(tiny_copy):
    n_ctx = tiny_copy.checkpoint(0).load().config.n_ctx
    s = SampleSet(ids=["x"], groups=["g"], input_ids=[[1] * (n_ctx + 1)], targets=[[1] * (n_ctx + 1)])
    with pytest.raises(InputError, match=f"longer than the model's {n_ctx} positions"):
        measure(tiny_copy, [LossAccuracy()], samples=s, steps=[0], progress=False)
    assert not tiny_copy.store.steps("basic")  # nothing half-measured is kept
    store = measure(tiny_copy, [LossAccuracy()], samples=s, steps=[0], truncate=True, progress=False)
    assert store.fingerprint("basic")["truncate"] is True and store.steps("basic") == [0]


# --- one row per key -----------------------------------------------------------------------------------------------
def test_samples_without_groups_give_one_row_per_key(tiny_copy):
    flat = SampleSet.from_token_lists(tiny_copy.samples.input_ids[:20])
    store = measure(tiny_copy, [LossAccuracy(per_sample=False)], samples=flat, steps=[0], progress=False)
    t = store.table("basic")
    assert sorted(t["group"].unique().to_list()) == [OVERALL, DEFAULT_GROUP]
    assert t.group_by("metric", "group").len()["len"].max() == 1
    same = t.pivot(on="group", index="metric", values="value")
    assert same[OVERALL].to_list() == pytest.approx(same[DEFAULT_GROUP].to_list())  # one group: the same means


def test_a_table_with_two_rows_under_one_key_is_not_written(tmp_path):
    store = workbench.Store(tmp_path, run="r")
    rows = pl.DataFrame({"metric": ["loss", "loss"], "group": ["all", "all"], "value": [1.0, 2.0]})
    with pytest.raises(StoreError, match="2 rows share their keys.*'group': 'all'.*Nothing was written"):
        store.write("basic", 0, rows)
    assert not (tmp_path / "basic").exists() or not list((tmp_path / "basic").iterdir())
