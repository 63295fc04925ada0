"""Capture against plain forwards computed here, one sample at a time, without padding."""

import pytest
import torch
import torch.nn.functional as F

from tests.tiny_models import DENSE_KINDS, MOE_KINDS, random_tokens, tiny_model
from workbench import CaptureSpec, SampleSet, capture
from workbench.errors import InputError, NotMoEError, TokenizerMismatchError
from workbench.toys import ToyConfig, ToyMoETransformer, modular_addition


def reference_routing(model, tokens, weights="softmax"):
    """Router softmax per layer, averaged over the sample's tokens, from output_router_logits=True."""
    out = []
    for t in tokens:
        logits = model(torch.tensor([t]), output_router_logits=True).router_logits
        per_layer = []
        for lg in logits:
            p = torch.softmax(lg.float(), -1)
            if weights == "topk":
                k = model.config.num_experts_per_tok
                w, i = torch.topk(p, k, -1)
                if getattr(model.config, "norm_topk_prob", True):
                    w = w / w.sum(-1, keepdim=True)
                p = torch.zeros_like(p).scatter(-1, i, w)
            per_layer.append(p.mean(0))
        out.append(torch.stack(per_layer))
    return torch.stack(out)


@pytest.mark.parametrize("kind", MOE_KINDS)
def test_routing_matches_output_router_logits(kind):
    model = tiny_model(kind)
    tokens = random_tokens(12)
    samples = SampleSet.from_token_lists(tokens)
    # a small token budget forces several padded batches of different widths
    cap = capture(model, samples, CaptureSpec(routing=True), token_budget=40)
    with torch.no_grad():
        ref = reference_routing(model, tokens)
    assert cap.routing.shape == (12, 3, 8)
    torch.testing.assert_close(cap.routing, ref, atol=1e-5, rtol=1e-5)
    assert cap.moe_layers == [0, 1, 2]
    assert len(cap.router_matrices) == 3 and cap.router_matrices[0].shape == (8, 32)


def test_topk_weights_match_the_models_own_renormalization():
    model = tiny_model("mixtral")
    tokens = random_tokens(6, seed=3)
    cap = capture(model, SampleSet.from_token_lists(tokens), CaptureSpec(routing=True, routing_weights="topk"))
    with torch.no_grad():
        ref = reference_routing(model, tokens, weights="topk")
    torch.testing.assert_close(cap.routing, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cap.routing.sum(-1), torch.ones(6, 3))


@pytest.mark.parametrize("kind", ("olmoe", "llama"))
def test_loss_and_accuracy_match_an_unpadded_forward(kind):
    model = tiny_model(kind)
    tokens = random_tokens(10, seed=1)
    cap = capture(model, SampleSet.from_token_lists(tokens), token_budget=30)
    with torch.no_grad():
        for i, t in enumerate(tokens):
            x = torch.tensor([t])
            logits = model(x).logits[0, :-1]
            target = x[0, 1:]
            assert cap.loss[i].item() == pytest.approx(F.cross_entropy(logits, target).item(), rel=1e-5)
            acc = (logits.argmax(-1) == target).float().mean().item()
            assert cap.accuracy[i].item() == pytest.approx(acc)
            assert cap.confidence[i].item() == pytest.approx(torch.softmax(logits, -1).max(-1).values.mean().item(), rel=1e-5)
            assert int(cap.n_scored[i]) == len(t) - 1


