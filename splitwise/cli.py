"""The `splitwise` command: up | generate | status | health | certs | prepare | bench | trace | profile | sim | plan."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

import grpc

from splitwise.client import DEFAULT_ADDRESS, SplitwiseClient
from splitwise.model import DEFAULT_MOCK_PROFILE, DEFAULT_MODEL
from splitwise.security.tls import ROLES


def _address(args) -> str:
    return args.address or os.environ.get("SPLITWISE_ADDRESS", DEFAULT_ADDRESS)


async def _generate(args) -> int:
    if args.raw:
        kwargs = {"prompt": args.prompt}
    else:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        kwargs = {"messages": [*messages, {"role": "user", "content": args.prompt}]}
    async with SplitwiseClient(_address(args), api_key=args.api_key or None, tls_ca=args.tls_ca or None) as client:
        start = time.perf_counter()
        first = None
        last = None
        try:
            async for chunk in client.stream(
                **kwargs, max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                top_k=args.top_k, seed=args.seed, stop=args.stop or (), ignore_eos=args.ignore_eos,
                timeout=args.timeout,
            ):
                if first is None and chunk.token_ids:
                    first = time.perf_counter() - start
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
                last = chunk
        except grpc.aio.AioRpcError as e:
            print(f"\nerror: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    total = time.perf_counter() - start
    print()
    if last is not None and not args.quiet:
        decode_rate = (last.completion_tokens - 1) / max(total - (first or 0), 1e-9)
        print(f"[{last.finish_reason}; {last.prompt_tokens} prompt + {last.completion_tokens} completion tokens; "
              f"time to first token {first * 1e3:.0f} ms; {decode_rate:.1f} tokens/s after it; "
              f"request {last.request_id}]", file=sys.stderr)
    return 0


async def _status(args) -> int:
    from splitwise.security.keys import ADMIN_KEY_FILE, configured_key
    from splitwise.supervision import format_state, read_state

    run_dir = Path(args.run_dir)
    admin_key = args.admin_key or configured_key("SPLITWISE_ADMIN_KEY", ADMIN_KEY_FILE, str(run_dir))
    async with SplitwiseClient(_address(args), admin_key=admin_key or None, tls_ca=args.tls_ca or None) as client:
        while True:
            try:
                status = await client.cluster_status()
            except grpc.aio.AioRpcError as e:
                print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
                status = None
            if args.watch:
                print("\033[H\033[J", end="")  # clear the terminal: one screen, refreshed
            if status is not None:
                print_status(status)
            # What the local launcher did (restarts), also while the scheduler does not answer.
            supervision = read_state(run_dir)
            if supervision:
                print("\n".join(format_state(supervision)))
            if not args.watch:
                return 0 if status is not None else 1
            await asyncio.sleep(args.watch)


def print_status(status) -> None:
    print(f"model {status.model}; KV transfer {status.kv_transfer_mode}; requests in flight: "
          f"{status.cluster_requests_in_flight} in the cluster, {status.requests_in_flight} on this scheduler")
    pools = {pool: [w for w in status.workers if (w.pool or w.role) == pool] for pool in ("prompt", "token", "mixed")}
    print("pools: " + "; ".join(f"{pool} {len(members)} workers, {sum(w.pending_tokens for w in members)} tokens pending"
                                for pool, members in pools.items()))
    print(f"{'worker':<24} {'role':<7} {'pool':<7} {'address':<22} {'pending tok':>11} {'active':>6} "
          f"{'KV used/capacity tok':>22} {'heartbeat':>9}")
    for w in status.workers:
        kv = f"{w.kv_used_tokens}/{w.kv_capacity_tokens}"
        pool = w.pool or w.role
        print(f"{w.worker_id:<24} {w.role:<7} {pool + ('*' if pool != w.role else ''):<7} {w.address:<22} "
              f"{w.pending_tokens:>11} {w.active_requests:>6} {kv:>22} {w.heartbeat_age_s:>8.1f}s")
    if not status.workers:
        print("(no workers registered)")
    if status.pool_transitions:
        print("pool transitions (newest first; * above: borrowed):")
        now = time.time()
        for t in status.pool_transitions[:8]:
            print(f"  {now - t.at_unix_s:>7.1f}s ago  {t.worker_id}: {t.from_pool} -> {t.to_pool}  ({t.reason})")


def _bench_replay(args) -> int:
    from splitwise.replay import run

    return asyncio.run(run(args))


def _up(args) -> int:
    from splitwise.launcher import UpOptions, up

    return up(UpOptions(
        model=args.model, host=args.host, scheduler_port=args.port, prompt_port=args.prompt_port,
        token_port=args.token_port, kv_store_port=args.kv_store_port, mixed_port=args.mixed_port,
        redis_port=args.redis_port, metrics_port=args.metrics_port, redis_url=args.redis_url,
        schedulers=args.schedulers, prompt_workers=args.prompt_workers, token_workers=args.token_workers,
        mixed_workers=args.mixed_workers,
        kv_transfer=args.kv_transfer, run_dir=Path(args.run_dir), device=args.device,
        pin_workers=args.pin_workers, insecure=args.insecure, engine=args.engine, mock_profile=args.profile,
        mock_time_factor=args.time_factor, mock_kv_scale=args.kv_scale, http_port=args.http_port,
    ))


def _health(args) -> int:
    from splitwise.launcher import serving
    from splitwise.security.tls import ClusterTLS

    tls = ClusterTLS.load(args.tls_dir, "admin") if args.tls_dir else None
    return 0 if serving(args.address, tls) else 1


def _certs(args) -> int:
    from splitwise.security.tls import default_hosts, make_cluster_certs

    hosts = default_hosts() + [h for h in args.host or () if h not in default_hosts()]
    if not make_cluster_certs(Path(args.dir), hosts, force=args.force):
        print(f"{args.dir} already holds a cluster CA and certificates (--force makes new ones)")
        return 0
    print(f"wrote a cluster CA, certificates for {', '.join(ROLES)}, and the cluster key to {args.dir} "
          f"(the scheduler's certificate is valid for {', '.join(hosts)}); give every service --tls-dir {args.dir}")
    return 0


def _prepare(args) -> int:
    from splitwise.model.weights import resolve_model

    name, folder = resolve_model(args.model)
    print(f"{name}: {folder}")
    return 0


def _trace(args) -> int:
    from splitwise.telemetry.waterfall import find_trace, render_png, render_text

    try:
        spans, num_traces = find_trace(args.traces or [".splitwise/traces"], args.request_id)
    except LookupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(render_text(spans, args.width))
    if num_traces > 1:
        print(f"({num_traces} traces carry request id {args.request_id!r}; this is the most recent)", file=sys.stderr)
    if args.png:
        try:
            render_png(spans, args.png)
        except ImportError:
            print("error: --png needs matplotlib: pip install matplotlib", file=sys.stderr)
            return 1
        print(f"wrote {args.png}", file=sys.stderr)
    return 0


def _profile(args) -> int:
    from splitwise.sim.profiler import run

    return run(args)


def _sim(args) -> int:
    from splitwise.sim.commands import sim_main

    return sim_main(args)


def _plan(args) -> int:
    from splitwise.sim.commands import plan_main

    return plan_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="splitwise", description="Phase-split LLM serving")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run a local cluster (Redis + the four services) until Ctrl-C")
    up.add_argument("--model", default=os.environ.get("SPLITWISE_MODEL", DEFAULT_MODEL))
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=50051, help="scheduler port (replicas: +1, +2, ...)")
    up.add_argument("--prompt-port", type=int, default=50061, help="first prompt worker's port (then +1, +2, ...)")
    up.add_argument("--token-port", type=int, default=50071, help="first token worker's port (then +1, +2, ...)")
    up.add_argument("--kv-store-port", type=int, default=50081)
    up.add_argument("--mixed-port", type=int, default=50091, help="first mixed worker's port (then +1, +2, ...)")
    up.add_argument("--http-port", type=int, default=8000,
                    help="the OpenAI-compatible HTTP gateway's port (/v1/chat/completions, ...); 0: no gateway")
    up.add_argument("--redis-port", type=int, default=6379)
    up.add_argument("--metrics-port", type=int, default=9451,
                    help="Prometheus /metrics ports: schedulers from this one, prompt workers from +10, token workers "
                         "from +20, the kv_store on +30, mixed workers from +40; 0 picks free ports")
    up.add_argument("--redis-url", default="", help="use this Redis instead of starting one")
    up.add_argument("--schedulers", type=int, default=1,
                    help="scheduler replicas, sharing Redis; clients take them all: --address HOST:PORT,HOST:PORT+1")
    up.add_argument("--prompt-workers", type=int, default=1)
    up.add_argument("--token-workers", type=int, default=1)
    up.add_argument("--mixed-workers", type=int, default=0,
                    help="workers that run both phases, colocated (the baseline: --prompt-workers 0 --token-workers 0 "
                         "--mixed-workers 2)")
    up.add_argument("--kv-transfer", choices=["direct", "relay"], default="direct")
    up.add_argument("--device", default=os.environ.get("SPLITWISE_DEVICE", "auto"))
    up.add_argument("--run-dir", default=".splitwise", help="logs and trace files go here")
    up.add_argument("--pin-workers", action="store_true",
                    help="give each worker process its own share of this machine's cores (as separate machines)")
    up.add_argument("--insecure", action="store_true",
                    help="no mTLS between services, no API or admin key, no Redis password (debugging only)")
    up.add_argument("--engine", choices=["real", "mock"], default=os.environ.get("SPLITWISE_ENGINE", "real"),
                    help="mock: workers whose model compute is replaced by --profile's modelled step times")
    up.add_argument("--profile", default=os.environ.get("SPLITWISE_MOCK_PROFILE", DEFAULT_MOCK_PROFILE),
                    help="the mock engine's machine profile, MODEL@MACHINE or a profile CSV (default: %(default)s)")
    up.add_argument("--time-factor", type=float, default=float(os.environ.get("SPLITWISE_MOCK_TIME_FACTOR", 1.0)),
                    help="mock engine: every modelled step time is multiplied by this (default: %(default)s)")
    up.add_argument("--kv-scale", type=float, default=float(os.environ.get("SPLITWISE_MOCK_KV_SCALE", 1.0)),
                    help="mock engine: the KV bytes sent are the modelled size divided by this (default: %(default)s)")
    up.set_defaults(run=_up)

    gen = sub.add_parser("generate", help="stream a completion to the terminal")
    gen.add_argument("prompt")
    gen.add_argument("--address", default="", help="scheduler address, or replicas' addresses comma-separated "
                     f"(tried in turn) [SPLITWISE_ADDRESS] (default {DEFAULT_ADDRESS})")
    gen.add_argument("--api-key", default="", help="the API key (default: SPLITWISE_API_KEY, else .splitwise/api-key "
                     "of a local splitwise up)")
    gen.add_argument("--tls-ca", default="", help="the scheduler serves TLS: verify it with this CA file "
                     "(default: SPLITWISE_TLS_CA)")
    gen.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    gen.add_argument("--system", default="", help="system message")
    gen.add_argument("--max-tokens", type=int, default=256)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--timeout", type=float, default=600.0)
    gen.add_argument("--quiet", action="store_true", help="no timing line")
    gen.set_defaults(run=lambda a: asyncio.run(_generate(a)))

    status = sub.add_parser("status", help="print the cluster's workers and load")
    status.add_argument("--address", default="", help="as generate's")
    status.add_argument("--admin-key", default="", help="the scheduler's admin key (default: SPLITWISE_ADMIN_KEY, "
                        "else .splitwise/admin-key of a local splitwise up)")
    status.add_argument("--tls-ca", default="", help="as generate's")
    status.add_argument("--watch", type=float, default=0, metavar="SECONDS",
                        help="refresh every SECONDS until interrupted (pools and transitions live)")
    status.add_argument("--run-dir", default=".splitwise",
                        help="a local `splitwise up`'s run dir: its admin key, and its services' restarts")
    status.set_defaults(run=lambda a: asyncio.run(_status(a)))
    health = sub.add_parser("health", help="exit 0 when the service at ADDRESS reports SERVING (gRPC health)")
    health.add_argument("address")
    health.add_argument("--tls-dir", default=os.environ.get("SPLITWISE_TLS_DIR", ""),
                        help="check an internal service over mTLS, as the cluster's admin identity [SPLITWISE_TLS_DIR]")
    health.set_defaults(run=_health)

    certs = sub.add_parser("certs", help="make a cluster CA, a certificate per service role, and the cluster key",
                           description="Writes ca.pem, ROLE.pem and ROLE-key.pem for each role, and cluster.key, "
                                       "into DIR: the files every service's --tls-dir (SPLITWISE_TLS_DIR) reads.")
    certs.add_argument("--dir", required=True)
    certs.add_argument("--host", action="append", help="another name or IP clients use to reach the scheduler "
                       "over public TLS (repeatable; localhost, loopback and this host's name are always in)")
    certs.add_argument("--force", action="store_true", help="replace what DIR holds")
    certs.set_defaults(run=_certs)

    prepare = sub.add_parser("prepare", help="convert and cache the model now (done on first start otherwise)")
    prepare.add_argument("--model", default=os.environ.get("SPLITWISE_MODEL", DEFAULT_MODEL))
    prepare.set_defaults(run=_prepare)

    bench = sub.add_parser("bench", help="benchmarks against a running cluster")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    replay = bench_sub.add_parser("replay", help="replay an Azure LLM trace open-loop; latencies, SLOs, goodput",
                                  description="Replays the Azure LLM inference traces against a running cluster "
                                              "through the public API (open loop), and reports latencies and SLOs.")
    from splitwise.replay import add_arguments as replay_arguments

    replay_arguments(replay)
    replay.set_defaults(run=_bench_replay)

    trace = sub.add_parser("trace", help="draw one request's spans as a waterfall, from the span files of `up`")
    trace.add_argument("request_id")
    trace.add_argument("--traces", nargs="+", action="extend", metavar="PATH",
                       help="span files, or folders of *.jsonl (default .splitwise/traces, `up`'s RUN_DIR/traces)")
    trace.add_argument("--png", default="", metavar="FILE", help="also draw the waterfall into this PNG")
    trace.add_argument("--width", type=int, default=0, help="columns (default: the terminal's width)")
    trace.set_defaults(run=_trace)

    profile = sub.add_parser("profile", help="measure the engine's step times here: a profile for the simulator",
                             description="Loads the model as a token worker with these options does, times prefill "
                                         "batches and decode batches on its engine, and writes a profile CSV (the "
                                         "paper's columns) with a sidecar JSON (model shape, KV capacity, host).")
    from splitwise.sim.profile_options import add_arguments as profile_arguments

    profile_arguments(profile)
    profile.set_defaults(run=_profile)

    from splitwise.sim.commands import add_plan_arguments, add_sim_arguments

    sim = sub.add_parser("sim", help="simulate cluster designs on a trace: latencies, SLOs, cost and power",
                         description="A discrete-event simulation running the live scheduler's routing and pool "
                                     "code and the engine's batching code in virtual time, on machines timed by the "
                                     "paper's performance profiles.")
    add_sim_arguments(sim)
    sim.set_defaults(run=_sim)
    plan = sub.add_parser("plan", help="search cluster designs: most throughput for a budget, or least cost/power for a rate",
                          description="Simulates the paper's design families (colocated baselines, Splitwise pairs) "
                                      "at several sizes and splits; prints a table, writes per-design and per-request "
                                      "CSVs and plots of throughput against cost and power with the Pareto front.")
    add_plan_arguments(plan)
    plan.set_defaults(run=_plan)
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    sys.exit(args.run(args))


if __name__ == "__main__":
    main()
