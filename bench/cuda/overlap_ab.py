"""Decode through one server that waits for each batch as it starts (LLMRPC_OVERLAP=0)
next to one that starts the next step and reports the token while the device computes
(LLMRPC_OVERLAP=1, a GPU's default), and llama.cpp in this process, in turn, rep by rep:
    python bench/cuda/overlap_ab.py MODEL.gguf CUDA0 [REPS] [SPY_OUT]
With SPY_OUT, py-spy samples the overlapping server's Python for 3 s of generation (raw stacks)."""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import time

import llama_cpp  # noqa: F401  (before grpc: see run.sh)
import numpy as np

from llmrpc.bench.run import farm_config, llama_cpp_config, measure_interleaved
from llmrpc.farm import Farm
from llmrpc.sampling import SamplingParams
from llmrpc.server.engine import OVERLAP_ENV


def main(model: str, device: str, reps: int, spy_out: str) -> None:
    threads = os.cpu_count() or 1
    tokens = [1] + [int(t) for t in np.random.default_rng(0).integers(100, 10000, size=128)]
    configs = [llama_cpp_config(model, threads, 256, 128, 0 if device == "CPU" else 999)]
    farms = {}
    for overlap in ("0", "1"):
        os.environ[OVERLAP_ENV] = overlap
        farms[overlap] = Farm(model, local=1, threads=threads, device=device, ctx_size=1200)
        configs.append(farm_config(farms[overlap], f"x1 overlap={overlap}"))
    try:
        for r in measure_interleaved(configs, [("tg", 128)], tokens, reps):
            print(f"{r.config:<16} {r.test} {r.tok_s_mean:8.1f} ± {r.tok_s_std:5.1f} tok/s "
                  f"{1e3 / r.tok_s_mean:.3f} ms/token  (median {1e3 / statistics.median(r.samples):.3f})")  # fmt: skip
        spy = shutil.which("py-spy") or "/tmp/site/bin/py-spy"
        local = farms["1"]._local
        if spy_out and os.path.exists(spy) and local is not None:
            pid = local.processes[0].pid
            p = subprocess.Popen([spy, "record", "--nonblocking", "-r", "1000", "-d", "3", "-f", "raw", "-o", spy_out,
                                  "-p", str(pid)], stdout=subprocess.DEVNULL)  # fmt: skip
            time.sleep(0.3)
            with farms["1"].session() as s:
                n = sum(1 for _ in s.generate([1], 1100, SamplingParams(temperature=0)))
            p.wait(timeout=30)
            print(f"py-spy: {n} tokens sampled into {spy_out}")
    finally:
        for c in configs:
            c.close()


if __name__ == "__main__":
    main(
        sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 5, sys.argv[4] if len(sys.argv) > 4 else ""
    )
