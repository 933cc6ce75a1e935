"""ggml's preconditions on its operands, checked before an op is called.

ggml aborts the whole process (``GGML_ASSERT``) when the operands of an op do not fit each
other. For a server that is a GGUF whose tensors contradict its own hyper-parameters (a
damaged or hand-edited file): ``attn_q`` one head too wide, an expert tensor of the wrong
count, a rope dimension wider than a head. A stage builds its first graph, the one-row dry
run over data-less weights, through :class:`CheckedOps`: where ggml would abort, it raises
:class:`ShapeError` naming the op and its operands, and the load fails with that message.

The rules are ggml's own (``ggml.c``: the op constructors; ``ggml-cpu/ops.cpp`` for the rope
dimensions, checked only when the graph computes); the predicates ggml exports
(``ggml_can_repeat``, ``ggml_is_contiguous``, ...) are called, not rewritten.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Callable
from typing import Any

from llmrpc.ggml import lib as g

GGML_ROPE_TYPE_MROPE = 8  # the flag of multi-section rope (four positions a token)


class ShapeError(ValueError):
    """An op's operands that ggml would refuse by aborting."""


def _ne(t: g.Tensor) -> list[int]:
    return list(t.contents.ne)


def _describe(t: Any) -> str:
    if not isinstance(t, ctypes._Pointer) or not t:
        return repr(t)
    name = t.contents.name.decode(errors="replace") or f"({g.ggml().ggml_op_name(t.contents.op).decode().lower()})"
    return f"{name} {_ne(t)}"


def _can_mul_mat(a: g.Tensor, b: g.Tensor) -> bool:
    """``ggml_can_mul_mat`` (static in ggml.c): a's rows as long as b's, b's batch dimensions
    multiples of a's."""
    na, nb = _ne(a), _ne(b)
    return na[0] == nb[0] and na[2] > 0 and na[3] > 0 and nb[2] % na[2] == 0 and nb[3] % na[3] == 0


def _root(t: g.Tensor) -> tuple[g.Tensor, int]:
    """The tensor whose memory a view lies in, and the view's offset in it."""
    src = t.contents.view_src
    if src:
        return ctypes.cast(src, g.T), int(t.contents.view_offs)
    return t, 0


# Each check takes the op's arguments after its context and returns what is wrong, or None.
Check = Callable[..., str | None]
_CHECKS: dict[str, Check] = {}
_NO_CONTEXT = {"ggml_soft_max_add_sinks", "ggml_flash_attn_ext_add_sinks"}


def _checks(*names: str) -> Callable[[Check], Check]:
    def register(fn: Check) -> Check:
        for name in names:
            _CHECKS[name] = fn
        return fn

    return register


def _first(*conditions: tuple[bool, str]) -> str | None:
    return next((why for ok, why in conditions if not ok), None)


@_checks("ggml_mul_mat")
def _mul_mat(a: g.Tensor, b: g.Tensor) -> str | None:
    lib = g.ggml()
    return _first(
        (_can_mul_mat(a, b), "the matrix's rows and the input's columns differ"),
        (not lib.ggml_is_transposed(a), "the matrix is transposed"),
    )


@_checks("ggml_mul_mat_id")
def _mul_mat_id(experts: g.Tensor, b: g.Tensor, ids: g.Tensor) -> str | None:
    e, x, i = _ne(experts), _ne(b), _ne(ids)
    return _first(
        (e[3] == 1 and x[3] == 1 and i[2] == 1 and i[3] == 1, "more dimensions than experts take"),
        (i[1] == x[2], "one list of experts per row is needed"),
        (e[0] == x[0], "the experts' rows and the input's columns differ"),
        (x[1] > 0 and i[0] % x[1] == 0, "the experts chosen per row do not divide among the inputs"),
    )


@_checks("ggml_add", "ggml_mul", "ggml_div")
def _elementwise(a: g.Tensor, b: g.Tensor) -> str | None:
    return _first((g.ggml().ggml_can_repeat(b, a), "the second operand does not repeat to the first's shape"))


