"""Runs: discovering, ordering and safely loading checkpoints; the errors a user can cause."""

import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from tests.tiny_models import save_series, tiny_model
from workbench import Run
from workbench.errors import (
    CorruptCheckpointError,
    InputError,
    NoCheckpointsError,
    UnknownArchitectureError,
    UnsafeCheckpointError,
)
from workbench.runs import parse_step


@pytest.mark.parametrize(
    "name, step",
    [("step_000100", 100), ("checkpoint-2000", 2000), ("step5000-tokens20B", 5000), ("step1000", 1000),
     ("global_step42", 42), ("ckpt_7.safetensors", 7), ("model", None)],
)
def test_parse_step(name, step):
    assert parse_step(name) == step


def test_builtin_run_folder(tiny_run, tiny_run_cfg):
    from workbench.toys import checkpoint_steps

    assert tiny_run.steps == checkpoint_steps(tiny_run_cfg.steps, tiny_run_cfg.n_checkpoints)
    assert tiny_run.samples.group_names == ["test", "train"] or set(tiny_run.samples.group_names) == {"train", "test"}
    model = tiny_run.checkpoint(tiny_run.steps[-1]).load()
    assert model.config.n_layers == tiny_run_cfg.n_layers
    metrics = tiny_run.metrics()
    assert metrics["step"].to_list() == tiny_run.steps
    assert set(metrics.columns) >= {"train_acc", "test_acc", "train_loss", "test_loss"}


def test_builtin_run_is_reproducible(tmp_path, tiny_run, tiny_run_cfg):
    from workbench.toys import train_modular

    again = Run.from_folder(train_modular(tiny_run_cfg, tmp_path / "again", progress=False))
    for step in (tiny_run.steps[1], tiny_run.steps[-1]):
        a = (tiny_run.checkpoint(step).path / "model.safetensors").read_bytes()
        b = (again.checkpoint(step).path / "model.safetensors").read_bytes()
        assert a == b


@pytest.mark.parametrize("kind", ["olmoe", "gpt_neox"])
def test_hf_folder_series_loads_in_step_order(tmp_path, kind):
    save_series(kind, tmp_path, steps=(100, 5, 20))
    run = Run.from_folder(tmp_path)
    assert run.steps == [5, 20, 100]
    firsts = [m.get_input_embeddings().weight[0, 0].item() for _, m in run.models()]
    assert len(set(firsts)) == 3  # three different checkpoints, each loaded
    assert run.store.root == tmp_path / "store"


def test_hub_revisions_resolve_through_the_hf_cache(tmp_path):
    """The hub path uses from_pretrained(revision=...); offline, a local HF cache stands in for the hub."""
    repo = tmp_path / "cache" / "models--acme--tiny-olmoe"
    expected = {}
    for i, rev in enumerate(["step100", "step2000-tokens8B"]):
        sha = f"{i + 1:040x}"
        m = tiny_model("olmoe", seed=i)
        m.save_pretrained(repo / "snapshots" / sha)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / rev).write_text(sha)
        expected[parse_step(rev)] = m.model.layers[0].mlp.gate.weight.detach().clone()
    run = Run.from_hub("acme/tiny-olmoe", ["step2000-tokens8B", "step100"], cache_dir=str(tmp_path / "cache"),
                       local_files_only=True, store_root=tmp_path / "store")
    assert run.steps == [100, 2000]
    for ckpt, model in run.models():
        torch.testing.assert_close(model.model.layers[0].mlp.gate.weight, expected[ckpt.step])


def test_state_dict_files_with_a_builder(tmp_path):
    from workbench.toys import ToyConfig, ToyMoETransformer

    cfg = ToyConfig(vocab_size=8, n_ctx=3, d_model=16, d_expert=16)
    for step in (3, 1):
        torch.manual_seed(step)
        m = ToyMoETransformer(cfg)
        save_file(m.state_dict(), tmp_path / f"ckpt_{step}.safetensors")
        torch.save(m.state_dict(), tmp_path / f"iter_{step + 10}.pt")
    run = Run.from_state_dicts(sorted(tmp_path.glob("*.safetensors")), lambda: ToyMoETransformer(cfg))
    assert run.steps == [1, 3]
    model = run.checkpoint(3).load()
    torch.manual_seed(3)
    torch.testing.assert_close(model.state_dict()["lm_head.weight"], ToyMoETransformer(cfg).state_dict()["lm_head.weight"])
    pt_run = Run.from_state_dicts(sorted(tmp_path.glob("*.pt")), lambda: ToyMoETransformer(cfg))
    assert pt_run.steps == [11, 13]
    pt_run.checkpoint(11).load()


