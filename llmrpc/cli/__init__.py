"""Command-line entry points: ``llmrpc-server`` and ``llmrpc-head`` (a group: run, plan, serve,
status). ``python -m llmrpc.cli`` holds them all (``server``, ``head``, and the head's commands)."""

from __future__ import annotations

import click

from llmrpc.cli.common import parse_bytes
from llmrpc.cli.head import head
from llmrpc.cli.server import server

head_main = head  # the name llmrpc-head scripts installed by older versions of this package import

__all__ = ["head", "head_main", "main", "parse_bytes", "server"]


@click.group()
def main() -> None:
    """llmrpc commands (also installed as llmrpc-server and llmrpc-head)."""


main.add_command(server, "server")
main.add_command(head, "head")
for _name, _command in head.commands.items():
    main.add_command(_command, _name)
