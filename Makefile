PY ?= .venv/bin/python

.PHONY: install test lint proto bench clean

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
	$(PY) -m llmrpc.bench.run
	@# where a step's time goes: a short run of its own (stamps cost time, kept out of the figures above)
	$(PY) -m llmrpc.bench.run --reps 1 --pp 64 --serving "" --no-lan --no-llama-rpc --no-via-head --no-load \
		--trace bench/out/trace --out bench/out/trace.json
	$(PY) -m llmrpc.bench.run --model synthetic-1b --reps 3 --pp 256 --tg 64 --serving "" --no-lan \
		--out bench/out/synthetic-1b.json

clean:
	rm -rf .venv build *.egg-info .pytest_cache .mypy_cache .ruff_cache
