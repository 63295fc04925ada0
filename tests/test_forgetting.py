"""Forgetting: the measures on hand cases, the choice-task plumbing, and forget() making a Run the other
probes accept."""

import numpy as np
import polars as pl
import pytest
import torch

import workbench
from workbench.errors import InputError
from workbench.probes import forgetting as fg
from workbench.toys import tasks as toy_tasks
from workbench.models.toy import ToyConfig, ToyMoETransformer


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = ToyConfig(vocab_size=toy_tasks.TASK_BASE + 5, n_ctx=11, d_model=16, n_heads=2, n_layers=2, n_experts=2,
                    top_k=1, d_expert=16, layer_norm=True)
    return ToyMoETransformer(cfg)


# --- the measures ------------------------------------------------------------------------------------------------
def test_forget_gap_and_ratio_by_hand():
    assert fg.forget_gap(0.75) == pytest.approx(0.25)
    assert fg.forget_gap(0.4, chance=0.25) == pytest.approx(0.15)
    assert fg.forget_ratio(0.9, 0.5) == pytest.approx(1.0)  # down to chance
    assert fg.forget_ratio(0.9, 0.7) == pytest.approx(0.5)  # half the margin gone
    assert fg.forget_ratio(0.9, 0.9) == pytest.approx(0.0)  # nothing forgotten
    assert fg.forget_ratio(0.9, 0.3) == pytest.approx(1.5)  # below chance
    assert fg.forget_ratio(0.8, 0.4, chance=0.25) == pytest.approx(0.4 / 0.55)
    # flipped labels: complete forgetting is accuracy 0, chance is half way
    assert fg.forget_ratio(0.9, 0.0, flipped=True) == pytest.approx(1.0)
    assert fg.forget_ratio(0.9, 0.45, flipped=True) == pytest.approx(0.5)
    assert np.isnan(fg.forget_ratio(0.5, 0.4))  # a model at chance has nothing to forget
    r = fg.forget_ratio(torch.tensor([0.9, 0.8]), torch.tensor([0.5, 0.8]))
    assert isinstance(r, torch.Tensor) and torch.allclose(r, torch.tensor([1.0, 0.0], dtype=torch.float64))
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        fg.forget_ratio(1.2, 0.5)
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        fg.forget_gap(float("nan"))


def test_forget_matrix_by_hand():
    acc_ft = [0.9, 0.7]
    after = [[0.5, 0.7], [0.8, 0.6]]  # forgot task 0: task 0 to chance, task 1 untouched; forgot task 1: ...
    m = fg.forget_matrix(acc_ft, after)
    torch.testing.assert_close(m, torch.tensor([[1.0, 0.0], [0.25, 0.5]], dtype=torch.float64))
    with pytest.raises(InputError, match=r"\[T, T\]"):
        fg.forget_matrix(acc_ft, [[0.5, 0.5]])


def test_predictors_by_hand():
    conf = fg.relative_confidence(torch.tensor([[0.6, 0.2], [0.1, 0.3], [0.05, 0.05]]), [0, 1, 0])
    torch.testing.assert_close(conf, torch.tensor([0.75, 0.75, 0.5], dtype=torch.float64))
    h = torch.randn(50, 7, generator=torch.Generator().manual_seed(0)) * torch.arange(1, 8)
    assert fg.representation_variability(h) == pytest.approx(float(np.trace(np.cov(h.numpy().T))), rel=1e-6)
    assert fg.correlation([1, 2, 3, 4], [0.1, 0.5, 0.6, 2.0]) == pytest.approx((1.0, 0.0), abs=1e-12)
    r, p = fg.correlation([1, 2, 3, 4, 5], [2, 4, 6, 8, 11], method="pearson")
    assert r == pytest.approx(float(np.corrcoef([1, 2, 3, 4, 5], [2, 4, 6, 8, 11])[0, 1]))
    with pytest.raises(InputError, match="at least 3"):
        fg.correlation([1, 2], [3, 4])
    with pytest.raises(InputError, match="labels must index"):
        fg.relative_confidence(torch.ones(2, 2), [0, 2])


# --- choice tasks ---------------------------------------------------------------------------------------------
def test_choice_task_checks_answers_and_relabels():
    task = toy_tasks.make_task("compare", 1, n_train=30, n_test=10)
    assert task.labels.shape == (40,) and set(task.labels.tolist()) == {0, 1}
    flipped = task.relabeled(1 - task.labels)
    answers = torch.tensor([t[-1] for t in flipped.targets])
    assert torch.equal(answers, task.options[torch.arange(40), 1 - task.labels])
    samples, options = task.prefixed("test")
    assert samples.group_names == ["compare:test"] and samples.ids[0] == "compare/30" and options.shape == (10, 2)
    bad = task.samples.select(range(3))
    with pytest.raises(InputError, match="exactly one of its options"):
        fg.ChoiceTask("x", bad, torch.tensor([[1, 2]] * 3))
    two = workbench.SampleSet(ids=["a"], groups=["train"], input_ids=[[1, 2, 3]], targets=[[5, -100, 6]])
    with pytest.raises(InputError, match="single-token answers"):
        fg.ChoiceTask("y", two, torch.tensor([[5, 6]]))
    assert fg.split_group("facts:test") == ("facts", "test") and fg.split_group("train") == ("all", "train")


