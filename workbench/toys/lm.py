"""The built-in language-model run: the MoE transformer pretrained on the synthetic corpus, with checkpoints.

``ensure_lm_run()`` trains a small decoder-only :class:`~workbench.models.toy.ToyMoETransformer` (a learned
linear router per layer, fused 3-D expert weights) on the documents of :mod:`workbench.toys.corpus` with
next-token cross-entropy, saves checkpoints in the built-in run format (what :meth:`workbench.Run.from_folder`
reads), and returns the run; later calls, notebooks and tests reuse it. The folder under
``$WORKBENCH_HOME/runs`` carries a hash of the settings and is written behind a file lock, like
:func:`workbench.toys.ensure_run`. ``WORKBENCH_QUICK=1`` picks :data:`LM_QUICK`, a smaller corpus and a
shorter training for tests.

Besides the usual ``run.json``, ``samples.parquet`` (the documents) and ``step_NNNNNN/``, the folder holds
``documents.parquet`` and ``queries.parquet`` (the corpus tables; queries carry whether the model answers
them right at each checkpoint) and the tokenizer's vocabulary in ``run.json``. :func:`lm_corpus` reads them
back. Queries are *selected* among the candidates the corpus generates: those the last checkpoint answers
right (greedy decoding reproduces the whole completion), up to the configured numbers.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import polars as pl
import torch
import torch.nn.functional as F

from workbench.errors import InputError
from workbench.models.toy import ToyConfig, ToyMoETransformer
from workbench.runs import Run
from workbench.samples import IGNORE, SampleSet
from workbench.toys.cache import config_folder, ensure_trained, pinned_threads, quick_from_env
from workbench.toys.corpus import Corpus, CorpusConfig, WordTokenizer, make_corpus
from workbench.toys.train import RUN_FORMAT, adamw, building, save_checkpoint, train_loop


@dataclass(frozen=True)
class LMConfig:
    """Settings of the built-in language-model run. Defaults are the full run; :data:`LM_QUICK` the test run."""

    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    steps: int = 2400
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    warmup: int = 100
    grad_clip: float = 1.0
    seed: int = 0
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 3
    n_experts: int = 4
    top_k: int = 2
    d_expert: int = 64
    n_checkpoints: int = 8
    name: str = "corpus-lm"

    def model_config(self, vocab_size: int, n_ctx: int) -> ToyConfig:
        return ToyConfig(vocab_size=vocab_size, n_ctx=n_ctx, d_model=self.d_model, n_heads=self.n_heads,
                         n_layers=self.n_layers, n_experts=self.n_experts, top_k=self.top_k,
                         d_expert=self.d_expert, layer_norm=True)


#: The full built-in LM run (about 890 documents).
LM_DEMO = LMConfig()
#: A short run for tests and quick notebook execution: a smaller corpus, fewer steps and checkpoints.
LM_QUICK = LMConfig(
    corpus=CorpusConfig(n_entities=12, attributes=("color", "city"), procedural_per_task=160,
                        n_factual_queries=8, n_reasoning_queries=4),
    steps=900, n_checkpoints=4, name="corpus-lm-quick",
)


def run_folder(cfg: LMConfig, root: str | os.PathLike | None = None) -> Path:
    return config_folder(cfg, root)


def ensure_lm_run(config: LMConfig | None = None, *, quick: bool | None = None,
                  root: str | os.PathLike | None = None, retrain: bool = False, progress: bool = True):
    """The built-in LM run as a :class:`workbench.Run`, trained first if needed.

    ``quick`` (default: the environment variable ``WORKBENCH_QUICK`` is 1) picks :data:`LM_QUICK`.
    """
    if config is None:
        config = LM_QUICK if quick_from_env(quick) else LM_DEMO
    folder = run_folder(config, root)
    ensure_trained(folder, lambda: train_lm(config, folder, progress=progress), retrain)
    return Run.from_folder(folder)


# --- evaluation ---------------------------------------------------------------------------------------------
def _batches(n: int, size: int):
    return [list(range(i, min(n, i + size))) for i in range(0, n, size)]


@torch.no_grad()
def completion_correct(model: torch.nn.Module, queries: SampleSet, batch_size: int = 256) -> torch.Tensor:
    """Whether greedy decoding reproduces each query's completion, token for token: [queries] bool.

    Teacher forcing gives the same answer in one pass: greedy decoding follows the completion exactly when
    the arg-max at every completion position is the completion's next token.
    """
    out = torch.zeros(len(queries), dtype=torch.bool)
    for idx in _batches(len(queries), batch_size):
        x, y, mask = queries.padded(idx)
        pred = model(x, attention_mask=mask).logits.argmax(-1)
        scored = y != IGNORE
        out[idx] = ((pred == y) | ~scored).all(1)
    return out


@torch.no_grad()
def mean_token_loss(model: torch.nn.Module, samples: SampleSet, batch_size: int = 256) -> float:
    total, count = 0.0, 0
    for idx in _batches(len(samples), batch_size):
        x, y, mask = samples.padded(idx)
        logits = model(x, attention_mask=mask).logits
        total += F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE, reduction="sum").item()
        count += int((y != IGNORE).sum())
    return total / max(count, 1)


def lm_checkpoint_steps(total: int, n: int) -> list[int]:
    """``n`` steps from 0 to ``total``, quadratically spaced: dense early, where facts are being learned."""
    return sorted({round(total * (i / (n - 1)) ** 2) for i in range(n)}) if n > 1 else [total]


def _epoch(lengths: torch.Tensor, batch_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    """One epoch of shuffled batches of documents of similar length (short factual documents then cost
    little padding next to long worked examples); the batches come out in random order."""
    perm = torch.randperm(len(lengths), generator=gen)
    chunk = batch_size * 8
    out = []
    for i in range(0, len(perm), chunk):
        part = perm[i:i + chunk]
        part = part[torch.argsort(lengths[part], stable=True)]
        out += list(part.split(batch_size))
    return [out[i] for i in torch.randperm(len(out), generator=gen).tolist()]


# --- training -----------------------------------------------------------------------------------------------
@pinned_threads()
def train_lm(cfg: LMConfig, out_dir: str | os.PathLike, progress: bool = True) -> Path:
    """Train the run and save it to ``out_dir`` (through a temporary folder renamed at the end)."""
    with building(out_dir) as tmp:
        _train_lm(cfg, tmp, progress)
    return Path(out_dir)


def _train_lm(cfg: LMConfig, tmp: Path, progress: bool) -> None:

    corpus = make_corpus(cfg.corpus)
    docs = corpus.document_samples()
    queries = corpus.query_samples()
    docs.save(tmp / "samples.parquet")
    n_ctx = corpus.max_length()
    model_cfg = cfg.model_config(len(corpus.tokenizer), n_ctx)
    torch.manual_seed(cfg.seed)
    model = ToyMoETransformer(model_cfg)
    opt = adamw(model, cfg.lr, cfg.weight_decay, cfg.betas, foreach=True)
    # Linear warmup, then cosine decay to a tenth: the late checkpoints settle instead of bouncing.
    def lr_at(s: int) -> float:
        if s < cfg.warmup:
            return (s + 1) / cfg.warmup
        t = (s - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    steps = lm_checkpoint_steps(cfg.steps, cfg.n_checkpoints)
    # Pre-pad the whole corpus once; a batch is rows of it cut to the batch's longest document.
    x_all, y_all, _ = docs.padded(list(range(len(docs))))
    lengths = torch.as_tensor(docs.lengths)
    gen = torch.Generator().manual_seed(cfg.seed)
    batches: list[torch.Tensor] = []
    kinds = corpus.queries["kind"].to_list()
    history, correct_at = [], {}

    def on_checkpoint(step: int) -> dict:
        correct = completion_correct(model, queries)
        correct_at[step] = correct
        fact = [c for c, k in zip(correct.tolist(), kinds) if k == "factual"]
        reas = [c for c, k in zip(correct.tolist(), kinds) if k == "reasoning"]
        metrics = dict(doc_loss=mean_token_loss(model, docs), factual_acc=sum(fact) / max(1, len(fact)),
                       reasoning_acc=sum(reas) / max(1, len(reas)))
        history.append({"step": step, **metrics})
        save_checkpoint(tmp, step, model, metrics)
        return dict(loss=f"{metrics['doc_loss']:.2f}", fact=f"{metrics['factual_acc']:.2f}",
                    reason=f"{metrics['reasoning_acc']:.2f}")

    def batch_loss() -> torch.Tensor:
        nonlocal batches
        if not batches:
            batches = _epoch(lengths, cfg.batch_size, gen)
        idx = batches.pop()
        width = int(lengths[idx].max())
        x, y = x_all[idx, :width], y_all[idx, :width]
        logits = model(x).logits
        return F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE)

    seconds = train_loop(model, opt, sched, steps=cfg.steps, checkpoints=steps, batch_loss=batch_loss,
                         on_checkpoint=on_checkpoint, grad_clip=cfg.grad_clip, desc=f"training {cfg.name}",
                         progress=progress)

    # Select the queries the last checkpoint answers right, up to the configured numbers per kind and task.
    q = corpus.queries.with_columns(
        *[pl.Series(f"correct_{s}", correct_at[s].tolist()) for s in steps])
    final = pl.col(f"correct_{steps[-1]}")
    want = pl.when(pl.col("kind") == "factual").then(cfg.corpus.n_factual_queries).otherwise(
        cfg.corpus.n_reasoning_queries)
    # Factual queries are picked across attributes (one quota for all), reasoning queries per task.
    part = pl.when(pl.col("kind") == "factual").then(pl.lit("factual")).otherwise(pl.col("task"))
    q = q.with_columns(selected=final & (final.cum_sum().over(part) <= want))
    q.write_parquet(tmp / "queries.parquet")
    corpus.documents.write_parquet(tmp / "documents.parquet")
    meta = {
        "format": RUN_FORMAT,
        "kind": "builtin",
        "name": cfg.name,
        "task": "corpus_lm",
        "model": model_cfg.to_dict(),
        "training": asdict(cfg),
        "vocab": corpus.tokenizer.vocab,
        "steps": steps,
        "seconds": round(seconds, 1),
        "history": history,
        "queries": {"candidates": q.height, "selected": int(q["selected"].sum()),
                    "correct_final": int(q[f"correct_{steps[-1]}"].sum())},
    }
    (tmp / "run.json").write_text(json.dumps(meta, indent=1))


# --- reading a run's corpus back ------------------------------------------------------------------------------
def lm_corpus(run, *, selected_only: bool = True) -> Corpus:
    """The corpus a built-in LM run was trained on: tokenizer, documents and (selected) queries."""
    info = run.info
    if info.get("task") != "corpus_lm":
        raise InputError(
            f"run {run.name!r} is not a built-in language-model run (its task is {info.get('task')!r}); "
            "use workbench.toys.lm.ensure_lm_run()"
        )
    root = Path(run.checkpoints[0].source).parent
    queries = pl.read_parquet(root / "queries.parquet")
    if selected_only:
        queries = queries.filter(pl.col("selected"))
    cfg = CorpusConfig.from_dict(info["training"]["corpus"])
    return Corpus(cfg, WordTokenizer(info["vocab"][2:]), pl.read_parquet(root / "documents.parquet"), queries,
                  extra={"run": run.name})


__all__ = ["LMConfig", "LM_DEMO", "LM_QUICK", "completion_correct", "ensure_lm_run", "lm_corpus",
           "train_lm"]
