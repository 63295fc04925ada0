"""Confidence from a model: option probabilities, self-consistency, stated confidence."""

import math

import pytest
import torch

from workbench.errors import InputError
from workbench.probes.calibration.confidence import (
    choice_confidence,
    multiple_choice,
    option_probabilities,
    parse_confidence,
    parse_stated_confidence,
    sample_answers,
    score_options,
    self_consistency,
    softmax_confidence,
)
from workbench.models.toy import ToyConfig, ToyMoETransformer


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ToyMoETransformer(ToyConfig(vocab_size=13, n_ctx=8, d_model=16, n_heads=2, n_layers=2, n_experts=4,
                                       d_expert=16)).eval()


# --- multiple choice ------------------------------------------------------------------------------------------
def test_option_probabilities_by_hand_with_and_without_length_normalization():
    ll = torch.tensor([[-1.0, -2.0], [-3.0, float("-inf")]])
    p = option_probabilities(ll)
    assert p[0].tolist() == pytest.approx([1 / (1 + math.exp(-1)), 1 / (1 + math.exp(1))])
    assert p[1].tolist() == [1.0, 0.0]  # an absent option gets nothing
    n = torch.tensor([[1, 4], [3, 0]])
    pn = option_probabilities(ll, n, length_normalize=True)  # per token: -1 vs -0.5: the long option wins
    assert pn[0].tolist() == pytest.approx([1 / (1 + math.exp(0.5)), 1 / (1 + math.exp(-0.5))])
    choice, conf = choice_confidence(ll, n, length_normalize=True)
    assert choice.tolist() == [1, 0] and conf[1] == 1.0


def test_option_probabilities_bad_input():
    with pytest.raises(InputError, match="NaN"):
        option_probabilities(torch.tensor([[float("nan"), -1.0]]))
    with pytest.raises(InputError, match="no option"):
        option_probabilities(torch.tensor([[float("-inf"), float("-inf")]]))
    with pytest.raises(InputError, match="n_tokens"):
        option_probabilities(torch.tensor([[-1.0, -2.0]]), length_normalize=True)


def test_score_options_is_the_summed_log_probability_of_each_option(model):
    prompts = [[1, 2, 3], [4, 5]]
    options = [[[6], [7, 8], [9, 10, 11]], [[12, 1]]]
    scores = score_options(model, prompts, options, device="cpu")
    assert scores.n_tokens.tolist() == [[1, 2, 3], [2, 0, 0]]
    assert scores.loglik[1, 1] == float("-inf")
    with torch.no_grad():
        for i, p in enumerate(prompts):
            for k, o in enumerate(options[i]):
                full = torch.tensor([p + o])
                logp = torch.log_softmax(model(input_ids=full).logits[0].double(), -1)
                want = sum(float(logp[len(p) - 1 + t, tok]) for t, tok in enumerate(o))
                assert float(scores.loglik[i, k]) == pytest.approx(want, abs=1e-4)


def test_multiple_choice_confidence_and_correctness(model):
    prompts = [[1, 2], [3, 4], [5, 6]]
    options = [[[7], [8]], [[9], [10], [11]], [[12], [1]]]
    mc = multiple_choice(model, prompts, options, answers=[0, 2, 1], device="cpu")
    assert mc.probs.shape == (3, 3)
    torch.testing.assert_close(mc.probs.sum(-1), torch.ones(3, dtype=mc.probs.dtype))
    assert mc.confidence.tolist() == mc.probs.max(-1).values.tolist()
    assert mc.correct.tolist() == (mc.choice == torch.tensor([0, 2, 1])).double().tolist()
    with pytest.raises(InputError, match="outside"):
        multiple_choice(model, prompts, options, answers=[0, 2, 2], device="cpu")
    with pytest.raises(InputError, match="option lists"):
        score_options(model, prompts, options[:2])
    with pytest.raises(InputError, match="no tokens"):
        score_options(model, [[1]], [[[]]])


def test_softmax_confidence():
    conf, pred, right = softmax_confidence(torch.tensor([[0.0, math.log(3)], [2.0, 0.0]]), torch.tensor([1, 1]))
    assert conf[0] == pytest.approx(0.75) and pred.tolist() == [1, 0] and right.tolist() == [1.0, 0.0]


# --- self-consistency ----------------------------------------------------------------------------------------------
def test_self_consistency_by_hand():
    sc = self_consistency(torch.tensor([[1, 1, 2, 3], [5, 6, 6, 5], [4, 4, 4, 4]]))
    assert [int(a) for a in sc.answer] == [1, 5, 4]  # a 2-2 tie goes to the answer sampled first
    assert sc.agreement.tolist() == [0.5, 0.5, 1.0]
    seqs = torch.tensor([[[1, 2], [1, 3], [1, 2]]])  # token sequences are compared whole
    sc2 = self_consistency(seqs)
    assert sc2.answer[0].tolist() == [1, 2] and float(sc2.agreement[0]) == pytest.approx(2 / 3)


