"""Wiring of a server process: device, engine, gRPC handler, signals."""

from __future__ import annotations

import contextlib
import faulthandler
import ipaddress
import logging
import os
import signal
import socket
import ssl
import sys
import threading
from concurrent import futures
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from llmrpc.server import cores

if TYPE_CHECKING:
    from llmrpc.discovery import Announcer
    from llmrpc.server.dataplane import DataPlane
    from llmrpc.server.engine import Engine
    from llmrpc.server.metrics import ServerMetrics
    from llmrpc.server.store import WeightStore
    from llmrpc.types import DeviceInfo

logger = logging.getLogger(__name__)

SHUTDOWN_STACKS_AFTER = 10.0  # seconds
PARENT_CHECK_EVERY = 1.0  # seconds, with --exit-with-parent


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


class StartError(Exception):
    """What keeps a server from starting: said on its stderr, and it exits with 2."""


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
    exit_with_parent: bool = False,
    session_ttl: float = 600.0,
    max_connections: int = 256,
    hello_timeout: float = 10.0,
) -> int:
    """Run a server until SIGTERM or SIGINT; 0 then, 2 when it cannot start."""
    prepare_threads_env(omp_spin, pin_threads)
    from llmrpc.ggml import lib
    from llmrpc.server.dataplane import DataPlane
    from llmrpc.server.engine import Engine
    from llmrpc.server.loop import ComputeLoop

    stop = threading.Event()
    try:
        with contextlib.ExitStack() as parts:  # each part closed in the reverse order of its start
            credentials, tls_server, tls_client = _tls(tls_cert, tls_key, tls_ca)
            lib.route_logs()
            dev, n_threads, host_lock, release_threads = _device(device, threads, host_lock, release_threads)
            store = _store(cache_dir, model_dirs, cache_max)
            loop = ComputeLoop()  # the compute thread: on the core OpenMP bound this one to, if pinned
            cores.free_others(loop.native_id)
            engine = Engine(
                dev, n_threads, max_sessions=max_sessions, max_ctx=max_ctx, memory_cap=memory_cap, store=store,
                data_host=host, host_lock=host_lock, prefix_cache=prefix_cache, calibrate_device=calibrate, loop=loop,
                release_threads=release_threads, upload_tls=tls_server,
            )  # fmt: skip
            parts.callback(engine.close)
            try:
                data = DataPlane(
                    engine, loop, host, data_port, tls_server=tls_server, tls_client=tls_client,
                    session_ttl=session_ttl, max_connections=max_connections, hello_timeout=hello_timeout,
                )  # fmt: skip
            except OSError as e:
                raise StartError(f"cannot open the data port {host}:{data_port}: {e}") from e
            parts.callback(data.close)
            server, bound = _grpc_server(engine, data, host, port, token, credentials)
            parts.callback(lambda: server.stop(grace=2 if stop.is_set() else 0).wait())
            metrics = _metrics(engine, host, metrics_port)
            if metrics is not None:
                parts.callback(metrics.close)
            if announce:
                parts.callback(_announcer(bound, token).close)
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: stop.set())
            if exit_with_parent:
                _watch_parent(stop)
            if not token and credentials is None and not is_loopback(host):
                logger.warning(
                    "listening on %s with neither --token nor TLS: anyone who can reach this address can use this "
                    "server (load models, read and steer its computations); give it --token (or LLMRPC_TOKEN) and "
                    "--tls-cert/--tls-key, or listen on 127.0.0.1",
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
    except StartError as e:
        print(f"llmrpc-server: {e}", file=sys.stderr)
        return 2
    finally:
        faulthandler.cancel_dump_traceback_later()
    return 0


def _watch_parent(stop: threading.Event) -> None:
    """Set ``stop`` once the process that started this one has ended: this one is then handed to
    another parent (init, or a subreaper), which ``getppid`` shows."""
    parent = os.getppid()

    def watch() -> None:
        while not stop.wait(PARENT_CHECK_EVERY):
            if os.getppid() != parent:
                logger.warning("the process that started this server (pid %d) has ended: shutting down", parent)
                stop.set()

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _tls(cert: str | None, key: str | None, ca: str | None) -> tuple[Any, ssl.SSLContext | None, ssl.SSLContext | None]:
    """gRPC's credentials, the data plane's and uploads' server context, and the context checking
    the next servers' certificates against the CA; none of them without a certificate and key."""
    if not (cert and key):
        return None, None, None
    from llmrpc.auth import client_context, server_context, server_credentials

    try:
        return server_credentials(cert, key), server_context(cert, key), client_context(ca or cert)
    except ValueError as e:
        raise StartError(str(e)) from e


def _device(
    name: str | None, threads: int | None, host_lock: str | None, release_threads: bool
) -> tuple[DeviceInfo, int, str | None, bool]:
    """The device, its threads, and whether the server takes turns on its machine's cores."""
    from llmrpc.ggml.device import find_device

    try:
        dev = find_device(name)
    except (ValueError, RuntimeError) as e:
        raise StartError(str(e)) from e
    if dev.kind != "cpu" and (host_lock or release_threads):
        # Both exist for servers whose compute shares a machine's cores; a GPU stage's does not,
        # and stages on GPUs should overlap (one computes while another sends).
        logger.info("computing on %s: --host-lock and --release-threads do not apply", dev.name)
        host_lock, release_threads = None, False
    return dev, threads or os.cpu_count() or 1, host_lock, release_threads


def _store(cache_dir: str | None, model_dirs: tuple[str, ...], cache_max: int | None) -> WeightStore:
    from llmrpc.server.store import WeightStore, default_cache_dir

    try:
        return WeightStore(Path(cache_dir) if cache_dir else default_cache_dir(), [Path(d) for d in model_dirs],
                           cache_max)  # fmt: skip
    except OSError as e:
        raise StartError(f"cannot use the cache directory: {e}") from e


def _grpc_server(
    engine: Engine, data: DataPlane, host: str, port: int, token: str | None, credentials: Any
) -> tuple[grpc.Server, int]:
    """The gRPC service started on ``host:port``, and the port it got."""
    from llmrpc.auth import TokenChecker
    from llmrpc.server.limits import GRPC_OPTIONS, MAX_CALLS, CallLimits
    from llmrpc.server.service import StageService
    from llmrpc.v1 import llmrpc_pb2_grpc as pb_grpc

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
        server.stop(grace=0)
        raise StartError(f"cannot listen on {host}:{port} (in use or not permitted)")
    server.start()
    return server, bound


def _metrics(engine: Engine, host: str, port: int | None) -> ServerMetrics | None:
    if port is None:
        return None
    from llmrpc.server.metrics import ServerMetrics

    try:
        return ServerMetrics(engine, host, port)
    except OSError as e:
        raise StartError(f"cannot open the metrics port {host}:{port}: {e}") from e


def _announcer(port: int, token: str | None) -> Announcer:
    from llmrpc.discovery import Announcer

    try:
        return Announcer(port, token or "")
    except (ValueError, OSError) as e:
        raise StartError(f"cannot answer discovery: {e}") from e
