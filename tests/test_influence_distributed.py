"""Sharding over torch.distributed: 2 CPU ranks (gloo on 127.0.0.1) give the 1-process factors and scores."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from workbench.probes.influence import fit_factors, pairwise_scores, self_scores


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _compute(calls: list | None = None):
    """Factors (true Fisher, sampled labels), pairwise scores with per-token parts, and self-scores."""
    from tests.test_influence import TOKEN_TASK, TokenNet, token_batches, token_data

    def counted(model, batch, sample=False):
        if calls is not None:
            calls.append(len(batch["ids"]))
        return TOKEN_TASK.loss(model, batch, sample=sample)

    torch.manual_seed(0)
    model = TokenNet().double()
    docs = token_batches(token_data(19, seed=0), 4)  # 5 batches: the ranks get 3 and 2
    queries = token_batches(token_data(3, seed=1), 2)
    kw = dict(loss_fn=TOKEN_TASK.loss, mask_fn=lambda b: b["mask"], progress=False)
    # cache_bytes=0: both ekfac passes read the (sharded) documents.
    factors = fit_factors(model, docs, strategy="ekfac", fisher="true", report=False, cache_bytes=0,
                          **dict(kw, loss_fn=counted))
    scores, tokens = pairwise_scores(model, factors, queries, docs, per_token=True, **kw)
    own = self_scores(model, factors, docs, **kw)
    return factors, scores, tokens, own


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        calls = []
        factors, scores, tokens, own = _compute(calls)
        # Each rank read only its shard (batches 0, 2, 4 or 1, 3), once per ekfac pass.
        assert calls == ([4, 4, 3] * 2 if rank == 0 else [4, 4] * 2), calls
        if rank == 0:
            torch.save({"tensors": factors.tensors, "n_examples": factors.n_examples, "n_tokens": factors.n_tokens,
                        "scores": scores, "tokens": tokens, "self": own}, out)
        else:  # every rank ends with the same results
            dist.barrier()
            return
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process(tmp_path):
    out = str(tmp_path / "rank0.pt")
    mp.spawn(_worker, args=(_free_port(), out), nprocs=2, join=True)
    two = torch.load(out, weights_only=True)
    factors, scores, tokens, own = _compute()
    assert two["n_examples"] == factors.n_examples == 19
    assert two["n_tokens"] == factors.n_tokens
    for key, parts in factors.tensors.items():
        for name, t in parts.items():
            if "eigenvectors" in name:  # eigenvectors are defined up to sign: compare the projectors
                torch.testing.assert_close(two["tensors"][key][name].abs(), t.abs(), rtol=1e-6, atol=1e-8)
            else:
                torch.testing.assert_close(two["tensors"][key][name], t, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(two["scores"], scores, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(two["tokens"], tokens, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(two["self"], own, rtol=1e-8, atol=1e-10)
