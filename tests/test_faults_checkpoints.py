"""Faults in checkpoints: every load is verified (missing, unexpected, mis-shaped keys; a config of another
architecture), step names follow one rule or an explicit mapping, and broken files are named."""

import errno
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.tiny_models import save_series, tiny_model
from workbench import Run
from workbench.errors import CorruptCheckpointError, InputError
from workbench.runs import parse_step
from workbench.toys import ToyConfig, ToyMoETransformer

# Tiny models: a second thread only adds synchronization (and contention on a shared machine).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llama_series(tmp_path_factory):
    """Two tiny llama checkpoints saved once; tests copy the folder before they break it."""
    return save_series("llama", tmp_path_factory.mktemp("llama"), steps=(1, 2))


@pytest.fixture
def series(llama_series, tmp_path):
    dst = tmp_path / "ckpts"
    shutil.copytree(llama_series, dst)
    return dst


def _rewrite(folder, change):
    f = folder / "model.safetensors"
    state = load_file(f)
    change(state)
    save_file(state, f, metadata={"format": "pt"})
    return f


# --- step names: one rule ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, step", [
    ("step_100", 100), ("checkpoint-100", 100), ("step100-tokens4B", 100), ("global_step100", 100),
    ("iter_0000100", 100), ("100", 100), ("stage1-step140000-tokens588B", 140000), ("ckpt_7.safetensors", 7),
    ("final-v2", None), ("run-2024-05-01", None), ("model", None), ("step100-step200", None), ("step100x", None),
])
def test_step_names_follow_one_rule(name, step):
    assert parse_step(name) == step


def test_a_folder_name_without_a_step_is_refused_and_can_be_mapped(series):
    (series / "step_2").rename(series / "final-v2")
    (series / "step_1").rename(series / "run-2024-05-01")
    with pytest.raises(InputError, match=r"cannot tell the step of \['final-v2', 'run-2024-05-01'\].*steps=") as e:
        Run.from_folder(series)
    assert "--checkpoint-step" in str(e.value)
    run = Run.from_folder(series, steps={"final-v2": 2000, "run-2024-05-01": 10})
    assert run.steps == [10, 2000] and run.checkpoint(2000).path.name == "final-v2"
    with pytest.raises(InputError, match=r"steps= maps \['final-v3'\].*its checkpoints are"):
        Run.from_folder(series, steps={"final-v3": 1, "final-v2": 2, "run-2024-05-01": 3})


def test_the_cli_maps_checkpoint_names_to_steps(series, capsys):
    from workbench import cli

    (series / "step_2").rename(series / "final-v2")
    assert cli.main(["measure", str(series), "--probe", "basic"]) == 2
    assert "final-v2" in capsys.readouterr().err
    args = cli.build_parser().parse_args(["measure", str(series), "--checkpoint-step", "final-v2=7"])
    assert cli.parse_steps(args.checkpoint_step) == {"final-v2": 7}
    with pytest.raises(InputError, match="NAME=STEP"):
        cli.parse_steps(["final-v2"])


def test_a_builtin_step_folder_without_a_number_is_named(tiny_copy):
    (tiny_copy.folder / "step_000000").rename(tiny_copy.folder / "step_final")
    with pytest.raises(InputError, match="step_final"):
        Run.from_folder(tiny_copy.folder)
    assert Run.from_folder(tiny_copy.folder, steps={"step_final": 0}).steps == tiny_copy.steps


def test_hub_revisions_and_state_dict_files_use_the_rule_or_a_mapping(tmp_path):
    with pytest.raises(InputError, match=r"\['main'\]"):
        Run.from_hub("acme/tiny", ["main", "step100"])
    assert Run.from_hub("acme/tiny", ["main", "step100"], steps={"main": 500}).steps == [100, 500]
    cfg = ToyConfig(vocab_size=8, n_ctx=3, d_model=16, d_expert=16)
    save_file(ToyMoETransformer(cfg).state_dict(), tmp_path / "final.safetensors")
    with pytest.raises(InputError, match="final.safetensors"):
        Run.from_state_dicts(tmp_path, lambda: ToyMoETransformer(cfg))
    run = Run.from_state_dicts(tmp_path, lambda: ToyMoETransformer(cfg), steps={"final.safetensors": 9})
    assert run.steps == [9]


# --- weights that do not fit their model -------------------------------------------------------------------------
def test_a_missing_tensor_is_named(series):
    f = _rewrite(series / "step_1", lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CorruptCheckpointError, match=r"1 missing key\(s\) \(model.layers.1.mlp.up_proj.weight\)") as e:
        Run.from_folder(series).checkpoint(1).load()
    assert str(f) in str(e.value) and "random" in str(e.value)


def test_an_unexpected_tensor_is_named(series):
    _rewrite(series / "step_1", lambda s: s.__setitem__("model.layers.9.extra.weight", torch.zeros(2)))
    with pytest.raises(CorruptCheckpointError, match=r"unexpected key\(s\) \(model.layers.9.extra.weight\)"):
        Run.from_folder(series).checkpoint(1).load()


def test_a_mis_shaped_tensor_is_named_with_both_shapes(series):
    _rewrite(series / "step_1", lambda s: s.__setitem__("model.layers.0.mlp.up_proj.weight", torch.zeros(3, 32)))
    with pytest.raises(CorruptCheckpointError, match=r"model.layers.0.mlp.up_proj.weight: \(3, 32\) in the file, "
                                                     r"\(64, 32\) in the model"):
        Run.from_folder(series).checkpoint(1).load()


