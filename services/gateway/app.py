"""The HTTP gateway process: OpenAI's API (aiohttp) in front of the scheduler replicas' gRPC API.

Each HTTP request is one Generate call through splitwise.client.SplitwiseClient, which fails over between scheduler
replicas. The gateway checks the API key, shapes requests and responses (openai_api.py), and starts the request's
trace: its SERVER span joins a `traceparent` header's trace and is the parent of the scheduler's spans. A client
that disconnects cancels its handler (aiohttp's handler cancellation), which cancels the gRPC call, which cancels
the request on every worker.

aiohttp was chosen by measurement over Starlette on uvicorn (bench/http_frameworks.py: 1.7x less server CPU per
streamed event, docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import grpc
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from services.gateway.openai_api import DONE, APIError, ParsedRequest, Shaper, from_grpc, parse_chat, \
    parse_completion, sse
from splitwise.client import SplitwiseClient
from splitwise.config import GatewayConfig, cache_dir_of, parse_config
from splitwise.rpc.v1 import scheduler_pb2
from splitwise.security.peers import check_public_key, key_matches
from splitwise.server import run_service, wait_for_termination
from splitwise.telemetry import metrics
from splitwise.telemetry.logs import setup_logging
from splitwise.telemetry.metrics import setup_metrics
from splitwise.telemetry.tracing import record_error, setup_tracing, tracer

SERVICE = "gateway"
log = logging.getLogger(__name__)
SCHEDULER_SERVICE = scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"].full_name
HEALTH_TIMEOUT_S = 1.0  # a scheduler replica that does not answer its health check within this counts as down
MAX_REQUEST_ID_CHARS = 128  # as the scheduler's; a longer X-Request-Id is refused here
MAX_BODY = web.AppKey("max_body_bytes", int)
# A client that sends its headers but not its body (a slow or hostile peer) is answered 408 after this long, not held.
BODY_READ_TIMEOUT_S = 30.0


def load_model(config: GatewayConfig) -> tuple[str, object]:
    """The served model's name (as the scheduler reports it) and its tokenizer (for logprobs' token strings)."""
    from splitwise.model.mock import is_mock, mock_tokenizer, served_model_name

    name = served_model_name(config)
    if is_mock(name):
        return name, mock_tokenizer()
    from splitwise.model.weights import load_tokenizer, resolve_model

    name, folder = resolve_model(config.model, cache_dir_of(config))
    return name, load_tokenizer(folder)


class Gateway:
    """The routes; one SplitwiseClient shared by every request."""

    def __init__(self, config: GatewayConfig, model: str, tokenizer, client: SplitwiseClient):
        self.config = config
        self.model = model
        self.tokenizer = tokenizer
        self.client = client
        self.created = int(time.time())
        self._token_text: dict[int, str] = {}

    def token_text(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.tokenizer.decode([token_id])
        return text

    # checks ----------------------------------------------------------------------------------------------------
    def check_key(self, request: web.Request) -> None:
        expected = self.config.api_key
        if not expected:
            return
        header = request.headers.get("Authorization", "")
        given = header[7:].strip() if header[:7].lower() == "bearer " else ""
        if key_matches(given, expected) or key_matches(given, self.config.admin_key):
            return
        raise APIError(401, ("a wrong API key" if given else "no API key")
                       + ": send the header 'Authorization: Bearer <key>' (SPLITWISE_API_KEY)",
                       "authentication_error", None, "invalid_api_key")

    def check_model(self, model: str) -> None:
        if model != self.model:
            raise APIError(404, f"the model '{model}' does not exist; this server serves '{self.model}'",
                           "invalid_request_error", "model", "model_not_found")

    # routes ----------------------------------------------------------------------------------------------------
    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        self.check_key(request)
        return await self.generate(request, parse_chat(await read_json(request)))

    async def completions(self, request: web.Request) -> web.StreamResponse:
        self.check_key(request)
        return await self.generate(request, parse_completion(await read_json(request)))

    async def models(self, request: web.Request) -> web.Response:
        self.check_key(request)
        return web.json_response({"object": "list", "data": [self.model_card()]})

    async def model_by_id(self, request: web.Request) -> web.Response:
        self.check_key(request)
        self.check_model(request.match_info["model"])
        return web.json_response(self.model_card())

    def model_card(self) -> dict:
        return {"id": self.model, "object": "model", "created": self.created, "owned_by": "splitwise"}

    async def health(self, request: web.Request) -> web.Response:
        """200 while a scheduler replica says its Scheduler service is SERVING (it sees the workers), else 503."""
        up = await asyncio.gather(*(scheduler_serving(c) for c in self.client.channels))
        body = {"status": "ok" if any(up) else "unavailable",
                "schedulers": {a: "serving" if u else "not serving" for a, u in zip(self.client.addresses, up)}}
        return web.json_response(body, status=200 if any(up) else 503)

    async def metrics_page(self, request: web.Request) -> web.Response:
        from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

        return web.Response(body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})

    # generation ------------------------------------------------------------------------------------------------
    def request_id(self, request: web.Request) -> str:
        rid = request.headers.get("X-Request-Id", "")
        if len(rid) > MAX_REQUEST_ID_CHARS or not rid.isprintable():
            raise APIError(400, f"X-Request-Id must be printable and at most {MAX_REQUEST_ID_CHARS} characters",
                           param="X-Request-Id")
        return rid or uuid.uuid4().hex

    async def generate(self, request: web.Request, parsed: ParsedRequest) -> web.StreamResponse:
        parsed.model = parsed.model or self.model
        self.check_model(parsed.model)
        rid = self.request_id(request)
        arguments = dict(parsed.arguments, model=parsed.model, request_id=rid, logprobs=parsed.logprobs,
                         top_logprobs=parsed.top_logprobs)
        if parsed.endpoint == "chat" and "max_tokens" not in arguments:  # OpenAI's: as many as fit
            arguments.update(max_tokens=self.config.chat_max_tokens, max_tokens_fit_context=True)
        span = trace.get_current_span()
        span.set_attributes({"splitwise.request_id": rid, "gen_ai.request.model": parsed.model,
                             "gen_ai.request.max_tokens": arguments.get("max_tokens", 0),
                             "splitwise.stream": parsed.stream})
        if parsed.user:
            span.set_attribute("enduser.id", parsed.user)
        shaper = Shaper(parsed, rid, self.model, self.token_text)
        stream = self.client.stream(**arguments, timeout=self.config.request_timeout_s)
        async with contextlib.aclosing(stream):
            try:
                if not parsed.stream:
                    chunks = [chunk async for chunk in stream]
                    return web.json_response(shaper.completion(chunks), headers={"X-Request-Id": rid},
                                             dumps=_dumps)
                first = await anext(stream, None)  # an error before the first token is the HTTP status
            except grpc.aio.AioRpcError as e:
                raise from_grpc(e) from None
            return await self.stream_events(request, shaper, first, stream, rid)

    async def stream_events(self, request: web.Request, shaper: Shaper, first, stream, rid: str) -> web.StreamResponse:
        """The SSE stream; an error after the first event is sent as an error event (the status is already 200)."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               "X-Request-Id": rid})
        await response.prepare(request)
        trace.get_current_span().add_event("first_token")
        if shaper.chat:
            await response.write(sse(shaper.role_chunk()))
        chunk = first
        try:
            while chunk is not None:
                event = shaper.stream_chunk(chunk)
                if event is not None:
                    await response.write(sse(event))
                chunk = await anext(stream, None)
        except grpc.aio.AioRpcError as e:
            error = from_grpc(e)
            record_error(trace.get_current_span(), error)
            await response.write(sse(error.body()))
        else:
            if shaper.parsed.include_usage:
                await response.write(sse(shaper.usage_chunk()))
        await response.write(DONE)
        await response.write_eof()
        return response


