"""Memory bounded by a budget (per-sample tensors stream to memory-mapped files past it), and checkpoints split
over devices with device_map: both capture and measure exactly what the plain in-memory, one-device run does."""

from __future__ import annotations

import polars as pl
import pytest
import torch
from polars.testing import assert_frame_equal

from tests.tiny_models import random_tokens, save_series, tiny_model
from workbench import CaptureSpec, Run, SampleSet, capture, measure
from workbench.errors import InputError
from workbench.spill import RowBuffers, parse_bytes

SPEC = CaptureSpec(routing=True, applied=True, expert_load=True, hidden_layers=(0, -1))
FIELDS = ("loss", "accuracy", "confidence", "target_prob", "n_scored", "routing", "applied", "expert_load")


def _file_backed(t: torch.Tensor) -> bool:
    return t.untyped_storage().filename is not None


def _assert_same_capture(a, b) -> None:
    for name in FIELDS:
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.hidden.keys() == b.hidden.keys()
    for layer in a.hidden:
        assert torch.equal(a.hidden[layer], b.hidden[layer]), layer
    for x, y in zip(a.router_matrices, b.router_matrices, strict=True):
        assert torch.equal(x, y)


def test_memory_sizes_read_as_bytes():
    assert parse_bytes(None) is None
    assert parse_bytes(1024) == 1024 and parse_bytes("1024") == 1024
    assert parse_bytes("512MiB") == 512 * 2**20 and parse_bytes("2GB") == 2 * 10**9 and parse_bytes("1.5k") == 1536
    assert parse_bytes(" 3 gib ") == 3 * 2**30
    for bad in ("lots", "-1", -1, True, "2 parsecs", float("nan")):
        with pytest.raises(InputError):
            parse_bytes(bad)


def test_row_buffers_hold_up_to_the_budget_and_map_the_rest(tmp_path):
    buffers = RowBuffers("1000", tmp_path)
    held = buffers.rows((10, 20))  # 800 bytes: within the budget
    mapped = buffers.rows((10, 20))  # 800 more would pass it: a file
    small = buffers.rows((5, 10))  # 200: fits beside the first
    assert (buffers.held, buffers.spilled) == (1000, 800)
    assert not _file_backed(held) and _file_backed(mapped) and not _file_backed(small)
    mapped[3] = 7.0
    assert mapped.sum().item() == 140.0 and mapped.shape == (10, 20)
    assert not list(tmp_path.iterdir())  # unlinked at once: a killed process leaves nothing
    unbounded = RowBuffers(None, tmp_path)
    assert not _file_backed(unbounded.rows((1000, 1000)))


def test_capture_past_its_budget_streams_to_files_and_equals_the_in_memory_capture(tmp_path):
    model = tiny_model("olmoe")
    samples = SampleSet.from_token_lists(random_tokens(30))
    plain = capture(model, samples, SPEC, device="cpu", token_budget=64)  # several batches
    spilled = capture(model, samples, SPEC, device="cpu", token_budget=64, memory_budget=0, spill_dir=tmp_path)
    _assert_same_capture(spilled, plain)
    assert all(_file_backed(getattr(spilled, n)) for n in ("routing", "applied", "expert_load"))
    assert all(_file_backed(h) for h in spilled.hidden.values()) and not _file_backed(spilled.loss)
    # a budget for the first tensor only: routing stays in memory, the others go to files
    one = plain.routing.numel() * 4
    part = capture(model, samples, SPEC, device="cpu", token_budget=64, memory_budget=one, spill_dir=tmp_path)
    assert not _file_backed(part.routing) and _file_backed(part.applied)
    _assert_same_capture(part, plain)
    assert not list(tmp_path.iterdir())


def test_measure_with_a_memory_budget_writes_the_same_tables(tiny_run, tmp_path):
    steps = tiny_run.steps[-1:]
    tables = []
    for budget, where in ((None, "plain"), ("0", "budget")):
        run = Run.from_folder(tiny_run.folder, store_root=tmp_path / where)
        measure(run, ["basic", "routing", "probes"], steps=steps, progress=False, memory_budget=budget)
        tables.append({name: run.store.table(name) for name in ("basic", "routing", "probes")})
        assert not list((tmp_path / where / "store" / ".spill").glob("*"))
    for name in tables[0]:
        assert_frame_equal(tables[1][name], tables[0][name])


DEVICE_MAP = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
              "model.layers.1": "disk", "model.layers.2": "cpu", "model.norm": "cpu", "lm_head": "cpu"}


def test_a_checkpoint_split_by_device_map_measures_as_the_whole_one(tmp_path):
    folder = save_series("olmoe", tmp_path / "series", steps=(0, 10))
    samples = SampleSet.from_token_lists(random_tokens(24))
    # layer 1 offloaded to disk: accelerate's hooks load its weights for each forward pass, from a folder
    split = Run.from_folder(folder, samples=samples, store_root=tmp_path / "split", device_map=DEVICE_MAP,
                            offload_folder=str(tmp_path / "offload"))
    whole = Run.from_folder(folder, samples=samples, store_root=tmp_path / "whole")
    model = split.checkpoints[0].load(device="cpu")
    assert model.hf_device_map == DEVICE_MAP
    assert model.model.layers[1].mlp.gate.weight.device.type == "meta"  # offloaded, not in memory
    _assert_same_capture(capture(model, samples, SPEC, device="cpu", token_budget=64),
                         capture(whole.checkpoints[0].load(device="cpu"), samples, SPEC, device="cpu", token_budget=64))
    with pytest.raises(InputError, match="torch_dtype"):
        split.checkpoints[0].load(device="cpu", dtype=torch.float64)
    for run in (split, whole):
        measure(run, ["basic", "routing"], progress=False, device="cpu")
    for name in ("basic", "routing"):
        a, b = split.store.table(name), whole.store.table(name)
        assert a.height > 0 and a.filter(pl.col("value").is_nan()).height == b.filter(pl.col("value").is_nan()).height
        assert_frame_equal(a.drop("run"), b.drop("run"))
