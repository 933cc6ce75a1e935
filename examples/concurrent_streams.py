"""Several clients at once on one farm: each thread has its own session (its own KV cache on
every server). The servers generate on their own, and each computes the steps of all the
streams that are ready at the same time as one batch (the weights are read once for all).

    python examples/concurrent_streams.py [--model M.gguf] [--servers 3] [--clients 4]
"""

from __future__ import annotations

import argparse
import threading
import time

import llmrpc
from llmrpc.sampling import SamplingParams

PROMPTS = ["The sea is", "In the mountains,", "My favourite food is", "Tomorrow I will", "The old library"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF file (default: the packaged SmolLM2)")
    ap.add_argument("--servers", type=int, default=3)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("-n", type=int, default=32)
    args = ap.parse_args()
    with llmrpc.Farm(args.model, local=args.servers, ctx_size=256, max_sessions=args.clients) as farm:
        texts: list[str] = [""] * args.clients
        counts = [0] * args.clients

        def client(i: int) -> None:
            prompt = PROMPTS[i % len(PROMPTS)]
            sampling = SamplingParams(temperature=0.7, seed=i)
            tokens = list(farm.generate_tokens(farm.tokenizer.encode(prompt), args.n, sampling))
            texts[i], counts[i] = prompt + farm.tokenizer.decode(tokens), len(tokens)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - t0
        for i, text in enumerate(texts):
            print(f"[{i}] {text!r}")
        print(
            f"# {sum(counts)} tokens from {args.clients} streams in {seconds:.1f} s ({sum(counts) / seconds:.1f} tok/s)"
        )


if __name__ == "__main__":
    main()