def test_hidden_states_last_and_mean_match_output_hidden_states():
    model = tiny_model("olmoe")
    tokens = random_tokens(8, seed=2)
    s = SampleSet.from_token_lists(tokens)
    last = capture(model, s, CaptureSpec(hidden_layers=(0, -1)), token_budget=30)
    mean = capture(model, s, CaptureSpec(hidden_layers=(1,), hidden_reduce="mean"), token_budget=30)
    assert sorted(last.hidden) == [0, 2]
    with torch.no_grad():
        for i, t in enumerate(tokens):
            hs = model(torch.tensor([t]), output_hidden_states=True).hidden_states  # embeddings, then each block
            torch.testing.assert_close(last.hidden[0][i], hs[1][0, -1], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(mean.hidden[1][i], hs[2][0].mean(0), atol=1e-5, rtol=1e-5)


def test_batch_size_does_not_change_any_number():
    model = tiny_model("qwen2_moe")
    s = SampleSet.from_token_lists(random_tokens(20, seed=4))
    spec = CaptureSpec(routing=True, expert_load=True, hidden_layers=(1,))
    a = capture(model, s, spec, token_budget=16)
    b = capture(model, s, spec, token_budget=10_000)
    for name in ("loss", "accuracy", "confidence", "routing", "expert_load"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.hidden[1], b.hidden[1], atol=1e-5, rtol=1e-5)


def test_expert_load_counts_top_k_choices():
    model = tiny_model("olmoe")
    s = SampleSet.from_token_lists(random_tokens(5))
    cap = capture(model, s, CaptureSpec(routing=True, expert_load=True))
    torch.testing.assert_close(cap.expert_load.sum(-1), torch.full((5, 3), 2.0))


def test_builtin_model_capture_and_answer_only_scoring():
    torch.manual_seed(0)
    s = modular_addition(7, 0.5)
    m = ToyMoETransformer(ToyConfig(vocab_size=8, n_ctx=3))
    cap = capture(m, s, CaptureSpec(routing=True, hidden_layers=(-1,)))
    assert cap.routing.shape == (49, 4, 8)
    torch.testing.assert_close(cap.routing.sum(-1), torch.ones(49, 4))
    x, y, _ = s.padded(list(range(49)))
    with torch.no_grad():
        logits = m(x).logits[:, -1]
    torch.testing.assert_close(cap.loss, F.cross_entropy(logits, y[:, -1], reduction="none"), atol=1e-5, rtol=1e-5)
    assert (cap.n_scored == 1).all()


@pytest.mark.parametrize("kind", DENSE_KINDS)
def test_dense_model_in_a_routing_capture_is_a_clear_error(kind):
    model = tiny_model(kind)
    with pytest.raises(NotMoEError, match="no mixture-of-experts layers"):
        capture(model, SampleSet.from_token_lists(random_tokens(2)), CaptureSpec(routing=True))


def test_tokens_outside_the_vocabulary_name_the_tokenizer():
    model = tiny_model("llama")
    with pytest.raises(TokenizerMismatchError, match="vocabulary"):
        capture(model, SampleSet.from_token_lists([[5, 500, 7]]))


def test_missing_hidden_layer_is_a_clear_error():
    model = tiny_model("llama")
    with pytest.raises(InputError, match="does not exist"):
        capture(model, SampleSet.from_token_lists([[5, 6, 7]]), CaptureSpec(hidden_layers=(7,)))


@pytest.mark.gpu
def test_gpu_capture_matches_cpu():
    model = tiny_model("olmoe")
    s = SampleSet.from_token_lists(random_tokens(16))
    spec = CaptureSpec(routing=True, hidden_layers=(0,))
    cpu = capture(model, s, spec, device="cpu")
    gpu = capture(model, s, spec, device="cuda", autocast=False)
    torch.testing.assert_close(cpu.routing, gpu.routing, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cpu.loss, gpu.loss, atol=1e-4, rtol=1e-4)


def test_nan_logits_are_a_clear_error():
    from workbench.errors import NumericalError

    model = tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight[3] = float("nan")
    with pytest.raises(NumericalError, match="NaN or infinite logits"):
        capture(model, SampleSet.from_token_lists(random_tokens(4)))


def test_a_model_in_training_mode_is_captured_in_eval_mode():
    model = tiny_model("olmoe").train()
    s = SampleSet.from_token_lists(random_tokens(4))
    a = capture(model, s)
    assert not model.training
    torch.testing.assert_close(a.loss, capture(model, s).loss)


def test_applied_weights_and_load_match_each_sample_alone_in_chunks_of_layers(monkeypatch):
    """The top-k reductions (added up by expert, no [tokens, experts] tensor) and the scores (averaged before
    their normalization, layers in chunks) against each sample run alone with the routers' own outputs."""
    import importlib

    model = tiny_model("olmoe")
    tokens = random_tokens(7, seed=4)
    routers = [layer.mlp.gate for layer in model.model.layers]
    seen = []
    handles = [g.register_forward_hook(lambda m, i, o: seen.append(o)) for g in routers]
    ref = {"routing": [], "applied": [], "load": []}
    with torch.no_grad():
        for t in tokens:
            seen.clear()
            model(torch.tensor([t]))
            per = {name: [] for name in ref}
            for logits, w, i in seen:
                per["routing"].append(torch.softmax(logits.float(), -1).mean(0))
                per["applied"].append(torch.zeros_like(logits).scatter(-1, i, w).mean(0))
                per["load"].append(torch.zeros_like(logits).scatter(-1, i, 1.0).mean(0))
            for name in ref:
                ref[name].append(torch.stack(per[name]))
    for h in handles:
        h.remove()
    spec = CaptureSpec(routing=True, applied=True, expert_load=True)
    samples = SampleSet.from_token_lists(tokens)
    whole = capture(model, samples, spec, token_budget=40)
    # one layer per chunk (a chunk is smaller than one layer's scores)
    monkeypatch.setattr(importlib.import_module("workbench.capture"), "ROUTING_CHUNK", 1)
    chunked = capture(model, samples, spec, token_budget=40)
    for cap in (whole, chunked):
        for name, got in (("routing", cap.routing), ("applied", cap.applied), ("load", cap.expert_load)):
            torch.testing.assert_close(got, torch.stack(ref[name]), atol=1e-6, rtol=1e-5)
    assert float(whole.applied.sum()) > 0