@_checks("ggml_get_rows")
def _get_rows(a: g.Tensor, rows: g.Tensor) -> str | None:
    x, r = _ne(a), _ne(rows)
    return _first((x[2] == r[1] and x[3] == r[2] and r[3] == 1, "row indices do not match the table's batches"))


@_checks("ggml_set_rows")
def _set_rows(a: g.Tensor, b: g.Tensor, idx: g.Tensor) -> str | None:
    lib = g.ggml()
    x, y, i = _ne(a), _ne(b), _ne(idx)
    return _first(
        (x[0] == y[0], "the rows written are not as long as the destination's"),
        (x[2] == y[2] and x[3] == y[3], "the rows written and the destination differ in batches"),
        (y[1] == i[0] and i[1] > 0 and i[2] > 0, "one index per row written is needed"),
        (y[2] % i[1] == 0 and y[3] % i[2] == 0 and i[3] == 1, "the indices do not broadcast to the rows"),
        (lib.ggml_is_contiguous_rows(a) and lib.ggml_is_contiguous_rows(b), "rows are not contiguous"),
    )


@_checks(*(f"ggml_reshape_{n}d" for n in range(1, 5)))
def _reshape(a: g.Tensor, *ne: int) -> str | None:
    lib = g.ggml()
    return _first(
        (lib.ggml_is_contiguous(a), "reshaping a tensor that is not contiguous"),
        (lib.ggml_nelements(a) == math.prod(ne), f"{lib.ggml_nelements(a)} elements do not make {list(ne)}"),
    )


@_checks("ggml_cont_2d")
def _cont_2d(a: g.Tensor, ne0: int, ne1: int) -> str | None:
    n = g.ggml().ggml_nelements(a)
    return _first((n == ne0 * ne1, f"{n} elements do not make {[ne0, ne1]}"))


def _view(dims: int) -> Check:
    def check(a: g.Tensor, *args: int) -> str | None:
        ne, offset = args[:dims], args[-1]
        lib = g.ggml()
        root, offs = _root(a)
        size = lib.ggml_row_size(a.contents.type, ne[0]) * math.prod(ne[1:])
        end = size + offset + offs
        return _first((size == 0 or end <= lib.ggml_nbytes(root), f"a view of {list(ne)} ends past its tensor"))

    return check


for _n in range(1, 5):
    _CHECKS[f"ggml_view_{_n}d"] = _view(_n)


@_checks("ggml_concat")
def _concat(a: g.Tensor, b: g.Tensor, dim: int) -> str | None:
    x, y = _ne(a), _ne(b)
    return _first(
        (0 <= dim < 4 and a.contents.type == b.contents.type, "a concatenation of different types"),
        (all(x[d] == y[d] for d in range(4) if d != dim), f"the operands differ beside dimension {dim}"),
    )


