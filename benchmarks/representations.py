"""The ``representations`` measurement's time with the AlignedUMAP layout against the PCA layout.

The measurement does the same work per checkpoint either way (neighbourhood purity, silhouette and Fourier
structure of every block's states); the layouts differ. Side by side in one process on the same thread budget,
in interleaved rounds (``_timing``), on the states of the built-in model (demo shape, 961 modular-addition
samples, the last block's last-token state) at 12 embedded checkpoints (the measurement's default; the
checkpoints are the states drifting a little from one to the next, as a run's do):
- layout: ``aligned_umap`` against ``aligned_pca`` over the 12 checkpoints (umap-learn's numba compilation is
  done once before timing and reported on its own: every new process pays it once);
- measurement: the per-checkpoint metrics of all 4 blocks at 39 checkpoints (the built-in run's) plus the
  layout, with UMAP against with PCA.

    python benchmarks/representations.py [--threads N] [--tiny]
"""

from __future__ import annotations

import time
from functools import partial

import torch

import _timing
from workbench import CaptureSpec, capture
from workbench.measure import StepContext
from workbench.probes.representations import Representations, aligned_pca, aligned_umap


def states_case(tiny: bool):
    from workbench import toys

    cfg = toys.DEMO
    torch.manual_seed(0)
    model = toys.ToyMoETransformer(cfg.model_config()).eval()
    samples = toys.modular_addition(cfg.p, cfg.train_fraction)
    if tiny:
        samples = samples.select(range(0, len(samples), 8))
    layers = tuple(range(cfg.model_config().n_layers))
    cap = capture(model, samples, CaptureSpec(hidden_layers=layers), device="cpu")
    return samples, cap, layers, cfg.p


def drifted(x: torch.Tensor, n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = [x]
    for _ in range(n - 1):
        out.append(out[-1] + 0.05 * x.std() * torch.randn(x.shape, generator=g))
    return out


def main():
    args = _timing.arguments(__doc__).parse_args()
    _timing.set_thread_budget(args.threads)
    _timing.header(f"representations: AlignedUMAP / PCA layouts (torch {torch.__version__}, CPU)", args.threads)
    samples, cap, layers, period = states_case(args.tiny)
    n_embedded, n_checkpoints = (3, 4) if args.tiny else (12, 39)
    series = drifted(cap.hidden[layers[-1]], n_embedded)
    if args.tiny:  # umap-learn's numba compilation alone takes a minute: the smoke run stands PCA in for it
        umap = aligned_pca
        print("   tiny: PCA stands in for AlignedUMAP (tests/test_representations.py runs AlignedUMAP)")
    else:
        umap = partial(aligned_umap, seed=0)
        t = time.perf_counter()
        umap(series[:2])  # numba compiles umap-learn's kernels on first use
        print(f"   umap-learn's first call (numba compilation and a 2-checkpoint fit): {time.perf_counter() - t:.1f} s")
    limits = _timing.limits(args)
    if not args.tiny and args.max_rounds is None:  # a UMAP round takes seconds, and its ratio is in the hundreds
        limits.update(max_rounds=5, min_rounds=3)
    layout = _timing.side_by_side({"umap": lambda: umap(series), "pca": lambda: aligned_pca(series)},
                                  "pca", **limits)
    _timing.report(f"layout, AlignedUMAP / PCA ({len(samples)} samples x {n_embedded} checkpoints)", layout, "umap")

    m = Representations(layers=layers, embed_layers=layers[-1:], embed_steps=(), period=period)
    ctx = StepContext(run=None, checkpoint=None, model=None, device=torch.device("cpu"), store=None, progress=False,
                      given_samples=samples)

    def measurement(layout_fn):
        for _ in range(n_checkpoints):
            m.measure(cap, ctx)
        layout_fn(series)

    whole = _timing.side_by_side({"umap": lambda: measurement(umap),
                                  "pca": lambda: measurement(aligned_pca)}, "pca", **limits)
    _timing.report(f"measurement, with AlignedUMAP / with PCA ({n_checkpoints} checkpoints x {len(layers)} blocks, "
                   f"{n_embedded} laid out)", whole, "umap")
    _timing.footer()


if __name__ == "__main__":
    main()