def _dumps(value) -> str:
    return json.dumps(value, ensure_ascii=False)


async def read_json(request: web.Request):
    try:
        async with asyncio.timeout(BODY_READ_TIMEOUT_S):
            raw = await request.read()  # aiohttp refuses a body over client_max_size (413) before reading it all
    except TimeoutError:
        raise APIError(408, f"the request body did not arrive within {BODY_READ_TIMEOUT_S:g} s", code="request_timeout") \
            from None
    except web.HTTPRequestEntityTooLarge:
        raise APIError(413, f"the request body is over {request.app[MAX_BODY]} bytes (SPLITWISE_GATEWAY_MAX_BODY_BYTES)",
                       code="request_too_large") from None
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise APIError(400, "the request body is not valid JSON: nested too deeply") from None


async def scheduler_serving(channel: grpc.aio.Channel) -> bool:
    try:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=SCHEDULER_SERVICE), timeout=HEALTH_TIMEOUT_S)
        return reply.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.aio.AioRpcError:
        return False


# Routes whose answers are not traced (probes and scrapes) and not counted by route template.
UNTRACED = ("/health", "/metrics")


@web.middleware
async def openai_errors(request: web.Request, handler) -> web.StreamResponse:
    """Every answer of the gateway: traced (a SERVER span, joining the caller's traceparent), counted, and every
    error in OpenAI's shape."""
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
    started = time.perf_counter()
    status = 500
    traced = request.path not in UNTRACED
    context = propagate.extract(request.headers) if traced else None
    span_cm = (tracer().start_as_current_span(f"{request.method} {route}", context=context, kind=SpanKind.SERVER,
                                              attributes={"http.request.method": request.method, "url.path": request.path,
                                                          "http.route": route})
               if traced else contextlib.nullcontext(trace.INVALID_SPAN))
    with span_cm as span:
        try:
            response = await handler(request)
            status = response.status
            return response
        except APIError as e:
            status = e.status
            record_error(span, e)
            return web.json_response(e.body(), status=e.status, headers=e.headers)
        except web.HTTPException as e:  # no such route, wrong method
            status = e.status
            error = APIError(e.status, f"{request.method} {request.path}: {e.reason}", "invalid_request_error")
            return web.json_response(error.body(), status=e.status)
        except (asyncio.CancelledError, ConnectionResetError):
            status = 499  # the client went away: nothing to answer
            span.set_attribute("splitwise.cancelled", "client")
            raise
        except Exception as e:
            log.exception("%s %s failed in the gateway", request.method, request.path)
            record_error(span, e)
            error = APIError(500, "the gateway failed on this request (its log has the details)", "server_error")
            return web.json_response(error.body(), status=500)
        finally:
            span.set_attribute("http.response.status_code", status)
            if status >= 500:
                span.set_status(Status(StatusCode.ERROR))
            labels = {"http.route": route, "http.response.status_code": status}
            metrics.http_requests.add(1, labels)
            metrics.http_request_duration.record(time.perf_counter() - started, labels)


