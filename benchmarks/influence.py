"""EK-FAC influence: this project against kronfluence 1.0.1 on the same model, data, strategy and damping.

Both fit EK-FAC factors on 4,096 documents and score 64 queries against them, side by side in one process:
- the model: a random-weight GPT-NeoX language model (4 layers, d_model 128, MLP width 512, vocabulary
  4,096; 1.8M parameters), tracking the 8 MLP linear layers in both tools;
- the data: token sequences of 16 tokens drawn from a random bigram chain (documents and queries alike);
- the loss: summed next-token cross-entropy; true Fisher (labels sampled from the model, with a sampler
  seeded by the batch's content so both tools draw the same labels); damping 0.1 × mean eigenvalue per
  layer (kronfluence: ``damping_factor=None``); float32; batches of 32 documents, one batch of 64 queries.
kronfluence's gc.collect() / torch.compiler.reset() calls between phases are skipped (about 0.5 s each here,
not part of the method). Prints both times, their ratio (target <= 0.7) and the Pearson correlation of the
two score matrices (target >= 0.99).

    python benchmarks/influence.py            # the full size (several minutes on 2 CPU cores)
    python benchmarks/influence.py --quick    # 512 documents, 16 queries: a smoke run
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from types import SimpleNamespace
from unittest import mock

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from workbench.probes.influence import fit_factors, pairwise_scores

LENGTH, VOCAB, BATCH = 16, 4096, 32


def make_model():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                           intermediate_size=512, max_position_embeddings=64)
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
    return scores, t1 - t0, time.perf_counter() - t1


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
        kmodel = prepare_model(model, task)
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
    return scores, t1 - t0, t2 - t1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="512 documents and 16 queries")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n_docs, n_queries = (512, 16) if args.quick else (4096, 64)
    docs, queries = bigram_tokens(n_docs, 1), bigram_tokens(n_queries, 2)
    model = make_model()
    total = sum(p.numel() for p in model.parameters())
    tracked = sum(p.numel() for n, p in model.named_parameters() if ".mlp." in n)
    print(f"GPT-NeoX {total / 1e6:.2f}M parameters, tracking the MLP linear layers ({tracked / 1e6:.2f}M, "
          f"{100 * tracked / total:.0f}%); {n_queries} queries x {n_docs} documents of {LENGTH} tokens; EK-FAC, "
          f"true Fisher, damping 0.1 x mean eigenvalue; {torch.get_num_threads()} CPU threads")
    a, a_fit, a_score = ours(model, docs, queries)
    b, b_fit, b_score = theirs(model, docs, queries)
    r = float(torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1])
    per_query = [float(torch.corrcoef(torch.stack([a[q].double(), b[q].double()]))[0, 1]) for q in range(len(a))]
    print(f"{'':18}{'workbench':>12}{'kronfluence':>14}{'ratio':>8}")
    for name, x, y in (("fit factors (s)", a_fit, b_fit), ("score (s)", a_score, b_score),
                       ("total (s)", a_fit + a_score, b_fit + b_score)):
        print(f"{name:18}{x:12.1f}{y:14.1f}{x / y:8.2f}")
    print(f"time ratio (workbench / kronfluence): {(a_fit + a_score) / (b_fit + b_score):.2f}  (target <= 0.7)")
    print(f"Pearson of the score matrices: {r:.5f}  (target >= 0.99); per query: min {min(per_query):.5f}")
    print(f"max |difference| / max |score|: {float((a - b).abs().max() / b.abs().max()):.2e}")


if __name__ == "__main__":
    main()
