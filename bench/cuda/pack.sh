#!/bin/bash
# Packs what the CUDA check needs into .device/ (ignored by git, carried by the device tool):
# the wheels the GPU machine's image lacks (cp312) and llama-cpp-python's llama.cpp source,
# trimmed to what a CUDA build of libllama + llama-bench reads (8 MB instead of 76 MB).
#   bash bench/cuda/pack.sh          then, on the GPU machine: bash bench/cuda/run.sh
set -eu
cd "$(dirname "$0")/../.."
grep -qx "/.device/" .git/info/exclude 2>/dev/null || echo "/.device/" >> .git/info/exclude
mkdir -p .device/whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .device/whl grpcio==1.85.1 protobuf==7.36.2 gguf==0.19.0 diskcache==5.6.3
tmp=$(mktemp -d)
python3 -m pip download -q --no-deps --no-binary=:all: -d "$tmp" llama-cpp-python==0.3.36
tar xzf "$tmp"/llama_cpp_python-0.3.36.tar.gz -C "$tmp"
src="$tmp/llama_cpp_python-0.3.36"
rm -rf "$src"/{.git,docs,examples,tests,docker}
(cd "$src/vendor/llama.cpp" && rm -rf .git* models docs benches media examples tests app skills pocs gguf-py ci \
  conversion scripts grammars)
(cd "$src/vendor/llama.cpp/ggml/src" && rm -rf ggml-virtgpu ggml-cann ggml-openvino ggml-webgpu ggml-et ggml-metal \
  ggml-hexagon ggml-sycl ggml-vulkan ggml-opencl ggml-musa ggml-hip ggml-zdnn ggml-kompute)
tar czf .device/llama.tar.gz -C "$tmp" llama_cpp_python-0.3.36
rm -rf "$tmp"
du -sh .device
