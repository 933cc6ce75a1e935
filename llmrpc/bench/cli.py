"""``llmrpc-bench``: the benchmark (``run``, the default) and the other checks a user can run
on their own machine (``conformance``), a large model's start and restart (``restart``), the prefix cache at work
(``prefix``), hostile inputs against live servers (``fuzz``) and a long run of many clients (``soak``)."""

from __future__ import annotations

import click

from llmrpc.bench.conformance import conformance
from llmrpc.bench.fuzz import fuzz
from llmrpc.bench.prefix import prefix
from llmrpc.bench.restart import restart
from llmrpc.bench.run import main as run
from llmrpc.bench.soak import soak


class _DefaultRun(click.Group):
    """``llmrpc-bench --reps 5`` is ``llmrpc-bench run --reps 5``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] not in ("--help", "-h")):
            args = ["run", *args]
        return super().parse_args(ctx, args)


@click.group(cls=_DefaultRun)
def main() -> None:
    """Benchmarks and conformance checks of llmrpc against llama.cpp on this machine."""


main.add_command(run, "run")
main.add_command(conformance, "conformance")
main.add_command(restart, "restart")
main.add_command(prefix, "prefix")
main.add_command(fuzz, "fuzz")
main.add_command(soak, "soak")


if __name__ == "__main__":
    main()
