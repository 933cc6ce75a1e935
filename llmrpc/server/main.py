"""Wiring of a server process: device, engine, gRPC handler, signals."""

from __future__ import annotations

import faulthandler
import ipaddress
import logging
import os
import signal
import socket
import sys
import threading
from concurrent import futures

import grpc

from llmrpc.server import cores

logger = logging.getLogger(__name__)

SHUTDOWN_STACKS_AFTER = 10.0  # seconds


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name) is this machine's loopback only."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        found = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(found) and all(ipaddress.ip_address(str(a[4][0]).split("%")[0]).is_loopback for a in found)


def prepare_threads_env(spin: int | None = None, pin: bool = False) -> None:
    """ggml's CPU threads (OpenMP in llama-cpp-python's build) spin while they wait: between
    ops (ggml's barrier is an OpenMP barrier, so sleeping there costs milliseconds per token)
    and after a graph. libgomp's default (~3 ms) suits a server alone on its machine, and
    servers that share one end their threads after each batch instead (``--release-threads``);
    ``spin`` overrides it. ``pin``: compute thread i stays on core i (OpenMP's places), so that
    servers taking turns on one machine's cores each find their threads where they left them
    (3 servers on 2 cores: 0.77 -> 0.84x of llama.cpp, and 0.78 -> 0.82x in another run).
    Must run before libggml is loaded; the environment's own OMP_* settings win."""
    if spin is not None and "OMP_WAIT_POLICY" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = str(spin)
    cores.remember()
    if pin and "OMP_PROC_BIND" not in os.environ:
        os.environ["OMP_PROC_BIND"] = "true"
        os.environ.setdefault("OMP_PLACES", "cores")