def test_self_consistency_of_text_answers_leaves_out_missing_ones():
    sc = self_consistency([["a", "b", "a", None], [None, None], ["x", "y"]])
    assert sc.answer == ["a", None, "x"]
    assert sc.agreement[0] == pytest.approx(2 / 3) and math.isnan(sc.agreement[1]) and sc.agreement[2] == 0.5
    assert sc.n_valid.tolist() == [3, 0, 2]
    with pytest.raises(InputError, match="list of sampled answers"):
        self_consistency(["abc"])
    with pytest.raises(InputError):
        self_consistency([])


def test_sampled_answers_are_seeded_greedy_at_zero_temperature_and_agree_like_the_top_probability(model):
    prompts = [[1, 2, 3], [4, 5, 6], [7, 8]]
    a = sample_answers(model, prompts, n_samples=6, max_new_tokens=2, seed=3, device="cpu")
    assert a.shape == (3, 6, 2)
    assert torch.equal(a, sample_answers(model, prompts, n_samples=6, max_new_tokens=2, seed=3, device="cpu"))
    greedy = sample_answers(model, prompts, n_samples=3, max_new_tokens=1, temperature=0, device="cpu")
    with torch.no_grad():
        want = [int(model(input_ids=torch.tensor([p])).logits[0, -1].argmax()) for p in prompts]
    assert greedy[:, :, 0].tolist() == [[w] * 3 for w in want]
    assert self_consistency(greedy).agreement.tolist() == [1.0, 1.0, 1.0]
    # one-token answers: the majority's share converges to the top probability
    many = sample_answers(model, prompts[:1], n_samples=4000, seed=0, device="cpu")
    with torch.no_grad():
        top = float(torch.softmax(model(input_ids=torch.tensor(prompts[:1])).logits[0, -1], -1).max())
    assert float(self_consistency(many[:, :, 0]).agreement[0]) == pytest.approx(top, abs=0.03)


def test_sampling_fills_after_the_end_token(model):
    a = sample_answers(model, [[1, 2]], n_samples=50, max_new_tokens=3, seed=0, eos_token_id=5, device="cpu")
    for row in a[0].tolist():
        if 5 in row:
            assert all(t == 5 for t in row[row.index(5):])


# --- stated confidence -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,value", [
    ("85%", 0.85),
    ("0.85", 0.85),
    (".85", 0.85),
    ("confidence: 8/10", 0.8),
    ("Confidence: 8 out of 10", 0.8),
    ("I am 85% confident", 0.85),
    ("85.5 percent", 0.855),
    ("The answer is 42. Confidence: 0.9", 0.9),
    ("The answer is 0.5; I am 90% sure.", 0.9),
    ("Answer: 1/2. Confidence: 90%", 0.9),
    ("Confidence level (0-1): 0.8", 0.8),
    ("answer 3.14, 0.9", 0.9),  # a decimal above 1 is not a confidence
    ("90%, i.e. 0.9", 0.9),  # one value written twice
    ("1.0", 1.0),
    ("0%", 0.0),
])
def test_parse_confidence_reads_common_forms(text, value):
    assert parse_confidence(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["no idea", "0.5 or 90%", "90% and 80%", "120%", "confidence: 7/0",
                                  "Confidence: 85", "somewhere around high", ""])
def test_parse_confidence_never_guesses(text):
    assert parse_confidence(text) is None


def test_bare_integers_need_a_scale_and_a_keyword():
    assert parse_confidence("Confidence: 85", integer_scale=100) == pytest.approx(0.85)
    assert parse_confidence("Confidence: 9", integer_scale=10) == pytest.approx(0.9)
    assert parse_confidence("Confidence: 9", integer_scale=100) == pytest.approx(0.09)
    assert parse_confidence("The answer is 85", integer_scale=100) is None  # no keyword: an answer, not a confidence
    assert parse_confidence("Confidence: 150", integer_scale=100) is None


def test_unparseable_answers_are_left_out_and_counted():
    texts = ["Confidence: 80%", "I don't know", "0.3", "maybe 50% or 60%", "confidence 9/10"]
    out = parse_stated_confidence(texts)
    assert out.values.tolist() == pytest.approx([0.8, 0.3, 0.9])
    assert out.index.tolist() == [0, 2, 4]
    assert out.unparsed == [1, 3] and out.n_unparsed == 2 and out.parsed_share == pytest.approx(0.6)
    with pytest.raises(InputError, match="list of texts"):
        parse_stated_confidence("85%")
    with pytest.raises(InputError, match="text"):
        parse_confidence(0.85)
