"""Who may call what: cluster peers by the role in their certificate, public clients by their API key."""

from __future__ import annotations

import hmac
import inspect
import ipaddress
from typing import Awaitable, Callable

import grpc

INTERNAL_ROLES = frozenset({"scheduler", "prompt_worker", "token_worker", "kv_store"})
OPERATOR_ROLES = INTERNAL_ROLES | {"admin"}
# By method-name prefix, the longest first match wins; every other internal method takes any internal role.
PEER_ROLES: dict[str, frozenset[str]] = {
    "/splitwise.v1.PromptWorker/Prefill": frozenset({"scheduler"}),
    "/splitwise.v1.TokenWorker/Decode": frozenset({"scheduler"}),
    "/splitwise.v1.WorkerCalls/Calls": frozenset({"scheduler"}),  # carries Prefill and Decode calls
    "/grpc.health.v1.Health/": OPERATOR_ROLES,
    "/grpc.reflection.": OPERATOR_ROLES,
}
OPEN_PUBLIC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
ADMIN_METHODS = ("/splitwise.v1.Scheduler/ClusterStatus",)
BEARER = "bearer "

Check = Callable[[grpc.aio.ServicerContext], Awaitable[None]]


def roles_allowed(method: str) -> frozenset[str]:
    matches = [prefix for prefix in PEER_ROLES if method.startswith(prefix)]
    return PEER_ROLES[max(matches, key=len)] if matches else INTERNAL_ROLES


def peer_role(context: grpc.aio.ServicerContext) -> str:
    names = context.auth_context().get("x509_common_name") or []
    return names[0].decode(errors="replace") if names else ""


def _guard(handler: grpc.RpcMethodHandler, check: Check) -> grpc.RpcMethodHandler:
    """The same handler, running check(context) first (it aborts the call when the caller may not make it)."""
    kwargs = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    inner_unary = handler.unary_unary or handler.stream_unary

    async def one_response(request_or_requests, context):
        await check(context)
        return await inner_unary(request_or_requests, context)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(one_response, **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(one_response, **kwargs)
    inner_stream = handler.unary_stream or handler.stream_stream

    async def streaming(request_or_requests, context):
        await check(context)
        result = inner_stream(request_or_requests, context)
        if inspect.isasyncgen(result):
            async for response in result:
                yield response
        else:  # a handler that writes with context.write
            await result
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streaming, **kwargs)
    return grpc.stream_stream_rpc_method_handler(streaming, **kwargs)


class ClusterPeerInterceptor(grpc.aio.ServerInterceptor):
    """Internal services: a call whose mTLS peer certificate does not name a role allowed for the method is
    refused with PERMISSION_DENIED (the TLS handshake already refused any peer without a cluster certificate)."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        allowed = roles_allowed(method)

        async def check(context):
            role = peer_role(context)
            if role not in allowed:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                    f"{method} is not for {role or 'an unidentified peer'}; "
                                    f"allowed: {', '.join(sorted(allowed))}")
        return _guard(handler, check)


def bearer_metadata(key: str) -> tuple[tuple[str, str], ...]:
    """The call metadata that carries key, as ApiKeyInterceptor reads it (none for no key)."""
    return (("authorization", f"Bearer {key}"),) if key else ()


def bearer_key(metadata) -> str:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value.lower().startswith(BEARER):
            return value[len(BEARER):].strip()
    return ""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_public_key(service: str, listen: str, api_key: str, insecure: bool) -> None:
    """A public API reachable from other hosts takes an API key, unless its operator says --insecure."""
    host = listen.rsplit(":", 1)[0].strip("[]")
    if not api_key and not insecure and not is_loopback(host):
        raise ValueError(f"the {service} would serve {listen} to other hosts with no API key: set "
                         "SPLITWISE_API_KEY (--api-key), listen on 127.0.0.1, or pass --insecure")


def key_matches(given: str, expected: str) -> bool:
    return bool(expected) and hmac.compare_digest(given.encode(), expected.encode())


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """The scheduler's public port: Generate takes the API key (when one is set), ClusterStatus the admin key,
    as `authorization: Bearer KEY` metadata; a missing or wrong key is UNAUTHENTICATED. Health and reflection
    are open (load balancers probe them)."""

    def __init__(self, api_key: str, admin_key: str, open_admin: bool = False):
        self.api_key = api_key
        self.admin_key = admin_key
        self.open_admin = open_admin  # --insecure without an admin key: ClusterStatus for anyone

    def refusal(self, method: str, given: str) -> tuple[grpc.StatusCode, str] | None:
        if method.startswith(OPEN_PUBLIC_PREFIXES):
            return None
        if method in ADMIN_METHODS:
            if key_matches(given, self.admin_key) or (not self.admin_key and self.open_admin):
                return None
            if not self.admin_key:
                return (grpc.StatusCode.PERMISSION_DENIED,
                        "this scheduler has no admin key (SPLITWISE_ADMIN_KEY), so ClusterStatus is closed")
            return (grpc.StatusCode.UNAUTHENTICATED,
                    "ClusterStatus needs the admin key: metadata 'authorization: Bearer <SPLITWISE_ADMIN_KEY>'")
        if not self.api_key or key_matches(given, self.api_key) or key_matches(given, self.admin_key):
            return None
        return (grpc.StatusCode.UNAUTHENTICATED, ("a wrong API key" if given else "no API key")
                + ": send metadata 'authorization: Bearer <key>' (SPLITWISE_API_KEY)")

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        refusal = self.refusal(handler_call_details.method, bearer_key(handler_call_details.invocation_metadata))
        if refusal is None:
            return handler
        code, message = refusal

        async def refuse(context):
            await context.abort(code, message)
        return _guard(handler, refuse)
