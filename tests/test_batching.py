"""Several sessions in one graph: the same numbers as each session on its own."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from llmrpc.ggml.device import Backend, find_device
from llmrpc.model.gguf_model import read_model
from llmrpc.model.stage import LayerStage
from llmrpc.model.synthetic import SyntheticSpec, write_gguf


@pytest.mark.parametrize("layers", [(0, 4), (0, 2), (2, 4)])
def test_a_batch_of_sessions_matches_each_alone(tiny_models: dict[str, str], layers: tuple[int, int]) -> None:
    info = read_model(tiny_models["F32"])
    backend = Backend(find_device("CPU"), 2)
    stage = LayerStage(info, *layers, backend)
    rng = np.random.default_rng(5)
    first = layers[0] == 0

    def rows(n: int) -> np.ndarray:
        if first:
            return rng.integers(3, 320, size=n).astype(np.int32)
        return rng.standard_normal((n, 64)).astype(np.float32)

    try:
        histories = [rows(n) for n in (3, 9, 300)]  # the last crosses a 256-cell step
        alone = [stage.new_cache(512) for _ in histories]
        batched = [stage.new_cache(512) for _ in histories]
        for h, a, b in zip(histories, alone, batched, strict=True):
            stage.forward(a, h, 0, False)
            stage.forward(b, h, 0, False)
        for all_outputs in (False, True):
            # one decode row for two sessions, four prompt rows for the third, in one graph
            nexts = [rows(1), rows(4), rows(1)]
            pos = [len(h) for h in histories]
            want = [stage.forward(c, x, p, all_outputs) for c, x, p in zip(alone, nexts, pos, strict=True)]
            got = stage.forward_batch(list(zip(batched, nexts, pos, strict=True)), all_outputs)
            for w, g in zip(want, got, strict=True):
                assert w.shape == g.shape
                # as one batch against token by token: float sums in another order, nothing more
                assert np.abs(w - g).max() <= 1e-4 * max(1.0, np.abs(w).max())
            histories = [np.concatenate([h, x]) for h, x in zip(histories, nexts, strict=True)]
        if stage.last:  # greedy: the device's argmax of each session's last row, as I32 [1]
            nexts = [rows(1), rows(4), rows(1)]
            pos = [len(h) for h in histories]
            logits = [stage.forward(c, x, p, False) for c, x, p in zip(alone, nexts, pos, strict=True)]
            top1 = stage.forward_batch(list(zip(batched, nexts, pos, strict=True)), False, top1=True)
            assert [t.dtype for t in top1] == [np.int32] * 3
            assert [int(t[0]) for t in top1] == [int(w[-1].argmax()) for w in logits]
    finally:
        for c in alone + batched:
            stage.forget(c)
            c.free()
        stage.close()
        backend.close()


def test_decode_steps_attend_to_their_own_position_after_a_rewind(tiny_models: dict[str, str]) -> None:
    """A one-row graph keeps its position inputs and changes them in place from step to step:
    a step back at an earlier position (a rewind) must attend to the cells before it and no
    further, and the steps after it again one cell more each."""
    info = read_model(tiny_models["F32"])
    backend = Backend(find_device("CPU"), 2)
    stage = LayerStage(info, 0, 4, backend)
    tokens = np.random.default_rng(7).integers(3, 320, size=12).astype(np.int32)
    stepped, fresh = stage.new_cache(512), stage.new_cache(512)
    try:
        for p in range(len(tokens)):
            stage.forward(stepped, tokens[p : p + 1], p, False)
        again = np.array([99, 100, 101], dtype=np.int32)
        got = [stage.forward(stepped, again[i : i + 1], 5 + i, False)[-1] for i in range(3)]
        # the same rows stepped in a session that never went further: the same numbers
        sequence = np.concatenate([tokens[:5], again])
        want = [stage.forward(fresh, sequence[p : p + 1], p, False)[-1] for p in range(len(sequence))][5:]
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g, w)
    finally:
        for c in (stepped, fresh):
            stage.forget(c)
            c.free()
        stage.close()
        backend.close()


def test_a_batch_of_many_sessions_through_every_layer_matches_each_alone(tmp_path: Path) -> None:
    """A graph's room is sized by the sessions in it: 64 sessions' rows through 16 layers are
    more nodes than any one fixed size held (ggml aborted the process)."""
    info = read_model(write_gguf(tmp_path / "deep.gguf", SyntheticSpec(n_layer=16, seed=3)))
    backend = Backend(find_device("CPU"), 2)
    stage = LayerStage(info, 0, info.hparams.n_layer, backend)
    rng = np.random.default_rng(9)
    prompts = [rng.integers(3, 320, size=2).astype(np.int32) for _ in range(64)]
    try:
        together = stage.forward_batch([(stage.new_cache(256), p, 0) for p in prompts], True)
        alone = [stage.forward(stage.new_cache(256), p, 0, True) for p in prompts]
        for got, want in zip(together, alone, strict=True):
            np.testing.assert_array_equal(got, want)
    finally:
        stage.close()
        backend.close()
