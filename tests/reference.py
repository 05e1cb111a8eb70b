"""The correctness oracle: Hugging Face transformers generate() on the same weights, fp32, greedy."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch


@lru_cache(maxsize=2)
def hf_model(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def hf_greedy(folder: Path, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation as transformers generates it: stops after EOS (included) or max_new_tokens."""
    model = hf_model(folder)
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=model.config.eos_token_id)
    return out[0, len(prompt_ids):].tolist()


NEAR_TIE_LOGITS = 1e-4  # fp32 logits of one position computed in differently shaped batches differ by ~1e-5


def assert_same_greedy_output(folder: Path, prompt_ids: list[int], output: list[int], reference: list[int],
                              tolerance: float = NEAR_TIE_LOGITS, what: str = "") -> None:
    """`output` equals `reference` token for token, or the two part at a genuine near-tie: at the first token where
    they differ, both are within `tolerance` of the best logit of transformers' forward over the prompt and the
    common prefix (after such a flip greedy continuations owe each other nothing). Fails with the logit gap."""
    if output == reference:
        return
    k = next((i for i, (a, b) in enumerate(zip(output, reference)) if a != b), min(len(output), len(reference)))
    assert k < min(len(output), len(reference)), f"{what}: lengths differ ({len(output)} vs {len(reference)})"
    model = hf_model(folder)
    with torch.inference_mode():
        logits = model(torch.tensor([prompt_ids + reference[:k]])).logits[0, -1]
    best = float(logits.max())
    gaps = (best - float(logits[output[k]]), best - float(logits[reference[k]]))
    assert max(gaps) <= tolerance, (f"{what}: output differs from the reference at token {k} ({output[k]} vs "
                                    f"{reference[k]}), not a near-tie: logit gaps to the best {gaps[0]:.3g} and "
                                    f"{gaps[1]:.3g} (tolerance {tolerance:g})")


LOGPROB_TOLERANCE = 1e-4


def hf_log_softmax(folder: Path, prompt_ids: list[int], output_ids: list[int]) -> torch.Tensor:
    """transformers' log-softmax over the vocabulary before each output token, [len(output_ids), vocab]: row k is the
    distribution output_ids[k] was chosen from, after the prompt and output_ids[:k]."""
    model = hf_model(folder)
    with torch.inference_mode():
        logits = model(torch.tensor([prompt_ids + output_ids[:-1]])).logits[0, len(prompt_ids) - 1:]
    return torch.log_softmax(logits.float(), dim=-1)


def assert_top_logprobs_match_transformers(folder: Path, prompt_ids: list[int], output_ids: list[int],
                                           top_logprobs: list[list[tuple[int, float]]], n: int) -> None:
    """Greedy output's top lists: one per token, n long, led by the chosen token, and transformers' top n of its
    log-softmax at that step (values within LOGPROB_TOLERANCE; the ids listed have those values there too)."""
    assert len(top_logprobs) == len(output_ids)
    reference = hf_log_softmax(folder, prompt_ids, output_ids)
    for k, (token, top, row) in enumerate(zip(output_ids, top_logprobs, reference)):
        assert len(top) == n, f"token {k}: {len(top)} top logprobs, asked for {n}"
        assert top[0][0] == token, f"token {k}: greedy chose {token}, but the top list is led by {top[0][0]}"
        values = [lp for _, lp in top]
        expected = torch.topk(row, n).values.tolist()
        assert max(abs(a - b) for a, b in zip(values, expected)) <= LOGPROB_TOLERANCE, (k, values, expected)
        at_ids = [float(row[t]) for t, _ in top]
        assert max(abs(a - b) for a, b in zip(values, at_ids)) <= LOGPROB_TOLERANCE, (k, values, at_ids)