def build_app(gateway: Gateway) -> web.Application:
    app = web.Application(middlewares=[openai_errors], client_max_size=gateway.config.max_body_bytes)
    app[MAX_BODY] = gateway.config.max_body_bytes
    app.router.add_post("/v1/chat/completions", gateway.chat_completions)
    app.router.add_post("/v1/completions", gateway.completions)
    app.router.add_get("/v1/models", gateway.models)
    app.router.add_get("/v1/models/{model}", gateway.model_by_id)
    app.router.add_get("/health", gateway.health)
    app.router.add_get("/metrics", gateway.metrics_page)
    return app


@dataclass
class GatewayServer:
    runner: web.AppRunner
    gateway: Gateway
    address: str

    async def stop(self) -> None:
        await self.runner.cleanup()
        await self.gateway.client.close()


async def start(config: GatewayConfig) -> GatewayServer:
    check_public_key("gateway", config.listen, config.api_key, config.insecure)
    model, tokenizer = await asyncio.to_thread(load_model, config)
    client = SplitwiseClient(config.schedulers, api_key=config.api_key, admin_key=config.admin_key,
                             tls_ca=config.tls_ca)
    gateway = Gateway(config, model, tokenizer, client)
    runner = web.AppRunner(build_app(gateway), handler_cancellation=True, access_log=None)
    await runner.setup()
    host, port = config.listen.rsplit(":", 1)
    site = web.TCPSite(runner, host.strip("[]") or None, int(port))
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]  # port 0 picks one
    return GatewayServer(runner, gateway, f"{host}:{bound}")


async def serve(config: GatewayConfig) -> None:
    server = await start(config)
    print(f"{SERVICE} serving OpenAI's API on http://{server.address}/v1", flush=True)
    await wait_for_termination()
    await server.stop()


def main(argv=None) -> None:
    config = parse_config(GatewayConfig, argv)
    setup_logging(SERVICE, config.log_level, config.log_format)
    setup_tracing(SERVICE, Path(config.trace_file) if config.trace_file else None)
    setup_metrics(SERVICE)
    run_service(SERVICE, lambda: serve(config))