def test_a_config_of_another_architecture_than_the_weights_is_refused(series, tmp_path):
    other = save_series("gpt_neox", tmp_path / "neox", steps=(1,))
    shutil.copy(other / "step_1" / "config.json", series / "step_1" / "config.json")
    (series / "step_2" / "config.json").unlink()
    shutil.rmtree(series / "step_2")
    with pytest.raises(CorruptCheckpointError, match=r"missing key\(s\) \(gpt_neox.*unexpected key\(s\) \(model.embed_tokens"):
        Run.from_folder(series).checkpoint(1).load()


def test_a_config_with_more_layers_than_the_weights_is_refused(series):
    cfg_file = series / "step_1" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["num_hidden_layers"] = 4
    cfg_file.write_text(json.dumps(cfg))
    shutil.rmtree(series / "step_2")
    with pytest.raises(CorruptCheckpointError, match=r"missing key\(s\) \(model.layers.3"):
        Run.from_folder(series).checkpoint(1).load()


def test_tied_embeddings_are_not_taken_for_a_missing_head(tmp_path):
    model = tiny_model("llama")
    model.config.tie_word_embeddings = True
    model.tie_weights()
    model.save_pretrained(tmp_path / "step_5")
    loaded = Run.from_folder(tmp_path).checkpoint(5).load()
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_a_hub_revision_is_verified_too(tmp_path):
    repo = tmp_path / "cache" / "models--acme--tiny"
    sha = "1" * 40
    tiny_model("llama").save_pretrained(repo / "snapshots" / sha)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "step100").write_text(sha)
    _rewrite(repo / "snapshots" / sha, lambda s: s.pop("model.norm.weight"))
    run = Run.from_hub("acme/tiny", ["step100"], cache_dir=str(tmp_path / "cache"), local_files_only=True,
                       store_root=tmp_path / "store")
    with pytest.raises(CorruptCheckpointError, match=r"acme/tiny \(revision step100\).*model.norm.weight"):
        run.checkpoint(100).load()


def test_a_state_dict_that_does_not_fit_its_builder_is_named(tmp_path):
    cfg = ToyConfig(vocab_size=8, n_ctx=3, d_model=16, d_expert=16)
    state = ToyMoETransformer(cfg).state_dict()
    state.pop("lm_head.weight")
    save_file(state, tmp_path / "step_1.safetensors")
    wide = ToyMoETransformer(ToyConfig(vocab_size=8, n_ctx=3, d_model=16, d_expert=32)).state_dict()
    torch.save(wide, tmp_path / "step_2.pt")
    run = Run.from_state_dicts(tmp_path, lambda: ToyMoETransformer(cfg))
    with pytest.raises(CorruptCheckpointError, match=r"step_1.safetensors.*missing key\(s\) \(lm_head.weight\)"):
        run.checkpoint(1).load()
    with pytest.raises(CorruptCheckpointError, match=r"step_2.pt.*of another shape.*\(8, 16, 32\) in the file"):
        run.checkpoint(2).load()


def test_builtin_weights_of_another_config_are_refused(tiny_copy):
    info_file = tiny_copy.folder / "run.json"
    info = json.loads(info_file.read_text())
    info["model"]["d_expert"] *= 2
    info_file.write_text(json.dumps(info))
    with pytest.raises(CorruptCheckpointError, match="model.safetensors.*of another shape"):
        Run.from_folder(tiny_copy.folder).checkpoint(tiny_copy.steps[0]).load()
    info_file.write_text(json.dumps(info)[:40])
    with pytest.raises(CorruptCheckpointError, match="run.json"):
        Run.from_folder(tiny_copy.folder)


# --- files: shards, configs, permissions ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sharded") / "step_3"
    tiny_model("llama").save_pretrained(folder, max_shard_size="40KB")
    return folder


def test_a_missing_shard_is_named_with_its_index(sharded, tmp_path):
    folder = shutil.copytree(sharded, tmp_path / "step_3")
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CorruptCheckpointError, match=f"{shard}.*is missing.*model.safetensors.index.json"):
        Run.from_folder(tmp_path).checkpoint(3).load()


def test_a_truncated_shard_is_named(sharded, tmp_path):
    folder = shutil.copytree(sharded, tmp_path / "step_3")
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:50])
    with pytest.raises(CorruptCheckpointError, match=f"{shard}.*truncated or corrupt"):
        Run.from_folder(tmp_path).checkpoint(3).load()


def test_a_truncated_config_is_named(series):
    cfg = series / "step_2" / "config.json"
    cfg.write_text(cfg.read_text()[:30])
    with pytest.raises(CorruptCheckpointError, match=f"{cfg}.*JSON config"):
        Run.from_folder(series)


def test_a_step_folder_without_its_config_is_named(series):
    (series / "step_2" / "config.json").unlink()
    with pytest.raises(CorruptCheckpointError, match="step_2/config.json is missing"):
        Run.from_folder(series)


def test_an_unreadable_weights_file_is_named(series, monkeypatch):
    import workbench.runs as runs

    def denied(path, *a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(runs, "safe_open", denied)  # as root, chmod would not stop the read
    with pytest.raises(CorruptCheckpointError, match="step_1/model.safetensors cannot be read: permission denied"):
        Run.from_folder(series).checkpoint(1).load()
