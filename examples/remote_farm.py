"""Use servers that run elsewhere: start `llmrpc-server --host 0.0.0.0` on each node, then

    python examples/remote_farm.py --model M.gguf 10.0.0.2:50052 10.0.0.3:50052

The head plans the split by each server's memory and speed, ships every server the tensors of
its layers when it has no copy (once: servers cache them), and streams activations through.
"""

from __future__ import annotations

import argparse

import llmrpc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF file (default: the packaged SmolLM2)")
    ap.add_argument("--prompt", default="Once upon a time")
    ap.add_argument("-n", type=int, default=48)
    ap.add_argument("servers", nargs="+", help="host:port of each llmrpc-server")
    args = ap.parse_args()
    with llmrpc.Farm(args.model, servers=args.servers, progress=True) as farm:
        for stage in farm.plan:
            shipped = farm.bytes_shipped.get(stage.address, 0)
            print(
                f"# {stage.address}: layers [{stage.start}, {stage.end}), weights from "
                f"{farm.load_sources[stage.address]} ({shipped} bytes shipped)"
            )
        for piece in farm.stream(args.prompt, max_tokens=args.n):
            print(piece, end="", flush=True)
        print()


if __name__ == "__main__":
    main()