def test_option_probs_are_the_models_softmax():
    task = toy_tasks.make_task("match", 4, n_train=12, n_test=4)
    model = _tiny_model().eval()
    probs, hidden = fg.option_probs(model, task.samples, task.options, hidden_layers=(1,), device="cpu")
    x, _, mask = task.samples.padded(range(len(task)))
    with torch.no_grad():
        p = torch.softmax(model(x).logits[torch.arange(len(task)), mask.sum(1) - 1], -1)
    torch.testing.assert_close(probs, p[:, [toy_tasks.OPT_A, toy_tasks.OPT_B]].double(), atol=1e-5, rtol=1e-4)
    assert hidden[1].shape == (16, 16)


# --- the protocol ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_forgetting(tmp_path_factory):
    """An untrained toy model made to forget 'facts' (fast; the numbers are not the point here)."""
    model = _tiny_model()
    facts = toy_tasks.make_task("facts", 2, n_train=60, n_test=20)
    other = toy_tasks.make_task("compare", 1, n_train=30, n_test=20)
    out = tmp_path_factory.mktemp("forget") / "facts"
    run = fg.forget(model, facts, out, n=40, epochs=2, batch_size=16, n_checkpoints=3, eval_tasks=[other],
                    variability_layer=-1, device="cpu", progress=False)
    return model, facts, run


