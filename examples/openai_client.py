"""The OpenAI-compatible API: start `llmrpc-head serve` (here on 127.0.0.1 with two local
servers; across machines, give it --rpc-servers) and talk to it with OpenAI's own client.

    python examples/openai_client.py [--model M.gguf] [--chat] [-n 48]
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from openai import OpenAI

READY = "llmrpc-head serve listening on "


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF file (default: the packaged SmolLM2)")
    ap.add_argument("--prompt", default="Once upon a time")
    ap.add_argument("--chat", action="store_true", help="a chat completion (the model needs a chat template)")
    ap.add_argument("-n", type=int, default=48)
    args = ap.parse_args()
    cmd = [sys.executable, "-m", "llmrpc.cli", "serve", "--port", "0", "--local", "2", "--api-key", "example"]
    if args.model:
        cmd += ["--model", args.model]
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        if not line.startswith(READY):
            sys.exit(f"the API server did not start: {line!r}")
        url = line[len(READY) :].split()[0]
        print(f"# {url}")
        client = OpenAI(base_url=url, api_key="example")
        print(f"# models: {[m.id for m in client.models.list().data]}")
        if args.chat:
            chunks = client.chat.completions.create(
                model="any", messages=[{"role": "user", "content": args.prompt}], max_tokens=args.n, stream=True
            )
            for chunk in chunks:
                if chunk.choices and chunk.choices[0].delta.content:
                    print(chunk.choices[0].delta.content, end="", flush=True)
        else:
            for part in client.completions.create(model="any", prompt=args.prompt, max_tokens=args.n, stream=True):
                print(part.choices[0].text, end="", flush=True)
                if part.choices[0].finish_reason:
                    print(f"\n# finish_reason: {part.choices[0].finish_reason}", end="")
        print()
    finally:
        server.terminate()  # by PID: it stops its local servers too
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
