"""EK-FAC influence: this project against kronfluence 1.0.1 on the same model, data, strategy and damping.

Both fit EK-FAC factors on 4,096 documents and score 64 queries against them, side by side in one process:
- the model: a random-weight GPT-NeoX language model (4 layers, d_model 128, MLP width 512, vocabulary
  4,096; 1.8M parameters), tracking the 8 MLP linear layers in both tools;
- the data: token sequences of 16 tokens drawn from a random bigram chain (documents and queries alike);
- the loss: summed next-token cross-entropy; true Fisher (labels sampled from the model, with a sampler
  seeded by the batch's content so both tools draw the same labels); damping 0.1 × mean eigenvalue per
  layer (kronfluence: ``damping_factor=None``); float32; batches of 32 documents, one batch of 64 queries.
kronfluence's gc.collect() / torch.compiler.reset() calls between phases are skipped (about 0.5 s each here,
not part of the method); its factors and scores are written to a temporary folder, as it always does.
Both run on the same thread budget (torch's intra-op threads), after a warm-up call each, in interleaved
rounds (``_timing``): the ratios printed are medians of paired ratios with their quartiles, for the whole
and for each phase (fit, score). Beside the time, the peak memory of each side (growth of the resident
set during its warm-up call): the workbench's fit keeps the covariance pass's per-example rows for the
eigenvalue pass instead of recomputing them, and that cache is part of its speed. Target <= 0.7 in time;
the Pearson correlation of the two score matrices >= 0.99.

    python benchmarks/influence.py            # the full size (tens of minutes on 2 CPU cores)
    python benchmarks/influence.py --quick    # 512 documents, 16 queries
    python benchmarks/influence.py --tiny     # 64 documents, 8 queries: a smoke run
"""

from __future__ import annotations

import copy
import tempfile
import time
import warnings
from types import SimpleNamespace
from unittest import mock

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

import _timing
from workbench.probes.influence import fit_factors, pairwise_scores

LENGTH, VOCAB, BATCH = 16, 4096, 32


def make_model(tiny: bool = False):
    import transformers as tf

    torch.manual_seed(0)
    width = 32 if tiny else 128
    cfg = tf.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=width, num_hidden_layers=2 if tiny else 4,
                           num_attention_heads=4, intermediate_size=4 * width, max_position_embeddings=64)
    return tf.AutoModelForCausalLM.from_config(cfg).eval()


def bigram_tokens(n: int, seed: int) -> torch.Tensor:
    """Sequences from a sparse random bigram chain (each token has 8 likely successors)."""
    g = torch.Generator().manual_seed(1234)
    succ = torch.randint(0, VOCAB, (VOCAB, 8), generator=g)
    g.manual_seed(seed)
    ids = torch.empty(n, LENGTH, dtype=torch.long)
    ids[:, 0] = torch.randint(0, VOCAB, (n,), generator=g)
    for t in range(1, LENGTH):
        ids[:, t] = succ[ids[:, t - 1], torch.randint(0, 8, (n,), generator=g)]
    return ids


def lm_loss(model, batch, sample=False):
    """Summed next-token cross-entropy; sampled labels are seeded by the batch itself (same in both tools)."""
    ids = batch["input_ids"]
    logits = model(input_ids=ids).logits[:, :-1]
    targets = ids[:, 1:]
    if sample:
        with torch.no_grad():
            g = torch.Generator(device=ids.device).manual_seed(int(ids.sum()) * 31 + ids.shape[0])
            probs = torch.softmax(logits.detach().float().reshape(-1, VOCAB), -1)
            targets = torch.multinomial(probs, 1, generator=g).reshape(targets.shape)
    return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1), reduction="sum")


def mlp_modules(model):
    return [f"gpt_neox.layers.{i}.mlp.{n}" for i in range(len(model.gpt_neox.layers))
            for n in ("dense_h_to_4h", "dense_4h_to_h")]


class Rows(Dataset):
    def __init__(self, ids):
        self.ids = ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i]}


