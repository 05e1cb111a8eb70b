"""OpenAI's HTTP API as data: a request body becomes `splitwise.client.build_request` arguments, the scheduler's
stream becomes OpenAI's objects and chunks, a gRPC status becomes OpenAI's error shape.

Pure functions and small classes, no HTTP server: services/gateway/app.py serves them. A field this cluster cannot
honour gets a 400 that names it (`param`), never silent ignoring; a field it does not know gets the same.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import grpc

MAX_TOP_LOGPROBS = 20
MAX_USER_CHARS = 256
MAX_SEED = (1 << 63) - 1
# OpenAI's finish reasons: "stop" (end of sequence or a stop string) and "length" (max_tokens or the context window).
FINISH_REASONS = {"stop": "stop", "length": "length"}


class APIError(Exception):
    """An answer in OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def unsupported(param: str, what: str = "") -> APIError:
    return invalid(f"'{param}' is not supported by this server{what}", param, "unsupported_parameter")


# gRPC status of the scheduler -> HTTP status, OpenAI error type, code.
_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error", None),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error", None),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error", "invalid_api_key"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error", None),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error", None),
    grpc.StatusCode.ALREADY_EXISTS: (409, "invalid_request_error", "conflict"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error", "rate_limit_exceeded"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable", "no_worker_available"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout", "deadline_exceeded"),
}
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"


def from_grpc(error: grpc.aio.AioRpcError) -> APIError:
    """The scheduler's status as the HTTP client gets it; RESOURCE_EXHAUSTED's retry hint becomes Retry-After."""
    status, kind, code = _STATUS.get(error.code(), (500, "server_error", None))
    message = error.details() or error.code().name
    headers = {}
    if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
        pushback = dict(error.trailing_metadata() or ()).get(RETRY_PUSHBACK_KEY)
        try:
            headers["Retry-After"] = str(max(1, math.ceil(int(pushback) / 1000)))
        except (TypeError, ValueError):
            headers["Retry-After"] = "1"
    if error.code() == grpc.StatusCode.INVALID_ARGUMENT and "context window" in message:
        code = "context_length_exceeded"
    return APIError(status, message, kind, None, code, headers)


# ---------------------------------------------------------------------------------------------------------------
# Requests

INT32_MAX = (1 << 31) - 1  # the contract's int32 fields (max_tokens, top_k, token ids)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_int32(value: Any) -> bool:
    return _is_int(value) and -INT32_MAX - 1 <= value <= INT32_MAX


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class ParsedRequest:
    """What the gateway does with one request body."""

    endpoint: str  # "chat" or "completion"
    model: str  # "" when the body names none
    stream: bool
    include_usage: bool
    logprobs: bool
    top_logprobs: int
    user: str
    arguments: dict = field(default_factory=dict)  # splitwise.client.build_request keyword arguments


class _Body:
    """Reads fields of a request body once each; what is left unread at the end was not understood."""

    def __init__(self, body: Any):
        if not isinstance(body, dict):
            raise invalid("the request body must be a JSON object")
        self.body = body
        self.unread = set(body)

    def get(self, name: str, check: Callable[[Any], bool] | None = None, expected: str = "", default=None):
        self.unread.discard(name)
        value = self.body.get(name)
        if value is None:
            return default
        if check is not None and not check(value):
            raise invalid(f"'{name}' must be {expected}, got {json.dumps(value)[:80]}", name)
        return value

    def only_default(self, name: str, allowed: Callable[[Any], bool], what: str = "") -> None:
        """A field this server supports only at its default value (absent, null, or `allowed`)."""
        self.unread.discard(name)
        value = self.body.get(name)
        if value is not None and not allowed(value):
            raise unsupported(name, what)

    def finish(self) -> None:
        if self.unread:
            name = sorted(self.unread)[0]
            raise invalid(f"unknown field '{name}'", name, "unknown_parameter")


