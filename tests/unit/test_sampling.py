import pytest
import torch

from splitwise.engine.sampling import SamplingParams, sample


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