@_checks("ggml_rope_ext")
def _rope(a: g.Tensor, pos: g.Tensor, factors: Any, n_dims: int, mode: int, *_: Any) -> str | None:
    x, p = _ne(a), _ne(pos)
    per_token = 4 if mode & GGML_ROPE_TYPE_MROPE else 1
    return _first(
        (g.ggml().ggml_is_vector(pos) and x[2] * per_token == p[0], "one position per row is needed"),
        (0 < n_dims <= x[0] and n_dims % 2 == 0, f"rotating {n_dims} dimensions of rows of {x[0]}"),
        (not factors or _ne(factors)[0] >= n_dims // 2, "fewer frequency factors than rotated pairs"),
    )


def _mask_fits(mask: Any, x: list[int], rows_at_least: bool) -> str | None:
    if not mask:
        return None
    m = _ne(mask)
    return _first(
        (bool(g.ggml().ggml_is_contiguous(mask)), "the mask is not contiguous"),
        (not rows_at_least or (m[0] == x[0] and m[1] >= x[1]), "the mask is smaller than the scores"),
        (m[2] > 0 and m[3] > 0 and x[2] % m[2] == 0 and x[3] % m[3] == 0, "the mask does not broadcast"),
    )


@_checks("ggml_soft_max_ext")
def _soft_max_ext(a: g.Tensor, mask: Any, scale: float, max_bias: float) -> str | None:
    return _first(
        (bool(g.ggml().ggml_is_contiguous(a)), "softmax over scores that are not contiguous"),
        (max_bias <= 0 or bool(mask), "an ALiBi bias without a mask"),
    ) or _mask_fits(mask, _ne(a), True)


@_checks("ggml_soft_max")
def _soft_max(a: g.Tensor) -> str | None:
    return _first((bool(g.ggml().ggml_is_contiguous(a)), "softmax over scores that are not contiguous"))


@_checks("ggml_flash_attn_ext")
def _flash_attn(q: g.Tensor, k: g.Tensor, v: g.Tensor, mask: Any, *_: float) -> str | None:
    return _first(
        (_can_mul_mat(k, q), "the keys' and queries' heads differ in size, or the query heads are not a multiple"),
        (_ne(q)[3] == _ne(k)[3] == _ne(v)[3], "queries, keys and values differ in their last dimension"),
    ) or _mask_fits(mask, _ne(q), False)


@_checks("ggml_soft_max_add_sinks", "ggml_flash_attn_ext_add_sinks")
def _sinks(a: g.Tensor, sinks: g.Tensor) -> str | None:
    heads = _ne(ctypes.cast(a.contents.src[0], g.T))[2]
    return _first((_ne(sinks)[0] == heads, f"{_ne(sinks)[0]} attention sinks for {heads} heads"))


@_checks("ggml_swiglu_split", "ggml_geglu_split", "ggml_reglu_split", "ggml_swiglu_oai")
def _glu(a: g.Tensor, b: g.Tensor, *_: float) -> str | None:
    lib = g.ggml()
    return _first(
        (lib.ggml_is_contiguous_1(a) and lib.ggml_is_contiguous_1(b), "gate or up rows are not contiguous"),
        (lib.ggml_are_same_shape(a, b) and a.contents.type == b.contents.type, "the gate and up halves differ"),
    )


@_checks("ggml_add_id")
def _add_id(a: g.Tensor, b: g.Tensor, ids: g.Tensor) -> str | None:
    x, y, i = _ne(a), _ne(b), _ne(ids)
    return _first((x[0] == y[0] and x[1] == i[0] and x[2] == i[1], "the experts' biases do not fit their rows"))


@_checks("ggml_argsort_top_k")
def _top_k(a: g.Tensor, k: int) -> str | None:
    return _first((_ne(a)[0] >= k, f"choosing {k} of {_ne(a)[0]}"))


@_checks("ggml_repeat_4d")
def _repeat_4d(a: g.Tensor, *ne: int) -> str | None:
    x = _ne(a)
    fits = g.ggml().ggml_is_empty(a) or all(x[d] > 0 and ne[d] % x[d] == 0 for d in range(4))
    return _first((fits, f"{x} does not repeat to {list(ne)}"))


class CheckedOps:
    """The loaded ggml, whose ops with preconditions check them first and raise
    :class:`ShapeError` instead of letting ggml abort; everything else passes through."""

    def __init__(self, lib: g.Ggml) -> None:
        self._lib = lib

    def __getattr__(self, name: str) -> Any:
        fn = getattr(self._lib, name)
        check = _CHECKS.get(name)
        if check is None:
            return fn
        skip = 0 if name in _NO_CONTEXT else 1

        def checked(*args: Any) -> Any:
            problem = check(*args[skip:])
            if problem is not None:
                operands = ", ".join(_describe(t) for t in args[skip:] if isinstance(t, ctypes._Pointer))
                op = name.removeprefix("ggml_")
                raise ShapeError(f"tensors that do not fit the hyper-parameters: {op}({operands}): {problem}")
            return fn(*args)

        return checked
