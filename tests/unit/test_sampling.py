import pytest
import torch

from splitwise.engine.sampling import NonFiniteLogits, SamplingParams, sample


@pytest.mark.parametrize(
    "params, message",
    [
        (SamplingParams(max_tokens=0), "max_tokens must be > 0"),
        (SamplingParams(max_tokens=10**9), "max_tokens must be <="),
        (SamplingParams(temperature=-0.5), "temperature must be >= 0"),
        (SamplingParams(temperature=float("nan")), "temperature"),
        (SamplingParams(top_p=0.0), "top_p must be in"),
        (SamplingParams(top_p=1.5), "top_p must be in"),
        (SamplingParams(top_k=-1), "top_k must be >= 0"),
        (SamplingParams(stop=("",)), "stop strings"),
        (SamplingParams(logprobs=True, top_logprobs=-1), r"top_logprobs must be in \[0, 20\]"),
        (SamplingParams(logprobs=True, top_logprobs=21), r"top_logprobs must be in \[0, 20\]"),
        (SamplingParams(top_logprobs=5), "top_logprobs=5 needs logprobs"),
    ],
)
def test_invalid_sampling_parameters_are_explained(params, message):
    with pytest.raises(ValueError, match=message):
        params.validate()


def test_greedy_picks_the_argmax_with_its_logprob():
    logits = torch.tensor([0.1, 3.0, 0.2])
    token = sample(logits, SamplingParams(), step=0)
    assert token.token_id == 1
    assert token.logprob == pytest.approx(float(torch.log_softmax(logits, -1)[1]))


def test_top_logprobs_are_the_topk_of_the_log_softmax_best_first_led_by_the_greedy_choice():
    logits = torch.randn(1000) * 3
    token = sample(logits, SamplingParams(logprobs=True, top_logprobs=5), step=0)
    expected = torch.topk(torch.log_softmax(logits, -1), 5)
    assert [t for t, _ in token.top_logprobs] == expected.indices.tolist()
    assert [lp for _, lp in token.top_logprobs] == pytest.approx(expected.values.tolist(), abs=1e-6)
    assert token.top_logprobs[0] == (token.token_id, pytest.approx(token.logprob))
    values = [lp for _, lp in token.top_logprobs]
    assert values == sorted(values, reverse=True)


def test_top_logprobs_of_a_sampled_token_come_from_the_untempered_log_softmax():
    logits = torch.randn(1000)
    params = SamplingParams(temperature=1.5, top_k=50, seed=3, logprobs=True, top_logprobs=20)
    for step in range(10):
        token = sample(logits, params, step)
        expected = torch.topk(torch.log_softmax(logits, -1), 20)
        assert [t for t, _ in token.top_logprobs] == expected.indices.tolist()
        assert token.logprob == pytest.approx(float(torch.log_softmax(logits, -1)[token.token_id]))


def test_top_logprobs_are_left_out_unless_asked_and_cut_to_the_vocabulary():
    logits = torch.tensor([0.1, 3.0, 0.2])
    assert sample(logits, SamplingParams(logprobs=True), step=0).top_logprobs == ()
    assert len(sample(logits, SamplingParams(logprobs=True, top_logprobs=20), step=0).top_logprobs) == 3


def test_seeded_sampling_is_reproducible_per_step():
    logits = torch.randn(1000)
    params = SamplingParams(temperature=1.0, seed=7)
    draws = [sample(logits, params, step).token_id for step in range(20)]
    assert draws == [sample(logits, params, step).token_id for step in range(20)]
    assert len(set(draws)) > 1


def test_top_k_and_top_p_restrict_the_candidates():
    logits = torch.tensor([5.0, 4.9, 1.0, 0.5, 0.1])
    for step in range(50):
        assert sample(logits, SamplingParams(temperature=2.0, top_k=2, seed=1), step).token_id in (0, 1)
        assert sample(logits, SamplingParams(temperature=1.0, top_p=0.3, seed=1), step).token_id == 0


FLOAT32_SMALLEST = float(torch.finfo(torch.float32).smallest_normal)


@pytest.mark.parametrize("temperature", [1e-40, 1e-30, FLOAT32_SMALLEST, 1e-6])
def test_a_temperature_too_small_to_divide_by_samples_greedily(temperature):
    logits = torch.randn(1000) * 10
    for step in range(5):
        token = sample(logits, SamplingParams(temperature=temperature, seed=3), step)
        assert token.token_id == int(torch.argmax(logits))


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1e-5),
    SamplingParams(temperature=1e-4, top_p=1e-30),
    SamplingParams(temperature=1e-4, top_k=2),
    SamplingParams(temperature=1.0, top_k=2**31 - 1),
    SamplingParams(temperature=1.0, top_p=float(torch.finfo(torch.float32).tiny)),
    SamplingParams(temperature=3.4e38),
    SamplingParams(temperature=float("inf"), top_k=3),
    SamplingParams(temperature=0.7, top_p=0.9, top_k=50, seed=-(2**63)),
], ids=repr)
def test_every_valid_parameter_gives_a_finite_distribution_even_for_huge_logits(params):
    params.validate()
    huge = torch.tensor([3e38, -3e38, 1e35, 0.0, 2e38])
    for logits in (huge, torch.randn(1000) * 1e30, torch.randn(1000)):
        for step in range(5):
            token = sample(logits, params, step)
            assert 0 <= token.token_id < logits.shape[0]
            assert token.logprob <= 0  # finite, or -inf for a token with no chance under greedy log-softmax


def test_a_tiny_top_p_keeps_the_most_likely_token_only():
    logits = torch.tensor([1.0, 5.0, 4.9, 0.0])
    for step in range(20):
        assert sample(logits, SamplingParams(temperature=1.0, top_p=1e-30, seed=step), step).token_id == 1


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=0.8, seed=1)], ids=["greedy", "sampled"])
def test_non_finite_logits_are_refused_with_a_plain_reason(bad, params):
    logits = torch.randn(100)
    logits[17] = bad
    with pytest.raises(NonFiniteLogits, match="non-finite logits for this request"):
        sample(logits, params, step=0)