# --- errors --------------------------------------------------------------------------------------------------
def test_empty_folder(tmp_path):
    with pytest.raises(NoCheckpointsError, match="no checkpoints in"):
        Run.from_folder(tmp_path)


def test_loose_weight_files_point_to_from_state_dicts(tmp_path):
    save_file({"w": torch.zeros(2)}, tmp_path / "step_1.safetensors")
    with pytest.raises(NoCheckpointsError, match="from_state_dicts"):
        Run.from_folder(tmp_path)


class Evil:
    def __reduce__(self):  # would run code on an unsafe load
        return (print, ("pwned",))


def test_pickle_checkpoint_is_refused_without_running_it(tmp_path, capsys):
    save_series("llama", tmp_path, steps=(1,))
    folder = tmp_path / "step_1"
    for f in folder.glob("*.safetensors"):
        f.unlink()
    with open(folder / "pytorch_model.bin", "wb") as fh:
        pickle.dump({"weight": Evil()}, fh)
    run = Run.from_folder(tmp_path)
    with pytest.raises(UnsafeCheckpointError, match="safetensors"):
        run.checkpoint(1).load()
    assert "pwned" not in capsys.readouterr().out


def test_pickle_state_dict_file_is_refused(tmp_path):
    torch.save({"w": torch.zeros(2), "obj": Evil()}, tmp_path / "step_5.pt")
    run = Run.from_state_dicts(tmp_path, lambda: torch.nn.Linear(2, 2))
    with pytest.raises(UnsafeCheckpointError, match="never runs code"):
        run.checkpoint(5).load()


def test_corrupt_safetensors(tmp_path):
    save_series("llama", tmp_path, steps=(1,))
    f = next((tmp_path / "step_1").glob("*.safetensors"))
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(CorruptCheckpointError, match="truncated or corrupt"):
        Run.from_folder(tmp_path).checkpoint(1).load()


def test_corrupt_builtin_checkpoint(tmp_path, tiny_run):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_run.root, copy, ignore=shutil.ignore_patterns("store"))
    f = copy / "step_000000" / "model.safetensors"
    f.write_bytes(b"\x00" * 16)
    with pytest.raises(CorruptCheckpointError, match="step_000000"):
        Run.from_folder(copy).checkpoint(0).load()


def test_unknown_architecture(tmp_path):
    save_series("llama", tmp_path, steps=(1,))
    cfg_file = tmp_path / "step_1" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["model_type"] = "no-such-architecture"
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(UnknownArchitectureError, match="architecture"):
        Run.from_folder(tmp_path).checkpoint(1).load()


def test_mixed_architectures_are_refused(tmp_path):
    save_series("llama", tmp_path / "a", steps=(1,))
    save_series("olmoe", tmp_path / "b", steps=(2,))
    (tmp_path / "a" / "step_1").rename(tmp_path / "step_1")
    (tmp_path / "b" / "step_2").rename(tmp_path / "step_2")
    with pytest.raises(InputError, match="different architectures"):
        Run.from_folder(tmp_path)


def test_run_without_samples_says_how_to_give_them(tmp_path):
    save_series("llama", tmp_path, steps=(1,))
    with pytest.raises(InputError, match="samples="):
        Run.from_folder(tmp_path).samples


def test_a_separate_store_root_keeps_the_runs_own_files(tiny_run, tmp_path):
    run = Run.from_folder(tiny_run.folder, store_root=tmp_path / "elsewhere")
    assert run.store.root == tmp_path / "elsewhere" / "store"
    assert run.samples.ids == tiny_run.samples.ids
