"""OpenTelemetry metrics of every service, exposed on a Prometheus /metrics endpoint.

Names follow the OpenTelemetry semantic conventions (gen_ai.server.* for serving latency) and become
Prometheus names by the exporter's rules: `gen_ai.server.time_to_first_token` in seconds is scraped as
`gen_ai_server_time_to_first_token_seconds`, the counter `splitwise.requests` as `splitwise_requests_total`.
"""

from __future__ import annotations

import os
import threading
from typing import Callable, Iterable

from opentelemetry import metrics
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, MeterProvider
from opentelemetry.sdk.resources import Resource

# Latency buckets in seconds, from a fast decode step to a long queued request.
LATENCY_BUCKETS_S = [0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                     120.0, 300.0]

_meter = metrics.get_meter("splitwise")

time_to_first_token = _meter.create_histogram(
    "gen_ai.server.time_to_first_token", unit="s", explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_S,
    description="Time from a request's arrival at the scheduler to its first output token",
)
time_per_output_token = _meter.create_histogram(
    "gen_ai.server.time_per_output_token", unit="s", explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_S,
    description="Time between two output tokens of a request (TBT), after the first",
)
request_duration = _meter.create_histogram(
    "gen_ai.server.request.duration", unit="s", explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_S,
    description="Time from a request's arrival at the scheduler to its end, whatever the outcome",
)
requests = _meter.create_counter(
    "splitwise.requests", unit="{request}",
    description="Requests ended at the scheduler, by outcome (stop, length, invalid, rejected, cancelled, deadline, unavailable, failed)",
)
recoveries = _meter.create_counter(
    "splitwise.request.recoveries", unit="{attempt}",
    description="Requests tried again after a worker failed: retry (nothing streamed yet, routed afresh), or resume "
                "(on another token worker, from the kept KV or by recomputation), or continue (a stream cut with its "
                "scheduler replica, continued here), by kind and kv (kv_store, recompute)",
)
pool_transitions = _meter.create_counter(
    "splitwise.pool.transitions", unit="{transition}",
    description="Workers moved between pools by this scheduler: borrowed into the mixed pool, or given back",
)
http_requests = _meter.create_counter(
    "splitwise.gateway.requests", unit="{request}",
    description="Requests the HTTP gateway answered, by route and HTTP status code",
)
http_request_duration = _meter.create_histogram(
    "http.server.request.duration", unit="s", explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_S,
    description="Time from an HTTP request's arrival at the gateway to its last byte, by route and status code",
)
engine_step_duration = _meter.create_histogram(
    "splitwise.engine.step.duration", unit="s", explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_S,
    description="Duration of one engine step (one forward pass) of a worker, by phase (prefill, decode)",
)
engine_step_tokens = _meter.create_counter(
    "splitwise.engine.step.tokens", unit="{token}",
    description="Tokens computed by a worker's engine steps, by phase (prefill: prompt tokens, decode: one a sequence)",
)
kv_transferred = _meter.create_counter(
    "splitwise.kv.transferred", unit="By", description="KV cache bytes moved between services, by direction and transport",
)
kv_transfer_duration = _meter.create_histogram(
    "splitwise.kv.transfer.duration", unit="s", explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_S,
    description="Duration of one request's KV transfer, from its first layer to its commit",
)
kv_transfers = _meter.create_counter(
    "splitwise.kv.transfers", unit="{transfer}",
    description="KV transfers, by direction, transport and outcome (ok, failed, expired, cancelled)",
)
kv_transport_failures = _meter.create_counter(
    "splitwise.kv.transport.failures", unit="{transfer}",
    description="KV transfers that failed in the transport (a refused, broken, corrupt or stalled stream or write)",
)
kv_leases_expired = _meter.create_counter(
    "splitwise.kv.leases.expired", unit="{transfer}",
    description="KV reservations whose lease ran out: their KV did not start arriving, or stalled, in time",
)
kv_messages_per_transfer = _meter.create_histogram(
    "splitwise.kv.transfer.messages", unit="{message}", explicit_bucket_boundaries_advisory=(
        1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
    description="Messages (or staged descriptors) carrying KV in one transfer",
)
kv_bytes_per_message = _meter.create_histogram(
    "splitwise.kv.transfer.message.size", unit="By", explicit_bucket_boundaries_advisory=tuple(
        4096 * 4 ** i for i in range(9)),
    description="KV bytes per message or staged descriptor of a transfer",
)
kv_cpu_seconds = _meter.create_histogram(
    "splitwise.kv.transfer.cpu", unit="s", explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_S,
    description="CPU one side spent on a transfer's bytes (copies, checksums, the write into KV blocks)",
)

# Gauges are read when Prometheus scrapes: each service registers a source that reports its state then.
GaugeSource = Callable[[], Iterable[tuple[str, float, dict]]]  # yields (gauge name, value, attributes)
_sources: list[GaugeSource] = []
_sources_lock = threading.Lock()

GAUGES = {
    "splitwise.kv.blocks": ("{block}", "KV cache blocks of a worker, by state (used, free)"),
    "splitwise.queue.depth": ("{request}", "Requests waiting for their phase on a worker, by pool and phase"),
    "splitwise.requests.running": ("{request}", "Requests in the running batch of a worker, by pool"),
    "splitwise.pool.workers": ("{worker}", "Live workers per pool, as the scheduler sees the registry"),
    "splitwise.pool.pending_tokens": ("{token}", "Tokens queued on a pool's workers, as the scheduler sees the registry"),
    "splitwise.kv_store.stored": ("By", "KV bytes the kv_store holds"),
    "splitwise.registry.refresh_age": ("s", "Time since the scheduler last read the registry and pools successfully: "
                                            "it grows while its view of the workers is stale"),
}


def _observe(name: str):
    def callback(options: CallbackOptions) -> Iterable[Observation]:
        with _sources_lock:
            sources = list(_sources)
        for source in sources:
            for gauge, value, attributes in source():
                if gauge == name:
                    yield Observation(value, attributes)

    return callback


for _name, (_unit, _description) in GAUGES.items():
    _meter.create_observable_gauge(_name, callbacks=[_observe(_name)], unit=_unit, description=_description)


def add_gauge_source(source: GaugeSource) -> Callable[[], None]:
    """Registers a source of gauge values; returns the function that removes it again."""
    with _sources_lock:
        _sources.append(source)

    def remove() -> None:
        with _sources_lock:
            if source in _sources:
                _sources.remove(source)

    return remove


def setup_metrics(service_name: str) -> MeterProvider:
    """Installs the global meter provider with a Prometheus reader (the one singleton we allow)."""
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service_name)})
    # No exemplars unless OTEL_METRICS_EXEMPLAR_FILTER asks for them: the Prometheus endpoint does not show them, and
    # the SDK's default keeps one for every measurement made in a sampled span (a TBT per output token, for one).
    exemplars = None if os.environ.get("OTEL_METRICS_EXEMPLAR_FILTER") else AlwaysOffExemplarFilter()
    provider = MeterProvider(resource=resource, metric_readers=[PrometheusMetricReader()], exemplar_filter=exemplars)
    metrics.set_meter_provider(provider)
    return provider


class MetricsEndpoint:
    """The HTTP server Prometheus scrapes (GET /metrics), in a daemon thread."""

    def __init__(self, listen: str):
        from prometheus_client import start_http_server

        host, port = listen.rsplit(":", 1)
        self._server, self._thread = start_http_server(int(port), addr=host.strip("[]") or "0.0.0.0")
        self.port = self._server.server_port
        self.address = f"{host}:{self.port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def serve_metrics(listen: str) -> MetricsEndpoint | None:
    """Starts the /metrics endpoint on `listen` (host:port, port 0 picks one); '' or 'off' disables it."""
    if listen in ("", "off"):
        return None
    return MetricsEndpoint(listen)
