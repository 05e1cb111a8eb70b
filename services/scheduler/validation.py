"""Checks a GenerateRequest at the front door and turns it into prompt token ids and sampling parameters."""

from __future__ import annotations

from dataclasses import dataclass

from splitwise.engine.sampling import SamplingParams
from splitwise.rpc import convert
from splitwise.rpc.v1 import scheduler_pb2

MAX_REQUEST_ID_CHARS = 128


class InvalidRequest(ValueError):
    pass


@dataclass(frozen=True)
class ModelInfo:
    name: str
    tokenizer: object
    max_context_tokens: int
    vocab_size: int
    eos_token_ids: frozenset[int]


def prompt_token_ids(request: scheduler_pb2.GenerateRequest, model: ModelInfo) -> list[int]:
    tokenizer = model.tokenizer
    kind = request.WhichOneof("input")
    if kind == "prompt":
        if not request.prompt:
            raise InvalidRequest("prompt is empty")
        ids = tokenizer.encode(request.prompt, add_special_tokens=False)
    elif kind == "chat":
        messages = [{"role": m.role, "content": m.content} for m in request.chat.messages]
        if not messages:
            raise InvalidRequest("chat has no messages")
        if any(m["role"] not in ("system", "user", "assistant") for m in messages):
            raise InvalidRequest("chat message roles must be system, user or assistant")
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
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


def validate(request: scheduler_pb2.GenerateRequest, model: ModelInfo) -> tuple[list[int], SamplingParams]:
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
    ids = prompt_token_ids(request, model)
    if request.continue_after_token_ids:
        check_continuation(request, model, params)
    limit = model.max_context_tokens
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
