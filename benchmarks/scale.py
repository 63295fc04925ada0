"""Scale-out at OLMoE's routing shape: capture overhead, ranks, and memory against the sample count.

The model is OLMoE-shaped where routing costs (16 MoE layers, 64 experts, top-8) and tiny elsewhere (hidden
size 32, experts of width 16, vocabulary 512), so it runs on 2 cores (``--tiny``: 2 layers, 8 experts, top-2); the samples are random token sequences of
16 to 48 tokens. Three measurements, each side by side in one run:

1. **capture / bare forward** on the same length-bucketed batches (routing scores, applied weights, expert
   load, the last hidden state), interleaved rounds as every benchmark (``_timing``). Target <= 1.05.
2. **samples per second, 2 gloo ranks / 1 process**: ``workbench.measure`` (routing statistics) over a
   series of checkpoints (checkpoint-sharded: each rank measures half of them) and over one checkpoint
   (sample-sharded: the ranks share its batches, rank 0 gathers and writes). Both sides run in the same two
   spawned processes, in interleaved rounds: the one-process side is rank 0 measuring alone
   (``workbench.distributed.local``) while rank 1 waits, on one thread or the whole thread budget, whichever a
   first pass finds faster; the two-rank side gives each rank half of the budget; each round measures into a
   fresh store. Target >= 1.8 with 2 ranks on 2 cores.
3. **peak memory at 1x, 4x and 16x the samples** (256, 1,024, 4,096 by default): how far the process's
   anonymous memory (its own, not the file pages the kernel may write back and evict; sampled every
   millisecond) rises during one capture of routing and a hidden state, in batches of a fixed token budget,
   without a budget and with ``memory_budget`` (past it the per-sample tensors stream to memory-mapped files).
   Target: flat with a budget. Printed as ``memory`` lines, not ratios.

    python benchmarks/scale.py [--threads N] [--tiny] [--samples N] [--checkpoints N]
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' tiny-model helpers

import _timing  # noqa: E402
from tests.tiny_models import save_drifting  # noqa: E402
from workbench import CaptureSpec, SampleSet, capture  # noqa: E402
from workbench.samples import length_buckets  # noqa: E402

VOCAB = 512
SPEC = CaptureSpec(routing=True, applied=True, expert_load=True, hidden_layers=(-1,))


#: OLMoE's routing shape (16 MoE layers, 64 experts, top-8); --tiny shrinks it to a smoke test's size.
SHAPE = {"num_hidden_layers": 16, "num_experts": 64, "num_experts_per_tok": 8}
TINY_SHAPE = {"num_hidden_layers": 2, "num_experts": 8, "num_experts_per_tok": 2}


def olmoe_config(tiny: bool = False):
    from transformers import OlmoeConfig

    return OlmoeConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=16, num_attention_heads=2,
                       num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                       eos_token_id=2, **(TINY_SHAPE if tiny else SHAPE))


def olmoe_model(seed: int = 0):
    from transformers import OlmoeForCausalLM

    torch.manual_seed(seed)
    model = OlmoeForCausalLM(olmoe_config(_timing.tiny_requested())).eval()
    with torch.no_grad():  # spread the routers, so routing is not near uniform
        for name, p in model.named_parameters():
            if name.endswith("gate.weight"):
                p.normal_(0, 0.5)
    return model


def token_samples(n: int, seed: int = 0, lo: int = 16, hi: int = 48) -> SampleSet:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (n,), generator=g)
    return SampleSet.from_token_lists([torch.randint(3, VOCAB, (int(k),), generator=g).tolist() for k in lengths])


def bare_forward(model, samples, token_budget=16384):
    with torch.inference_mode():
        for idx in length_buckets(samples.lengths, token_budget, 4096):
            x, _, mask = samples.padded(idx)
            model(input_ids=x, attention_mask=mask).logits


# --- 1. capture overhead ---------------------------------------------------------------------------------------
def overhead(args, n: int) -> None:
    model, samples = olmoe_model(), token_samples(n)
    cmp = _timing.side_by_side({
        "capture": lambda: capture(model, samples, SPEC, device="cpu"),
        "bare forward": lambda: bare_forward(model, samples),
    }, "bare forward", **({"min_time": 0.25} | _timing.limits(args)))
    _timing.report(f"capture / bare forward, OLMoE shape, {n} samples", cmp, "capture", target="<= 1.05")


# --- 2. ranks ----------------------------------------------------------------------------------------------------
def save_series(folder: Path, n_checkpoints: int) -> Path:
    return save_drifting(olmoe_model(), folder, [100 * i for i in range(n_checkpoints)], drift=0.02)


def _scratch() -> str | None:
    """Where the benchmark's temporary stores go: under $WORKBENCH_HOME when it is set (created if it is not
    there yet, as in a fresh clone), else the system's temporary folder."""
    home = os.environ.get("WORKBENCH_HOME")
    if home:
        Path(home).mkdir(parents=True, exist_ok=True)
    return home