_NEVER = {
    # Fields of OpenAI's API this server has no equivalent for: refused by name whatever their value.
    "chat": ("tools", "tool_choice", "functions", "function_call", "response_format", "logit_bias", "audio",
             "modalities", "prediction", "web_search_options", "reasoning_effort", "metadata", "service_tier"),
    "completion": ("logit_bias", "suffix"),
}


def _max_tokens(body: _Body) -> int | None:
    """max_completion_tokens (OpenAI's newer name) or max_tokens: either, or both when they agree (some clients
    send both)."""
    given = {}
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name, _is_int32, "a 32-bit integer")
        if value is not None:
            if value < 1:
                raise invalid(f"'{name}' must be at least 1, got {value}", name)
            given[name] = value
    if len(set(given.values())) > 1:
        raise invalid("max_completion_tokens and max_tokens differ: give one of them", "max_tokens")
    return next(iter(given.values()), None)


def _sampling(body: _Body) -> dict:
    """The fields both endpoints share: sampling, limits, stop strings."""
    args: dict = {}
    max_tokens = _max_tokens(body)
    if max_tokens is not None:
        args["max_tokens"] = max_tokens
    temperature = body.get("temperature", _is_number, "a number")
    if temperature is not None:
        if temperature < 0:
            raise invalid(f"'temperature' must be >= 0, got {temperature}", "temperature")
        args["temperature"] = float(temperature)
    top_p = body.get("top_p", _is_number, "a number")
    if top_p is not None:
        if not 0 < top_p <= 1:
            raise invalid(f"'top_p' must be in (0, 1], got {top_p}", "top_p")
        args["top_p"] = float(top_p)
    top_k = body.get("top_k", _is_int32, "a 32-bit integer")  # vLLM's extension
    if top_k is not None:
        if top_k < -1:
            raise invalid(f"'top_k' must be >= 0 (0 or -1 disables it), got {top_k}", "top_k")
        args["top_k"] = max(top_k, 0)
    seed = body.get("seed", _is_int, "an integer")
    if seed is not None:
        if not -MAX_SEED - 1 <= seed <= MAX_SEED:
            raise invalid("'seed' must fit in 64 bits", "seed")
        args["seed"] = seed
    stop = body.get("stop", lambda v: isinstance(v, str) or (isinstance(v, list) and all(isinstance(s, str) for s in v)),
                    "a string or a list of strings")
    if stop is not None:
        args["stop"] = [stop] if isinstance(stop, str) else list(stop)
    ignore_eos = body.get("ignore_eos", lambda v: isinstance(v, bool), "true or false")  # vLLM's extension
    if ignore_eos:
        args["ignore_eos"] = True
    body.only_default("n", lambda v: v == 1, ": n must be 1 (one choice per request)")
    for penalty in ("frequency_penalty", "presence_penalty"):
        body.only_default(penalty, lambda v: v == 0, " (only 0)")
    body.only_default("stream_options", lambda v: True)  # read by _stream_options
    body.only_default("store", lambda v: v is False, " (nothing is stored)")
    return args


def _stream_options(body: _Body, stream: bool) -> bool:
    options = body.body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise invalid("'stream_options' must be an object", "stream_options")
    if not stream:
        raise invalid("'stream_options' is only allowed with stream: true", "stream_options")
    unknown = set(options) - {"include_usage"}
    if unknown:
        raise unsupported(f"stream_options.{sorted(unknown)[0]}")
    include = options.get("include_usage", False)
    if not isinstance(include, bool):
        raise invalid("'stream_options.include_usage' must be true or false", "stream_options.include_usage")
    return include


def _common(body: _Body, endpoint: str) -> tuple[str, bool, bool, str]:
    # Optional, as in vLLM: none means the model this server serves (GET /v1/models lists it).
    model = body.get("model", lambda v: isinstance(v, str), "a string", "")
    stream = bool(body.get("stream", lambda v: isinstance(v, bool), "true or false", False))
    include_usage = _stream_options(body, stream)
    user = body.get("user", lambda v: isinstance(v, str) and len(v) <= MAX_USER_CHARS,
                    f"a string of at most {MAX_USER_CHARS} characters", "")
    for name in _NEVER[endpoint]:
        if body.body.get(name) is not None:
            raise unsupported(name)
        body.unread.discard(name)
    return model, stream, include_usage, user