def ours(model, docs, queries):
    doc_batches = [{"input_ids": docs[i:i + BATCH]} for i in range(0, len(docs), BATCH)]
    t0 = time.perf_counter()
    factors = fit_factors(model, doc_batches, loss_fn=lm_loss, strategy="ekfac", modules=mlp_modules(model),
                          fisher="true", progress=False, report=False)
    t1 = time.perf_counter()
    scores = pairwise_scores(model, factors, [{"input_ids": queries}], doc_batches, loss_fn=lm_loss, progress=False)
    return scores, _timing.Phases(fit=t1 - t0, score=time.perf_counter() - t1)


def theirs(model, docs, queries):
    import kronfluence.utils.state as kstate
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    names = mlp_modules(model)

    class LMTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            return lm_loss(model, batch, sample)

        def compute_measurement(self, batch, model):
            return lm_loss(model, batch)

        def get_influence_tracked_modules(self):
            return names

    task = LMTask()
    with tempfile.TemporaryDirectory() as out, warnings.catch_warnings(), \
            mock.patch.object(kstate, "gc", SimpleNamespace(collect=lambda: 0)), \
            mock.patch.object(torch.compiler, "reset", lambda: None):
        warnings.simplefilter("ignore", FutureWarning)  # torch.cuda.amp.GradScaler is deprecated in torch 2.13
        kmodel = prepare_model(copy.deepcopy(model), task)  # it wraps the modules in place: on a copy
        an = Analyzer("bench", kmodel, task, output_dir=out, disable_tqdm=True, disable_model_save=True)
        t0 = time.perf_counter()
        an.fit_all_factors("f", Rows(docs), per_device_batch_size=BATCH, overwrite_output_dir=True,
                           factor_args=FactorArguments(strategy="ekfac", use_empirical_fisher=False))
        t1 = time.perf_counter()
        an.compute_pairwise_scores("s", "f", query_dataset=Rows(queries), train_dataset=Rows(docs),
                                   per_device_query_batch_size=len(queries), per_device_train_batch_size=BATCH,
                                   overwrite_output_dir=True, score_args=ScoreArguments(damping_factor=None))
        t2 = time.perf_counter()
        scores = an.load_pairwise_scores("s")["all_modules"]
    return scores, _timing.Phases(fit=t1 - t0, score=t2 - t1)


def main() -> None:
    ap = _timing.arguments(__doc__)
    ap.add_argument("--quick", action="store_true", help="512 documents and 16 queries")
    args = ap.parse_args()
    _timing.set_thread_budget(args.threads)
    _timing.header("EK-FAC influence: workbench against kronfluence 1.0.1", args.threads)
    n_docs, n_queries = (64, 8) if args.tiny else (512, 16) if args.quick else (4096, 64)
    docs, queries = bigram_tokens(n_docs, 1), bigram_tokens(n_queries, 2)
    model = make_model(args.tiny)
    total = sum(p.numel() for p in model.parameters())
    tracked = sum(p.numel() for n, p in model.named_parameters() if ".mlp." in n)
    print(f"   GPT-NeoX {total / 1e6:.2f}M parameters, tracking the MLP linear layers ({tracked / 1e6:.2f}M, "
          f"{100 * tracked / total:.0f}%); {n_queries} queries x {n_docs} documents of {LENGTH} tokens; EK-FAC, "
          f"true Fisher, damping 0.1 x mean eigenvalue; batches of {BATCH}")
    scores = {}

    def side(name, fn):
        def run():
            scores[name], phases = fn(model, docs, queries)
            return phases
        return run

    cmp = _timing.side_by_side({"workbench": side("workbench", ours), "kronfluence": side("kronfluence", theirs)},
                               "kronfluence", memory=True, max_seconds=1800, **_timing.limits(args))
    _timing.report("influence EK-FAC fit + score, workbench / kronfluence", cmp, "workbench", target="<= 0.7")
    a, b = scores["workbench"], scores["kronfluence"]
    r = float(torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1])
    per_query = [float(torch.corrcoef(torch.stack([a[q].double(), b[q].double()]))[0, 1]) for q in range(len(a))]
    print(f"   Pearson of the score matrices: {r:.5f} (target >= 0.99); per query: min {min(per_query):.5f}; "
          f"max |difference| / max |score|: {float((a - b).abs().max() / b.abs().max()):.2e}")
    _timing.footer()


if __name__ == "__main__":
    main()
