"""llmrpc-server: one server of a farm."""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass

import click

from llmrpc.cli.common import Bytes, gather, setup_logging, verbose_option


@dataclass(frozen=True)
class ServerOptions:
    """A server's settings: the keyword arguments of :func:`llmrpc.server.main.serve`."""

    host: str
    port: int
    data_port: int
    device: str | None
    threads: int | None
    max_sessions: int
    max_ctx: int
    session_ttl: float  # seconds a session may sit idle (0: for ever)
    max_connections: int  # data-plane connections open at once
    hello_timeout: float  # seconds a data connection may take to authenticate
    memory_cap: int  # 0: the device's free memory
    prefix_cache: int | None  # None: the --mem cap, or a quarter of the device's free memory
    cache_dir: str | None
    cache_max: int | None  # None: half the cache's filesystem
    model_dirs: tuple[str, ...]
    omp_spin: int | None
    host_lock: str | None
    calibrate: bool
    release_threads: bool
    pin_threads: bool
    token: str | None
    tls_cert: str | None
    tls_key: str | None
    tls_ca: str | None
    metrics_port: int | None  # None: no metrics
    announce: bool  # answer heads' discovery on the LAN
    exit_with_parent: bool  # end when the process that started this server ends


_server_options = gather(
    "options", ServerOptions,
    click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on."),
    click.option("--port", default=50052, show_default=True, type=int, help="Port to listen on (0: any free port)."),
    click.option("--data-port", default=0, show_default=True, type=click.IntRange(0, 65535),
                 help="TCP port of the data plane, where activations arrive from the head or the previous server "
                 "and leave for the next (0: any free port; Hello tells the head which). Open it between servers."),
    click.option("--device", default=None,
                 help="ggml device to compute on, e.g. CPU, CUDA0, Metal (default: the best present)."),
    click.option("--threads", default=None, type=click.IntRange(1, 1024), help="CPU threads (default: all cores)."),
    click.option("--max-sessions", default=64, show_default=True, type=click.IntRange(1, 100000),
                 help="Open sessions allowed at once."),
    click.option("--max-ctx", default=32768, show_default=True, type=click.IntRange(1),
                 help="Largest context a session may ask for."),
    click.option("--session-ttl", default=600.0, show_default=True, type=click.FloatRange(min=0),
                 help="Seconds a session may sit idle before it is closed (0: never). A head's sessions are also "
                 "closed when its data connection goes."),
    click.option("--max-connections", default=256, show_default=True, type=click.IntRange(1, 100000),
                 help="Data-plane connections open at once (heads' and other servers'; one more is closed at "
                 "once). A head holds one per server of its plan."),
    click.option("--hello-timeout", default=10.0, show_default=True, type=click.FloatRange(min=0.1),
                 help="Seconds a new data-plane connection may take to authenticate (its HELLO) before it is closed."),
    click.option("--mem", "memory_cap", default=0, type=Bytes(),
                 help="Most memory to use for weights, KV caches and compute, e.g. 6GiB "
                 "(default: the device's free memory)."),
    click.option("--prefix-cache", default=None, type=Bytes(),
                 help="Most memory for closed sessions' KV caches kept as prefixes of later ones, e.g. 2GiB; "
                 "0: none kept (default: --mem, or a quarter of the device's free memory). Within --mem: freed, "
                 "least recently used first, when a new session needs the room."),
    click.option("--cache-dir", default=None, type=click.Path(file_okay=False),
                 help="Where received model slices are kept (default: ~/.cache/llmrpc/slices)."),
    click.option("--cache-max", default=None, type=Bytes(),
                 help="Most disk the received slices may take, e.g. 100GiB (default: half the size of the "
                 "cache's filesystem). The least recently used ones other than the loaded one are removed to "
                 "make room; a slice that cannot fit is refused before any of it is written."),
    click.option("--model-dir", "model_dirs", multiple=True, type=click.Path(file_okay=False, exists=True),
                 help="A folder of GGUF files this server may load from (matched by content hash); repeatable. "
                 "A head's Load may name a file only inside these folders (links that lead out do not count); "
                 "without any, only shipped slices are loaded."),
    click.option("--omp-spin", default=None, type=click.IntRange(0),
                 help="OpenMP spin count of the compute threads between ops and after a batch "
                 "(default: libgomp's, about 3 ms; see --release-threads for servers that share cores)."),
    click.option("--host-lock", default=None, type=click.Path(dir_okay=False),
                 help="A lock file shared by servers on one machine: they take turns computing instead of "
                 "fighting over the same cores (set by llmrpc-head --local; ignored on a GPU)."),
    click.option("--no-calibrate", "calibrate", is_flag=True, flag_value=False, default=True,
                 help="Skip the speed measurement at start (reports speed 0: planned as average)."),
    click.option("--release-threads", is_flag=True,
                 help="Put the compute threads to sleep after each batch instead of letting them spin (parked "
                 "until the next frame arrives where the OpenMP runtime is libgomp, ended elsewhere): for servers "
                 "that share their cores with other servers (set by llmrpc-head --local; ignored on a GPU)."),
    click.option("--pin-threads", is_flag=True,
                 help="Keep compute thread i on core i (OpenMP places): for servers that share a machine and take "
                 "turns (set by llmrpc-head --local; OMP_PROC_BIND in the environment wins)."),
    click.option("--token", envvar="LLMRPC_TOKEN", default=None,
                 help="Refuse every call that does not carry this token (heads: --token; also from LLMRPC_TOKEN, "
                 "which keeps it off the command line)."),
    click.option("--tls-cert", default=None, type=click.Path(dir_okay=False),
                 help="PEM certificate: TLS on every port (gRPC, data plane, weight uploads)."),
    click.option("--tls-key", default=None, type=click.Path(dir_okay=False), help="PEM private key of --tls-cert."),
    click.option("--tls-ca", default=None, type=click.Path(dir_okay=False),
                 help="With --tls-cert: what the next servers' certificates must chain to, on the data plane "
                 "(default: --tls-cert itself, for one self-signed certificate shared by the farm)."),
    click.option("--metrics-port", default=None, type=click.IntRange(0, 65535),
                 help="Serve Prometheus metrics (GET /metrics: device memory, layers, sessions, steps, step latency, "
                 "bytes in and out) and GET /health on this HTTP port of --host (0: any free port; the ready line "
                 "says which). Without a token or TLS: it reveals no activations."),
    click.option("--announce", is_flag=True,
                 help="Let heads on this LAN find this server (llmrpc-head --discover, UDP multicast to "
                 "239.255.77.77:50099): it answers with its port and a proof of --token, which it needs."),
    click.option("--exit-with-parent", is_flag=True,
                 help="End (as on SIGTERM) once the process that started this server has ended, however it ended: "
                 "`llmrpc-head --local` and llmrpc.Farm start their servers so, and a head killed outright leaves "
                 "none behind."),
)  # fmt: skip


@click.command(
    "llmrpc-server",
    help="Serve a range of a model's layers. The head tells it which model and which layers to load; "
    "it keeps each session's KV cache for those layers. Prints "
    "'llmrpc-server listening on HOST:PORT data=PORT ...' once it accepts connections.",
)
@_server_options
@click.option("--list-devices", is_flag=True, help="Print the devices this build can use and exit.")
@verbose_option
def server(options: ServerOptions, list_devices: bool, verbose: int) -> None:
    setup_logging(verbose)
    if bool(options.tls_cert) != bool(options.tls_key):
        raise click.UsageError("--tls-cert and --tls-key go together")
    if options.announce and not options.token:
        raise click.UsageError("--announce needs the farm's token (--token or LLMRPC_TOKEN): its answers prove it")
    from llmrpc.server.main import prepare_threads_env, serve

    if list_devices:
        prepare_threads_env(options.omp_spin, options.pin_threads)
        from llmrpc.ggml.device import list_devices as devices

        for d in devices():
            click.echo(
                f"{d.name}\t{d.kind}\t{d.memory_free / 2**30:.1f}/{d.memory_total / 2**30:.1f} GiB free\t{d.description}"
            )
        return
    sys.exit(serve(**(asdict(options) | {"token": options.token or None})))
