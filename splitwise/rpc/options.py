"""gRPC channel and server options every service and client shares (message sizes, keepalive): neither client
nor server code, so that the client imports no server module."""

from __future__ import annotations


MAX_MESSAGE_BYTES = 64 << 20  # between services (KV chunks); a service's port may take less (start_server)


def message_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    return [("grpc.max_send_message_length", max_message_bytes), ("grpc.max_receive_message_length", max_message_bytes)]


MESSAGE_OPTIONS = message_options()


def server_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    # Servers take keepalive pings as often as clients send them (by default they answer pings more often than every
    # 5 minutes without data with GOAWAY "too_many_pings").
    return [*message_options(max_message_bytes), ("grpc.http2.min_recv_ping_interval_without_data_ms", 1000),
            ("grpc.http2.max_ping_strikes", 0)]


DEFAULT_KEEPALIVE_S = 5.0


def channel_options(keepalive_s: float = DEFAULT_KEEPALIVE_S) -> list[tuple[str, int]]:
    """A client channel's options. With keepalive_s > 0, while calls are open an HTTP/2 ping goes out every
    keepalive_s, and a peer that does not answer one within keepalive_s (a hung process, a host gone without
    closing its sockets) fails the calls on it with UNAVAILABLE, as a dead one does at once."""
    if keepalive_s <= 0:
        return list(MESSAGE_OPTIONS)
    ms = max(1, round(keepalive_s * 1000))
    return [*MESSAGE_OPTIONS, ("grpc.keepalive_time_ms", ms), ("grpc.keepalive_timeout_ms", ms),
            ("grpc.http2.ping_timeout_ms", ms),  # (gRPC core waits this long for a ping's ack, 60 s by default)
            ("grpc.http2.max_pings_without_data", 0)]  # a stream waiting for its first message is watched too