def test_forget_saves_a_run_of_checkpoints(tiny_forgetting):
    model, facts, run = tiny_forgetting
    assert run.steps == [0, 3, 6]  # 2 epochs of ceil(40 / 16) steps
    assert run.info["forgetting"]["lr"] == 1e-4 and run.info["forgetting"]["n"] == 40
    assert run.samples.group_names == ["facts:forget", "facts:train", "facts:test", "compare:train", "compare:test"]
    assert len(run.samples.group("facts:forget")) == 40 and len(run.samples.group("facts:train")) == 20
    # step 0 is the model before forgetting; the source model itself is left alone
    first = run.checkpoint(0).load()
    for (k, a), b in zip(first.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k
    last = run.checkpoint(6).load()
    assert not torch.equal(last.embed_tokens.weight, model.embed_tokens.weight)
    labels = pl.read_parquet(run.root / "forget_set.parquet")
    same = (labels["label"] == labels["true_label"]).mean()
    assert 0.25 < same < 0.75  # random labels: about half agree with the truth


def test_forgetting_run_is_a_run_the_other_probes_accept(tiny_forgetting):
    from workbench.probes.linear.measurement import LinearProbeAccuracy

    _, _, run = tiny_forgetting
    store = workbench.measure(run, [workbench.LossAccuracy(per_sample=False), LinearProbeAccuracy()], progress=False)
    basic = store.table("basic")
    assert sorted(basic["step"].unique().to_list()) == run.steps
    assert set(basic["group"].unique().to_list()) >= {"facts:forget", "facts:test", "compare:test"}
    probes = store.table("probes")
    assert set(probes.filter(pl.col("layer").is_not_null())["layer"].unique().to_list()) == {0, 1}
    assert set(probes["group"].unique().to_list()) == {"facts", "compare"}


def test_forgetting_table_and_predictors(tiny_forgetting):
    _, _, run = tiny_forgetting
    t = run.store.table("forgetting")
    acc = t.filter(pl.col("metric") == "option_accuracy")
    assert acc.height == 3 * 5  # every checkpoint, every group
    assert t.filter(pl.col("metric") == "variability")["layer"].unique().to_list() == [1]  # -1 of 2 blocks
    res = fg.forgetting_results([run])
    row = res.filter((pl.col("task") == "facts") & (pl.col("split") == "forget")).row(0, named=True)
    assert row["forget_ratio"] == pytest.approx(fg.forget_ratio(row["acc_ft"], row["acc_forget"]), nan_ok=True)
    assert row["forget_gap"] == pytest.approx(row["acc_forget"] - 0.5)
    names, m = fg.matrix(res)
    assert names == ["compare", "facts"] and m.shape == (2, 2) and torch.isnan(m[0]).all()  # compare not forgotten
    pred = fg.predictor_table([run])
    assert pred.columns == ["task", "confidence", "variability", "forget_ratio_forget", "forget_ratio_test"]
    assert 0 <= pred["confidence"][0] <= 1 and pred["variability"][0] > 0


def test_flipped_labels_are_all_wrong(tmp_path):
    model = _tiny_model(1)
    task = toy_tasks.make_task("sentiment", 3, n_train=20, n_test=8)
    run = fg.forget(model, task, tmp_path / "f", n=16, labels="flipped", epochs=1, batch_size=8, n_checkpoints=2,
                    variability_layer=-1, device="cpu", progress=False)
    labels = pl.read_parquet(run.root / "forget_set.parquet")
    assert (labels["label"] != labels["true_label"]).all()
    assert run.info["forgetting"]["labels"] == "flipped"


def test_forget_bad_input(tmp_path):
    model = _tiny_model()
    task = toy_tasks.make_task("match", 4, n_train=10, n_test=5)
    with pytest.raises(InputError, match="fewer than n=1000"):
        fg.forget(model, task, tmp_path / "a", progress=False)
    with pytest.raises(InputError, match="labels must be one of"):
        fg.forget(model, task, tmp_path / "b", n=5, labels="shuffled", progress=False)
    with pytest.raises(InputError, match="no 'dev' split"):
        fg.forget(model, task, tmp_path / "c", n=5, forget_split="dev", progress=False)
    with pytest.raises(InputError, match="pass build="):
        fg.forget(torch.nn.Linear(2, 2), task, tmp_path / "d", n=5, progress=False)
    with pytest.raises(InputError, match="hidden layer -5 does not exist"):
        fg.forget(model, task, tmp_path / "e", n=5, progress=False)
    assert not list(tmp_path.iterdir())  # nothing half-written is left behind


# --- the built-in study --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_built_in_study_forgets_shallowly():
    """The cached quick study: every task learned, the forgotten task loses accuracy on its forget set,
    and the other tasks keep theirs (the numbers of the full run are in the README)."""
    study = toy_tasks.ensure_tasks_run(quick=True, progress=False)
    assert set(study.forgetting) == set(toy_tasks.TASKS)
    res = fg.forgetting_results(study.forgetting)
    own = res.filter((pl.col("forgot") == pl.col("task")) & (pl.col("split") == "forget"))
    assert own["acc_ft"].min() > 0.8
    assert (own["acc_forget"] < own["acc_ft"] - 0.1).sum() >= 3
    others = res.filter((pl.col("forgot") != pl.col("task")) & (pl.col("split") == "test"))
    assert others["forget_ratio"].median() < 0.3  # forgetting stays mostly on its own task


def _hf_task(n_train=24, n_test=8):
    """A two-option task in a tiny HF model's vocabulary (tokens 10 and 11 answer)."""
    from tests.tiny_models import random_tokens

    rows = random_tokens(n_train + n_test, lo=3, hi=7, seed=4)
    answers = [10 + (r[0] % 2) for r in rows]
    samples = workbench.SampleSet(ids=[str(i) for i in range(len(rows))],
                                  groups=["train"] * n_train + ["test"] * n_test, input_ids=rows,
                                  targets=[[-100] * (len(r) - 1) + [a] for r, a in zip(rows, answers)])
    return fg.ChoiceTask("parity", samples, torch.tensor([[10, 11]] * len(rows)))


@pytest.mark.slow
def test_forget_hugging_face_and_state_dict_models(tmp_path):
    from tests.tiny_models import tiny_model

    task = _hf_task()
    run = fg.forget(tiny_model("llama"), task, tmp_path / "hf", n=16, epochs=1, batch_size=8, n_checkpoints=2,
                    variability_layer=-1, device="cpu", progress=False)
    assert [c.kind for c in run.checkpoints] == ["hf", "hf"] and run.info["forgetting"]["task"] == "parity"
    again = fg.open_forgetting_run(run.root)
    assert again.steps == [0, 2] and again.store.table("forgetting").height > 0

    class Wrapped(torch.nn.Module):  # a model without save_pretrained: only a build function can rebuild it
        def __init__(self):
            super().__init__()
            inner = tiny_model("gpt_neox")
            self.gpt_neox, self.lm_head = inner.gpt_neox, inner.lm_head

        def forward(self, input_ids, attention_mask=None):
            from types import SimpleNamespace

            h = self.gpt_neox(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            return SimpleNamespace(logits=self.lm_head(h))

    run = fg.forget(Wrapped(), task, tmp_path / "sd", n=16, epochs=1, batch_size=8, n_checkpoints=2, build=Wrapped,
                    variability_layer=-1, device="cpu", progress=False)
    assert [c.kind for c in run.checkpoints] == ["state_dict", "state_dict"]
    store = workbench.measure(run, [workbench.LossAccuracy(per_sample=False)], progress=False)
    assert sorted(store.table("basic")["step"].unique().to_list()) == [0, 2]
