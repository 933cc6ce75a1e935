"""Compute threads of servers that share cores: parked between graphs (asleep, kept), and
back for the next graph, which computes what a backend that never parks computes."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from llmrpc.ggml import lib as g
from llmrpc.ggml.device import Backend, find_device
from llmrpc.model.gguf_model import read_model
from llmrpc.model.stage import LayerStage


def _tasks() -> set[str]:
    return set(os.listdir("/proc/self/task"))


def _skip_where_workers_are_not_parked() -> None:
    probe = Backend(find_device("CPU"), 2, share_cores=True)
    parks = probe._team is not None
    probe.close()
    if not parks:
        pytest.skip("OpenMP workers are parked only with libgomp on Linux (elsewhere they end)")


def test_parked_workers_sleep_are_kept_and_compute_the_next_graph(tiny_models: dict[str, str]) -> None:
    _skip_where_workers_are_not_parked()
    info = read_model(tiny_models["Q8_0"])
    shared = Backend(find_device("CPU"), 2, share_cores=True)
    alone = Backend(find_device("CPU"), 2)
    omp_get_level = ctypes.CDLL(g.ggml().gomp_path).omp_get_level
    stages = [LayerStage(info, 0, 4, b) for b in (shared, alone)]
    caches = [s.new_cache(64) for s in stages]
    tokens = np.array([5, 17, 42, 7, 99, 3], dtype=np.int32)
    try:
        want = [stages[1].forward(caches[1], tokens[i : i + 1], i, False) for i in range(len(tokens))]
        got = [stages[0].forward(caches[0], tokens[:1], 0, False)]
        workers = _tasks()  # this thread's OpenMP workers exist now
        for i in range(1, len(tokens)):
            shared.release_threads()
            assert omp_get_level() == 1  # parked: inside a region of our own
            t0 = time.process_time()
            time.sleep(0.2)
            assert time.process_time() - t0 < 0.05, "parked workers spin instead of sleeping"
            shared.wake_threads()
            shared.claim_threads()
            assert omp_get_level() == 0  # the next graph gets the whole team
            got.append(stages[0].forward(caches[0], tokens[i : i + 1], i, False))
        assert _tasks() == workers, "the workers ended (or new ones started) between graphs"
        for w, x in zip(want, got, strict=True):
            np.testing.assert_array_equal(w, x)
    finally:
        for s, c in zip(stages, caches, strict=True):
            s.forget(c)
            c.free()
            s.close()
        shared.close()
        alone.close()


def test_a_process_that_exits_with_its_workers_parked_ends(tiny_models: dict[str, str]) -> None:
    """A server stopped between two tokens ends at once (its workers wait inside a region)."""
    _skip_where_workers_are_not_parked()
    script = textwrap.dedent(f"""
        import numpy as np
        from llmrpc.ggml.device import Backend, find_device
        from llmrpc.model.gguf_model import read_model
        from llmrpc.model.stage import LayerStage
        backend = Backend(find_device("CPU"), 2, share_cores=True)
        stage = LayerStage(read_model({tiny_models["Q8_0"]!r}), 0, 4, backend)
        stage.forward(stage.new_cache(64), np.array([5], dtype=np.int32), 0, False)
        backend.release_threads()
        print("parked" if backend._team.parked else "not parked", flush=True)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "parked"