def _rank(rank: int, port: int, folder: str, n: int, threads: int, rounds: int, warmup: int, out: str) -> None:
    import torch.distributed as dist

    from workbench import Run, distributed, measure

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    samples = token_samples(n)
    series = Run.from_folder(folder)
    cases = {"checkpoint-sharded": series.steps, "sample-sharded": series.steps[:1]}
    root = Path(folder).parent / "stores"
    times: dict[str, list[float]] = {}

    def fresh(name: str):
        store = root / name
        if rank == 0:
            shutil.rmtree(store, ignore_errors=True)
        return Run.from_folder(folder, samples=samples, store_root=store)

    chosen = [threads]

    def one_process(steps):
        if rank == 0:
            torch.set_num_threads(chosen[0])
            with distributed.local():
                run = fresh("one")
                t = time.perf_counter()
                measure(run, ["routing"], steps=steps, device="cpu", progress=False)
                return time.perf_counter() - t
        return None

    def two_ranks(steps):
        torch.set_num_threads(max(1, threads // 2))
        run = fresh("two")
        dist.barrier()
        t = time.perf_counter()
        measure(run, ["routing"], steps=steps, device="cpu", progress=False)
        dist.barrier()
        return time.perf_counter() - t

    sides = {"1 process": one_process, "2 ranks": two_ranks}
    # The one-process side at its fastest: one thread or the whole budget, whichever a first pass finds faster
    # (on a busy machine threads of one process wait for each other; tiny ops gain little from a second one).
    trial = {}
    for k in sorted({1, threads}):
        chosen[0] = k
        dist.barrier()
        trial[k] = one_process(series.steps[:1])
    best = [min(trial, key=trial.get) if rank == 0 else None]
    dist.broadcast_object_list(best, src=0)
    chosen[0] = best[0]
    # warm-up rounds (imports, first-batch settling), then interleaved rounds in rotating order
    for r in range(warmup + rounds):
        for case, steps in cases.items():
            names = list(sides)[r % 2:] + list(sides)[:r % 2]
            for side in names:
                dist.barrier()
                seconds = sides[side](steps)
                if r >= warmup and rank == 0:
                    times.setdefault(f"{case}|{side}", []).append(len(steps) * n / seconds)
    if rank == 0:
        torch.save({"rates": times, "threads": chosen[0]}, out)
    dist.barrier()
    dist.destroy_process_group()


def ranks(args, n: int, n_checkpoints: int, rounds: int, warmup: int = 1) -> None:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(dir=_scratch()) as tmp:
        folder = save_series(Path(tmp) / "series", n_checkpoints)
        out = str(Path(tmp) / "times.pt")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(_rank, args=(port, str(folder), n, args.threads, rounds, warmup, out), nprocs=2, join=True)
        saved = torch.load(out, weights_only=True)
        rates, one_threads = saved["rates"], saved["threads"]
    for case in ("checkpoint-sharded", "sample-sharded"):
        one, two = rates[f"{case}|1 process"], rates[f"{case}|2 ranks"]
        ratio = _timing.Spread([b / a for a, b in zip(one, two)])
        what = f"{n_checkpoints} checkpoints" if case == "checkpoint-sharded" else "1 checkpoint"
        print(f"ratio samples/s, 2 gloo ranks / 1 process, {case} ({what} x {n} samples) = {ratio.fmt()} "
              f"(median [quartiles] of {len(one)} paired rounds); target >= 1.8 on 2 cores")
        print(f"      1 process {_timing.Spread(one).fmt(0)} samples/s on {one_threads} thread(s) (the faster of 1 and "
              f"{args.threads} in a first pass), 2 ranks "
              f"{_timing.Spread(two).fmt(0)} samples/s on {max(1, args.threads // 2)} thread(s) each")


# --- 3. memory -------------------------------------------------------------------------------------------------
def _anon_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:")) / 1024


def peak_anon(fn) -> float:
    """The peak of the process's anonymous resident memory while ``fn`` ran, in MB, sampled every millisecond by
    a thread (the kernel keeps no peak of it)."""
    import gc

    gc.collect()
    peak = _anon_mb()
    done = threading.Event()

    def watch():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _anon_mb())
            time.sleep(0.001)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        result = fn()
        peak = max(peak, _anon_mb())
    finally:
        done.set()
        t.join()
    return peak


def _memory_sizes(_, n: int, budget: str | None, token_budget: int, spill: str, out: str) -> None:
    """In a fresh process (so no earlier part's heap hides growth): peak anonymous memory above the start of
    captures of 1x, 4x and 16x ``n`` samples, in that order, after a warm-up."""
    torch.set_num_threads(1)
    model = olmoe_model()
    samples = token_samples(16 * n, lo=8, hi=16)
    kw = dict(device="cpu", token_budget=token_budget) | ({"memory_budget": budget, "spill_dir": spill} if budget else {})
    # warm-up at 4x: the routers settle and the allocator's pools reach the size full batches need
    cap = capture(model, samples.select(range(4 * n)), SPEC, **kw)
    per_sample = sum(t.numel() * t.element_size() for t in (cap.routing, cap.applied, cap.expert_load,
                                                            *cap.hidden.values())) / (4 * n)
    del cap
    start = _anon_mb()
    peaks = [peak_anon(lambda: capture(model, samples.select(range(k * n)), SPEC, **kw)) - start for k in (1, 4, 16)]
    torch.save({"peaks": peaks, "per_sample": per_sample}, out)


def memory(n: int, budget: str, token_budget: int) -> None:
    """Peak anonymous memory during captures of 1x, 4x and 16x ``n`` samples, without and with ``budget``. Batches
    hold ``token_budget`` tokens, so the forward pass's own memory is the same at every size and what grows
    with the samples is what capture keeps."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(dir=_scratch()) as tmp:
        results = {}
        for label, b in (("no budget", None), (f"memory_budget={budget}", budget)):
            out = str(Path(tmp) / "memory.pt")
            mp.spawn(_memory_sizes, args=(n, b, token_budget, tmp, out), nprocs=1, join=True)
            results[label] = torch.load(out, weights_only=True)
    per_sample = results["no budget"]["per_sample"]
    print(f"memory: capture keeps {per_sample / 1024:.1f} KiB per sample (routing, applied weights, expert load: "
          f"layers x experts floats each; one hidden state); batches of {token_budget} tokens")
    for label, r in results.items():
        mb = r["peaks"]
        kept = 15 * n * per_sample / 2**20
        print(f"memory, {label}: peak anonymous memory above the start {mb[0]:.1f} / {mb[1]:.1f} / {mb[2]:.1f} MB "
              f"at {n} / {4 * n} / {16 * n} samples: {mb[2] - mb[0]:+.1f} MB from 1x to 16x, where the "
              f"per-sample tensors grow by {kept:.1f} MB" + ("; target flat" if "=" in label else ""))


def main():
    ap = _timing.arguments(__doc__)
    ap.add_argument("--samples", type=int, default=None, help="samples per checkpoint (default 2048; --tiny 16)")
    ap.add_argument("--checkpoints", type=int, default=None, help="checkpoints of the series (default 4; --tiny 2)")
    args = ap.parse_args()
    if args.tiny:  # the model's shape follows; spawned ranks read it from the environment too
        os.environ[_timing.TINY_ENV] = "1"
    n = args.samples or (16 if args.tiny else 2048)
    _timing.set_thread_budget(args.threads)
    _timing.header(f"scale-out at OLMoE's routing shape (16 MoE layers, 64 experts, top-8; torch {torch.__version__}, "
                   "CPU)", args.threads)
    overhead(args, n)
    ranks(args, n, args.checkpoints or (2 if args.tiny else 4), rounds=1 if args.tiny else (args.max_rounds or 3),
          warmup=0 if args.tiny else 1)
    if args.tiny:
        memory(16, "64KiB", 128)
    else:
        memory(max(n // 8, 64), "1MiB", 1024)
    _timing.footer()


if __name__ == "__main__":
    main()
