"""Checks a GenerateRequest at the front door and turns it into prompt token ids and sampling parameters.

Sizes are checked from bytes before anything is tokenized, and tokenization runs off the event loop: a huge prompt
is refused at once, and a long one holds no other call while it is tokenized.
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass

from splitwise.engine.sampling import SamplingParams
from splitwise.rpc import convert
from splitwise.rpc.v1 import scheduler_pb2

MAX_REQUEST_ID_CHARS = 128
MAX_INPUT_BYTES = 1 << 20  # a text prompt, or a chat's roles and contents, in UTF-8, whatever the context window
# The public port takes messages this big (gRPC refuses bigger ones itself, RESOURCE_EXHAUSTED): a prompt over
# MAX_INPUT_BYTES, or a token_ids list of a whole context, still gets an answer that says what is wrong.
MAX_MESSAGE_BYTES = 8 << 20
# How much a tokenizer's normalizer may shrink text before it is split into tokens (NFKC: a fullwidth "Ａ", 3 bytes,
# becomes "A"; stripping an accent turns 3 bytes into 1). Byte-level BPE does not normalize at all.
NORMALIZER_SHRINK = 4


class InvalidRequest(ValueError):
    pass


@dataclass(frozen=True)
class ModelInfo:
    name: str
    tokenizer: object
    max_context_tokens: int
    vocab_size: int
    eos_token_ids: frozenset[int]
    max_token_bytes: int  # no token stands for more input bytes than this (longest_token_bytes)


def longest_token_bytes(tokenizer) -> int:
    """The UTF-8 length of the longest token string in the vocabulary, special tokens included. A token's string is
    at least as long as the input bytes it stands for: byte-level BPE spells each byte as one character of one or
    two bytes, SentencePiece a one-byte space as "▁" (three bytes) and a fallback byte as "<0x0A>"."""
    return max(len(token.encode()) for token in tokenizer.get_vocab())


def input_bytes_limit(model: ModelInfo, params: SamplingParams) -> int:
    """Text longer than this cannot fit the context window with max_tokens beside it: every prompt token stands for
    at most max_token_bytes * NORMALIZER_SHRINK input bytes. Capped at MAX_INPUT_BYTES."""
    room_tokens = max(0, model.max_context_tokens - params.max_tokens)
    return min(MAX_INPUT_BYTES, room_tokens * model.max_token_bytes * NORMALIZER_SHRINK)


def check_input_size(request: scheduler_pb2.GenerateRequest, model: ModelInfo, params: SamplingParams) -> None:
    """Refuses, before tokenizing, a prompt that could not possibly fit (a bound from its bytes, not a token count)."""
    kind = request.WhichOneof("input")
    limit_tokens = model.max_context_tokens - params.max_tokens
    if kind == "token_ids":
        if len(request.token_ids.ids) > limit_tokens:
            raise InvalidRequest(_too_long(model, params, f"{len(request.token_ids.ids)} prompt tokens"))
        return
    if kind == "prompt":
        size = len(request.prompt.encode())
    elif kind == "chat":
        size = sum(len(m.role.encode()) + len(m.content.encode()) for m in request.chat.messages)
    else:
        return
    limit = input_bytes_limit(model, params)
    if size > MAX_INPUT_BYTES:
        raise InvalidRequest(f"the {kind} is {size} bytes; at most {MAX_INPUT_BYTES} bytes of input are accepted")
    if size > limit:
        raise InvalidRequest(_too_long(model, params, f"a {kind} of {size} bytes (at most {limit} bytes could fit)"))


def _too_long(model: ModelInfo, params: SamplingParams, what: str) -> str:
    return (f"this model's context window is {model.max_context_tokens} tokens, and {params.max_tokens} max_tokens "
            f"leave no room for {what}; shorten the prompt or lower max_tokens")


async def prompt_token_ids(request: scheduler_pb2.GenerateRequest, model: ModelInfo) -> list[int]:
    tokenizer = model.tokenizer
    kind = request.WhichOneof("input")
    if kind == "prompt":
        if not request.prompt:
            raise InvalidRequest("prompt is empty")
        ids = await asyncio.to_thread(tokenizer.encode, request.prompt, add_special_tokens=False)
    elif kind == "chat":
        messages = [{"role": m.role, "content": m.content} for m in request.chat.messages]
        if not messages:
            raise InvalidRequest("chat has no messages")
        if any(m["role"] not in ("system", "user", "assistant") for m in messages):
            raise InvalidRequest("chat message roles must be system, user or assistant")
        ids = await asyncio.to_thread(tokenizer.apply_chat_template, messages, add_generation_prompt=True,
                                      tokenize=True, return_dict=False)
        ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
    elif kind == "token_ids":
        ids = list(request.token_ids.ids)
        check_token_ids(ids, model, "token ids")
    else:
        raise InvalidRequest("set one input: prompt, chat or token_ids")
    if not ids:
        raise InvalidRequest("the prompt has no tokens")
    return ids


def check_token_ids(ids: list[int], model: ModelInfo, what: str) -> None:
    if ids and (min(ids) < 0 or max(ids) >= model.vocab_size):
        raise InvalidRequest(f"{what} must be in [0, {model.vocab_size})")


async def validate(request: scheduler_pb2.GenerateRequest, model: ModelInfo) -> tuple[list[int], SamplingParams]:
    """The request's prompt token ids and sampling parameters, or InvalidRequest saying what is wrong."""
    if len(request.request_id) > MAX_REQUEST_ID_CHARS or not request.request_id.isprintable():
        raise InvalidRequest(f"request_id must be printable and at most {MAX_REQUEST_ID_CHARS} characters")
    if request.model and request.model != model.name:
        raise InvalidRequest(f"unknown model {request.model!r}; this cluster serves {model.name!r}")
    params = convert.sampling_from_pb(request.sampling)
    try:
        params.validate()
    except ValueError as e:
        raise InvalidRequest(str(e)) from e
    if request.continue_after_token_ids:
        check_continuation(request, model, params)
    # A request that may shrink its max_tokens to fit is sized as if it asked for one token.
    check_input_size(request, model, dataclasses.replace(params, max_tokens=1) if request.max_tokens_fit_context
                     else params)
    ids = await prompt_token_ids(request, model)
    limit = model.max_context_tokens
    if request.max_tokens_fit_context and len(ids) < limit:
        params = dataclasses.replace(params, max_tokens=min(params.max_tokens, limit - len(ids)))
    if len(ids) + params.max_tokens > limit:
        raise InvalidRequest(
            f"this model's context window is {limit} tokens, but the request needs {len(ids) + params.max_tokens} "
            f"({len(ids)} prompt + {params.max_tokens} max_tokens); shorten the prompt or lower max_tokens"
        )
    return ids, params


def check_continuation(request: scheduler_pb2.GenerateRequest, model: ModelInfo, params: SamplingParams) -> None:
    continued = list(request.continue_after_token_ids)
    if not request.request_id:
        raise InvalidRequest("continue_after_token_ids needs the request_id of the stream it continues")
    check_token_ids(continued, model, "continue_after_token_ids")
    if len(continued) >= params.max_tokens:
        raise InvalidRequest(f"continue_after_token_ids has {len(continued)} tokens, max_tokens is {params.max_tokens}: "
                             "nothing is left to generate")
