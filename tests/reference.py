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