def _content_text(content: Any, index: int) -> str:
    param = f"messages[{index}].content"
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise invalid(f"{param}: only text parts are supported, got a part of type {kind!r}", param)
            parts.append(part["text"])
        return "".join(parts)
    raise invalid(f"{param} must be a string or a list of text parts", param)


_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def _messages(body: _Body) -> list[dict]:
    messages = body.get("messages", lambda v: isinstance(v, list), "a list of messages")
    if not messages:
        raise invalid("'messages' is required and must not be empty", "messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise invalid(f"messages[{i}] must be an object with role and content", f"messages[{i}]")
        role = message.get("role")
        if role in ("tool", "function") or message.get("tool_calls") or message.get("function_call"):
            raise unsupported(f"messages[{i}]", ": tool and function calls")
        if role not in _ROLES:
            raise invalid(f"messages[{i}].role must be one of system, developer, user or assistant, got {role!r}",
                          f"messages[{i}].role")
        extra = set(message) - {"role", "content"}
        if extra:
            raise unsupported(f"messages[{i}].{sorted(extra)[0]}")
        out.append({"role": _ROLES[role], "content": _content_text(message.get("content"), i)})
    return out


def parse_chat(raw: Any) -> ParsedRequest:
    """A POST /v1/chat/completions body; APIError (400) saying what is wrong."""
    body = _Body(raw)
    model, stream, include_usage, user = _common(body, "chat")
    messages = _messages(body)
    args = _sampling(body)
    logprobs = bool(body.get("logprobs", lambda v: isinstance(v, bool), "true or false", False))
    top = body.get("top_logprobs", lambda v: _is_int(v) and 0 <= v <= MAX_TOP_LOGPROBS,
                   f"an integer from 0 to {MAX_TOP_LOGPROBS}", 0)
    if top and not logprobs:
        raise invalid("'top_logprobs' needs logprobs: true", "top_logprobs")
    body.finish()
    args["messages"] = messages
    return ParsedRequest("chat", model, stream, include_usage, logprobs, top, user, args)


def parse_completion(raw: Any) -> ParsedRequest:
    """A POST /v1/completions body; APIError (400) saying what is wrong."""
    body = _Body(raw)
    model, stream, include_usage, user = _common(body, "completion")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise invalid("'prompt' is empty", "prompt")
        source = {"prompt": prompt}
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        if not all(0 <= t <= INT32_MAX for t in prompt):
            raise invalid("'prompt' token ids must be non-negative 32-bit integers", "prompt")
        source = {"token_ids": prompt}
    elif isinstance(prompt, list) and len(prompt) > 1:
        raise unsupported("prompt", ": one prompt per request (a string or a list of token ids), not a batch")
    else:
        raise invalid("'prompt' is required: a string or a list of token ids", "prompt")
    args = _sampling(body)
    logprobs = body.get("logprobs", lambda v: _is_int(v) and 0 <= v <= MAX_TOP_LOGPROBS,
                        f"an integer from 0 to {MAX_TOP_LOGPROBS}")
    body.only_default("echo", lambda v: v is False, " (the prompt is not echoed)")
    body.only_default("best_of", lambda v: v == 1, ": best_of must be 1")
    body.finish()
    args.update(source)
    return ParsedRequest("completion", model, stream, include_usage, logprobs is not None, logprobs or 0, user, args)


# ---------------------------------------------------------------------------------------------------------------
# Responses

@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def to_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


class Shaper:
    """Builds one request's OpenAI objects from the scheduler's chunks (splitwise.client.Chunk)."""

    def __init__(self, parsed: ParsedRequest, request_id: str, model: str, token_text: Callable[[int], str]):
        self.parsed = parsed
        self.chat = parsed.endpoint == "chat"
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + request_id
        self.created = int(time.time())
        self.model = model
        self.token_text = token_text
        self.usage = Usage()
        self.finish_reason: str | None = None
        self.text_offset = 0  # completions' logprobs.text_offset: where each token starts in the output text

    def _header(self, stream: bool) -> dict:
        kind = ("chat.completion.chunk" if stream else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def observe(self, chunk) -> None:
        if chunk.finish_reason:
            self.finish_reason = FINISH_REASONS.get(chunk.finish_reason, chunk.finish_reason)
            self.usage = Usage(chunk.prompt_tokens, chunk.completion_tokens)

    # logprobs -------------------------------------------------------------------------------------------------
    def _entry(self, token_id: int, logprob: float) -> dict:
        text = self.token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    def logprobs(self, chunk) -> dict | None:
        if not self.parsed.logprobs:
            return None
        tops = getattr(chunk, "top_logprobs", None) or [[] for _ in chunk.token_ids]
        if self.chat:
            content = []
            for token_id, logprob, top in zip(chunk.token_ids, chunk.logprobs, tops):
                entry = self._entry(token_id, logprob)
                entry["top_logprobs"] = [self._entry(t, lp) for t, lp in top[:self.parsed.top_logprobs]]
                content.append(entry)
            return {"content": content}
        tokens, offsets = [], []
        for token_id in chunk.token_ids:
            text = self.token_text(token_id)
            tokens.append(text)
            offsets.append(self.text_offset)
            self.text_offset += len(text)
        top_lists = None
        if self.parsed.top_logprobs:
            top_lists = [{self.token_text(t): lp for t, lp in top[:self.parsed.top_logprobs]} for top in tops]
        return {"tokens": tokens, "token_logprobs": list(chunk.logprobs), "top_logprobs": top_lists,
                "text_offset": offsets}

    # streaming -------------------------------------------------------------------------------------------------
    def role_chunk(self) -> dict:
        """Chat streams open with the assistant's role, as OpenAI's do."""
        return {**self._header(True), "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                   "logprobs": None, "finish_reason": None}],
                **({"usage": None} if self.parsed.include_usage else {})}

    def stream_chunk(self, chunk) -> dict | None:
        """The SSE event of one scheduler chunk; None when it carries nothing a client sees."""
        self.observe(chunk)
        if not chunk.text and not chunk.finish_reason and not (self.parsed.logprobs and chunk.token_ids):
            return None
        choice: dict = ({"index": 0, "delta": {"content": chunk.text} if chunk.text else {}} if self.chat
                        else {"index": 0, "text": chunk.text})
        choice["logprobs"] = self.logprobs(chunk)
        choice["finish_reason"] = self.finish_reason if chunk.finish_reason else None
        event = {**self._header(True), "choices": [choice]}
        if self.parsed.include_usage:
            event["usage"] = None
        return event

    def usage_chunk(self) -> dict:
        """stream_options.include_usage: the last event, with no choices."""
        return {**self._header(True), "choices": [], "usage": self.usage.to_dict()}

    # whole -----------------------------------------------------------------------------------------------------
    def completion(self, chunks: list) -> dict:
        for chunk in chunks:
            self.observe(chunk)
        text = "".join(c.text for c in chunks)
        logprobs = None
        if self.parsed.logprobs:
            merged = [self.logprobs(c) for c in chunks if c.token_ids]
            if self.chat:
                logprobs = {"content": [entry for part in merged for entry in part["content"]]}
            else:
                logprobs = {key: [v for part in merged for v in (part[key] or [])] for key in
                            ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
                if not self.parsed.top_logprobs:
                    logprobs["top_logprobs"] = None
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                      "finish_reason": self.finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": self.finish_reason}
        return {**self._header(False), "choices": [choice], "usage": self.usage.to_dict()}


def sse(event: dict | str) -> bytes:
    """One server-sent event: `data: JSON` and a blank line."""
    data = event if isinstance(event, str) else json.dumps(event, separators=(",", ":"), ensure_ascii=False)
    return f"data: {data}\n\n".encode()


DONE = sse("[DONE]")
