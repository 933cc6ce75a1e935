"""What the commands share: sizes, logging, and options declared once and gathered into a
typed object (so a command's signature does not spell every option again)."""

from __future__ import annotations

import dataclasses
import functools
import logging
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from llmrpc.types import split_address

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


class Bytes(click.ParamType):
    name = "size"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_bytes(str(value))
        except ValueError as e:
            self.fail(str(e), param, ctx)


class Addresses(click.ParamType):
    """'a:50052,b:50052' -> ('a:50052', 'b:50052'), each checked to be host:port."""

    name = "host:port,..."

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> tuple[str, ...]:
        if isinstance(value, tuple):
            return value
        addresses = tuple(a.strip() for a in str(value).split(",") if a.strip())
        for a in addresses:
            try:
                split_address(a)
            except ValueError as e:
                self.fail(str(e), param, ctx)
        return addresses


def setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s: %(message)s")


verbose_option = click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")


def stack(*decorators: Callable[[F], F]) -> Callable[[F], F]:
    """Options given as one decorator, in the order they are listed."""

    def apply(f: F) -> F:
        for d in reversed(decorators):
            f = d(f)
        return f

    return apply


def gather(name: str, cls: type[Any], *options: Callable[[F], F]) -> Callable[[F], F]:
    """Declare ``options`` on a command and hand their values to it as one ``cls`` instance,
    the keyword argument ``name``: the options' destinations are ``cls``'s fields."""
    fields = {f.name for f in dataclasses.fields(cls)}

    def apply(f: F) -> F:
        @functools.wraps(f)
        def command(**kwargs: Any) -> Any:
            own = {k: kwargs.pop(k) for k in list(kwargs) if k in fields}
            return f(**kwargs, **{name: cls(**own)})

        return stack(*options)(command)  # type: ignore[arg-type]

    return apply