def serve(
    *,
    host: str,
    port: int,
    device: str | None,
    threads: int | None,
    max_sessions: int,
    max_ctx: int,
    memory_cap: int = 0,
    prefix_cache: int | None = None,
    cache_dir: str | None = None,
    cache_max: int | None = None,
    model_dirs: tuple[str, ...] = (),
    calibrate: bool = True,
    omp_spin: int | None = None,
    host_lock: str | None = None,
    data_port: int = 0,
    release_threads: bool = False,
    pin_threads: bool = False,
    token: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    tls_ca: str | None = None,
    metrics_port: int | None = None,
    announce: bool = False,
    session_ttl: float = 600.0,
    max_connections: int = 256,
    hello_timeout: float = 10.0,
) -> int:
    prepare_threads_env(omp_spin, pin_threads)
    from llmrpc.auth import TokenChecker, client_context, server_context, server_credentials

    tls_server = tls_client = credentials = None
    if tls_cert and tls_key:
        try:  # gRPC, the data plane and uploads in TLS; to the next servers, certificates checked against the CA
            credentials = server_credentials(tls_cert, tls_key)
            tls_server = server_context(tls_cert, tls_key)
            tls_client = client_context(tls_ca or tls_cert)
        except ValueError as e:
            print(f"llmrpc-server: {e}", file=sys.stderr)
            return 2
    from llmrpc.ggml import lib
    from llmrpc.ggml.device import find_device
    from llmrpc.server.engine import Engine
    from llmrpc.server.limits import GRPC_OPTIONS, MAX_CALLS, CallLimits
    from llmrpc.server.service import StageService
    from llmrpc.v1 import llmrpc_pb2_grpc as pb_grpc

    lib.route_logs()
    try:
        dev = find_device(device)
    except (ValueError, RuntimeError) as e:
        print(f"llmrpc-server: {e}", file=sys.stderr)
        return 2
    n_threads = threads or os.cpu_count() or 1
    if dev.kind != "cpu" and (host_lock or release_threads):
        # Both exist for servers whose compute shares a machine's cores; a GPU stage's does not,
        # and stages on GPUs should overlap (one computes while another sends).
        logger.info("computing on %s: --host-lock and --release-threads do not apply", dev.name)
        host_lock, release_threads = None, False
    from pathlib import Path

    from llmrpc.server.store import WeightStore, default_cache_dir

    try:
        store = WeightStore(
            Path(cache_dir) if cache_dir else default_cache_dir(), [Path(d) for d in model_dirs], cache_max
        )
    except OSError as e:
        print(f"llmrpc-server: cannot use the cache directory: {e}", file=sys.stderr)
        return 2
    from llmrpc.server.dataplane import DataPlane
    from llmrpc.server.loop import ComputeLoop

    loop = ComputeLoop()  # the compute thread: on the core OpenMP bound this one to, if pinned
    cores.free_others(loop.native_id)
    engine = Engine(
        dev, n_threads, max_sessions=max_sessions, max_ctx=max_ctx, memory_cap=memory_cap, store=store, data_host=host,
        host_lock=host_lock, prefix_cache=prefix_cache,
        calibrate_device=calibrate, loop=loop, release_threads=release_threads, upload_tls=tls_server,
    )  # fmt: skip
    try:
        data = DataPlane(
            engine, loop, host, data_port, tls_server=tls_server, tls_client=tls_client, session_ttl=session_ttl,
            max_connections=max_connections, hello_timeout=hello_timeout,
        )  # fmt: skip
    except OSError as e:
        print(f"llmrpc-server: cannot open the data port {host}:{data_port}: {e}", file=sys.stderr)
        engine.close()
        return 2
    limits = CallLimits(lambda: engine.max_input_elements() * 4)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=MAX_CALLS), options=GRPC_OPTIONS, maximum_concurrent_rpcs=MAX_CALLS,
        interceptors=[TokenChecker(token), limits] if token else [limits],
    )  # fmt: skip
    pb_grpc.add_StageServicer_to_server(StageService(engine, data.port, data.token, data.declare_peers), server)
    if credentials is not None:
        bound = server.add_secure_port(f"{host}:{port}", credentials)
    else:
        bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        print(f"llmrpc-server: cannot listen on {host}:{port} (in use or not permitted)", file=sys.stderr)
        data.close()
        engine.close()
        return 2
    server.start()
    metrics = None
    if metrics_port is not None:
        from llmrpc.server.metrics import ServerMetrics

        try:
            metrics = ServerMetrics(engine, host, metrics_port)
        except OSError as e:
            print(f"llmrpc-server: cannot open the metrics port {host}:{metrics_port}: {e}", file=sys.stderr)
            server.stop(grace=0).wait()
            data.close()
            engine.close()
            return 2
    announcer = None
    if announce:
        from llmrpc.discovery import Announcer

        try:
            announcer = Announcer(bound, token or "")
        except (ValueError, OSError) as e:
            print(f"llmrpc-server: cannot answer discovery: {e}", file=sys.stderr)
            server.stop(grace=0).wait()
            data.close()
            engine.close()
            return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if not token and credentials is None and not is_loopback(host):
        logger.warning(
            "listening on %s with neither --token nor TLS: anyone who can reach this address can use this server "
            "(load models, read and steer its computations); give it --token (or LLMRPC_TOKEN) and --tls-cert/"
            "--tls-key, or listen on 127.0.0.1",
            host,
        )
    # The ready line: tests and `llmrpc-head --local` read the bound port from it.
    print(
        f"llmrpc-server listening on {host}:{bound} data={data.port} device={dev.name} threads={n_threads}"
        f" tls={'on' if credentials else 'off'} token={'on' if token else 'off'}"
        + (f" metrics={metrics.port}" if metrics else ""),
        flush=True,
    )
    logger.info("serving on %s:%d (%s, %s)", host, bound, dev.name, dev.description)
    stop.wait()
    logger.info("shutting down")
    # a shutdown that does not end within this prints every thread's stack to stderr (what waits)
    faulthandler.dump_traceback_later(SHUTDOWN_STACKS_AFTER)
    server.stop(grace=2).wait()
    if metrics is not None:
        metrics.close()
    if announcer is not None:
        announcer.close()
    data.close()
    engine.close()
    faulthandler.cancel_dump_traceback_later()
    return 0
