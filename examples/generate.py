"""Generate text with a model split over local servers (started and stopped by the Farm).

python examples/generate.py [--model M.gguf] [--servers 2] [--prompt TEXT]
"""

from __future__ import annotations

import argparse

import llmrpc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF file (default: the packaged SmolLM2)")
    ap.add_argument("--servers", type=int, default=2, help="local servers to split the layers over")
    ap.add_argument("--prompt", default="The three primary colours are")
    ap.add_argument("-n", type=int, default=32, help="tokens to generate")
    args = ap.parse_args()
    with llmrpc.Farm(args.model, local=args.servers, ctx_size=512) as farm:
        for stage in farm.plan:
            print(f"# {stage.address}: layers [{stage.start}, {stage.end})")
        # the whole completion at once, greedy
        print(args.prompt + farm.generate(args.prompt, max_tokens=args.n, temperature=0.0))
        # or piece by piece, sampled
        for piece in farm.stream(args.prompt, max_tokens=args.n, temperature=0.8, seed=1):
            print(piece, end="", flush=True)
        print()


if __name__ == "__main__":
    main()
