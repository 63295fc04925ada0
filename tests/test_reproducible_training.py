"""The README's claim that the built-in runs are reproducible: training pins itself to one CPU thread, so two
runs on the same machine give bit-identical checkpoints, whatever the caller's thread count. (Another CPU or
torch build may round differently; one machine cannot test that, and the README says so.)"""

import json

import torch

from workbench import toys


def test_a_rerun_gives_bit_identical_checkpoints(tmp_path, tiny_run_cfg):
    before = torch.get_num_threads()
    folders = []
    try:
        for threads in (2, 1):  # the caller's count must not matter: training pins one thread
            torch.set_num_threads(threads)
            folders.append(toys.train_modular(tiny_run_cfg, tmp_path / f"run{threads}", progress=False))
    finally:
        torch.set_num_threads(before)
    a, b = folders
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and p.name != "run.json")
    assert any(f.suffix == ".safetensors" for f in files)
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file() and p.name != "run.json")
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    meta = [json.loads((f / "run.json").read_text()) for f in folders]
    for m in meta:
        m.pop("seconds")  # wall-clock time, the one field that may differ
    assert meta[0] == meta[1]
