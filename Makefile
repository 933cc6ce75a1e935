PY ?= .venv/bin/python

.PHONY: install test lint proto bench bench-models bench-8b clean

install:  ## everything: llmrpc, llama-cpp-python (compiles, minutes), SmolLM2, dev tools
	python3 -m venv .venv && .venv/bin/pip install -e ".[dev]"

test:
	$(PY) -m pytest

lint:
	$(PY) -m ruff check llmrpc tests bench examples
	$(PY) -m ruff format --check llmrpc tests bench examples
	$(PY) -m mypy

proto:  ## regenerate llmrpc/v1 from proto/llmrpc/v1/llmrpc.proto
	$(PY) -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. proto/llmrpc/v1/llmrpc.proto

bench:  ## pp512/tg128 through 1, 2 and 3 loopback servers next to llama.cpp, same run; then a 1B-class model
	$(PY) -m llmrpc.bench.run --by-hand 3
	@# where a step's time goes: a short run of its own (stamps cost time, kept out of the figures above)
	$(PY) -m llmrpc.bench.run --reps 1 --pp 64 --serving "" --no-lan --no-llama-rpc --no-via-head --no-load \
		--trace bench/out/trace --out bench/out/trace.json
	$(PY) -m llmrpc.bench.run --model synthetic-1b --reps 3 --pp 512 --tg 64 --serving "" --no-lan \
		--out bench/out/synthetic-1b.json

bench-models:  ## other families and quant types through 1 and 3 servers next to llama.cpp (defaults: repacked weights, flash attention)
	for m in synthetic-gemma3 synthetic-qwen3moe; do \
		$(PY) -m llmrpc.bench.run --model $$m --servers 3 --reps 3 --pp 512 --tg 64 --serving "" --no-lan \
			--no-llama-rpc --no-via-head --no-load --out bench/out/$$m.json || exit 1; done
	for t in q4_0 q4_k_m q5_k_m q6_k q8_0 iq4_nl f16; do \
		$(PY) -m llmrpc.bench.run --model synthetic-1b-$$t --servers 1,3 --reps 2 --pp 512 --tg 128 --serving "" \
			--no-lan --no-llama-rpc --no-via-head --no-load --out bench/out/synthetic-1b-$$t.json || exit 1; done

bench-8b:  ## an 8B-class model over three servers capped at 2 GiB: start, restart from caches, decode
	$(PY) -m llmrpc.bench.cli restart --model synthetic-8b --servers 3 --mem 2GiB --out bench/out/restart-8b.json
	$(PY) -m llmrpc.bench.run --model synthetic-8b --servers 3 --reps 2 --pp 128 --tg 32 --serving "" --no-lan \
		--no-llama-rpc --no-via-head --no-load --out bench/out/synthetic-8b.json

clean:
	rm -rf .venv build *.egg-info .pytest_cache .mypy_cache .ruff_cache
