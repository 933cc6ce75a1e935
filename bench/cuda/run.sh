#!/bin/bash
# The CUDA check, for one run on a GPU machine (the device tool; carry .device, made by pack.sh):
# builds llama.cpp's libraries and llama-bench with CUDA (~160 s on 16 cores), benches one CUDA
# server against llama.cpp (in-process, and llama-bench) on the same GPU, runs the core logits
# and generation tests with the servers on the GPU against llama.cpp on the same GPU, then
# benches the 1B-class model and profiles one stage in-process.
#   bash bench/cuda/run.sh            (results under $OUT, or /tmp/cuda-check)
#   LOCAL=1 QUICK="--reps 1 --pp 32 --tg 8" bash bench/cuda/run.sh   checks the script on this CPU
set -u
T0=$(date +%s)
stamp() { echo "=== [$(($(date +%s) - T0))s] $*"; }
OUTD=${OUT:-/tmp/cuda-check}
mkdir -p "$OUTD"
exec > >(tee "$OUTD/log.txt") 2>&1
export PYTHONUNBUFFERED=1
stamp start
if [ -z "${LOCAL:-}" ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .device/whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
  if [ ! -e /tmp/b/bin/libllama.so ]; then
    mkdir -p /tmp/src && tar xzf .device/llama.tar.gz -C /tmp/src || exit 1
    cmake -S /tmp/src/llama_cpp_python-0.3.36/vendor/llama.cpp -B /tmp/b -G Ninja -DCMAKE_BUILD_TYPE=Release \
      -DBUILD_SHARED_LIBS=ON -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_CUDA_FA=OFF -DGGML_CCACHE=OFF \
      -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
      -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_COMMON=ON -DLLAMA_BUILD_TOOLS=ON \
      >/tmp/cmake.txt 2>&1 || { tail -40 /tmp/cmake.txt; exit 1; }
    timeout 420 cmake --build /tmp/b -j "$(nproc)" --target llama llama-bench >/tmp/build.txt 2>&1 \
      || { tail -60 /tmp/build.txt; exit 1; }
    stamp built
  fi
  # llama-cpp-python's Python package over the libraries just built (one copy of each per process)
  [ -d /tmp/site/llama_cpp ] || cp -r /tmp/src/llama_cpp_python-0.3.36/llama_cpp /tmp/site/llama_cpp
  rm -rf /tmp/site/llama_cpp/lib && ln -s /tmp/b/bin /tmp/site/llama_cpp/lib
  # With grpcio imported first, llama.cpp's model load segfaults on that image (seen with
  # grpcio 1.85.1, CUDA 13.0): import llama_cpp first in every process.
  echo "import llama_cpp" >/tmp/site/sitecustomize.py
  export LLAMA_CPP_LIB_PATH=/tmp/b/bin LLMRPC_REF_GPU_LAYERS=99
  DEVICE=CUDA0
  BENCH=/tmp/b/bin/llama-bench
else
  export PATH=$PWD/.venv/bin:$PATH
  DEVICE=CPU
  BENCH="${LLAMA_BENCH:-}"
fi
python3 -c "from llmrpc.ggml.device import list_devices as l; print(*l(), sep='\n')"
B="python3 -m llmrpc.bench.run --device $DEVICE --no-lan --no-llama-rpc --no-via-head --no-load --servers 1 --head-sampled 1"
Q=${QUICK:---reps 3 --pp 512 --tg 128}
PARTS=${PARTS:-"bench135 tests bench1b profile"}
model() { python3 -c "from llmrpc.bench.models import resolve_model as r; print(r('$1'))" 2>/dev/null | tail -1; }
model1b() { model synthetic-1b; }
lbench() {
  [ -n "$BENCH" ] && timeout 40 "$BENCH" -m "$(ls ~/.cache/llmrpc/bench/$1-*.gguf | head -1)" -p 512 -n 128 -ngl 99 \
    -fa 0 -r 3 -o md 2>&1 | grep "^|" | tail -3
}
for part in $PARTS; do
  stamp "$part"
  case $part in
  # decode through one CUDA server (the servers generating, and the head sampling) against
  # llama.cpp on the same GPU, traced; then llama-bench
  bench135) timeout 150 $B --model synthetic-135m $Q --serving 1,4 --trace /tmp/trace-135m \
      --out "$OUTD/cuda-synthetic-135m.json" 2>&1 | grep -v "stopping:\|CUDA Graph id" | tail -40
    lbench synthetic-135m ;;
  # the same with ggml-cuda's graph optimization (concurrent streams) on, in every process
  opt135) GGML_CUDA_GRAPH_OPT=1 timeout 150 $B --model synthetic-135m $Q --serving "" \
      --out "$OUTD/cuda-synthetic-135m-opt.json" 2>&1 | grep -v "stopping:\|CUDA Graph id" | tail -12 ;;
  # the core logits tests and generation on the GPU (servers on CUDA, llama.cpp too)
  tests) timeout 150 python3 -m pytest -q -p no:cacheprovider --junitxml="$OUTD/junit.xml" \
      tests/test_tiny_model.py tests/test_batching.py tests/test_generation.py >"$OUTD/tests.txt" 2>&1
    grep -v "site-packages" "$OUTD/tests.txt" | grep -A25 "short test summary\|passed\|failed\|Current thread" | tail -30 ;;
  opttests) GGML_CUDA_GRAPH_OPT=1 timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_tiny_model.py \
      tests/test_batching.py tests/test_generation.py 2>&1 | tail -3 ;;
  bench1b) timeout 120 $B --model synthetic-1b $Q --serving 4 --trace /tmp/trace-1b --out "$OUTD/cuda-synthetic-1b.json" 2>&1 \
      | grep -v "stopping:\|CUDA Graph id" | tail -40
    lbench synthetic-1b ;;
  # one stage in-process next to llama.cpp; then with ggml-cuda's fusions off (does llama.cpp's
  # graph get fusions ours misses?) and with its concurrent-stream graph optimization on
  # one server waiting for each batch as it starts (LLMRPC_OVERLAP=0) next to one that starts
  # the next step and reports the token while the device computes, and llama.cpp; the second's
  # Python sampled by py-spy (raw stacks)
  ab1b) timeout 100 python3 bench/cuda/overlap_ab.py "$(model1b)" $DEVICE 5 "$OUTD/spy-1b.txt" 2>&1 \
      | grep "tok/s\|py-spy\|Error" ;;
  ab135) timeout 100 python3 bench/cuda/overlap_ab.py "$(model synthetic-135m)" $DEVICE 5 2>&1 | grep "tok/s\|Error" ;;
  # (on the 135m)
  profile) M135=$(ls ~/.cache/llmrpc/bench/synthetic-135m-*.gguf | head -1)
    for env in "" GGML_CUDA_DISABLE_FUSION=1 GGML_CUDA_GRAPH_OPT=1; do
      echo "-- profile $env"
      env $env timeout 60 python3 bench/cuda/stage_profile.py "$M135" $DEVICE 2>&1 | grep "ms/token\|prefill"
    done
    ;;
  profile1b) timeout 60 python3 bench/cuda/stage_profile.py "$(model1b)" $DEVICE 2>&1 | grep "ms/token\|prefill"
    echo "-- profile synthetic-1b, GGML_CUDA_DISABLE_GRAPHS=1"
    GGML_CUDA_DISABLE_GRAPHS=1 LLMRPC_PROFILE_N=200 timeout 40 python3 bench/cuda/stage_profile.py "$(model1b)" $DEVICE ours
    GGML_CUDA_DISABLE_GRAPHS=1 LLMRPC_PROFILE_N=200 timeout 40 python3 bench/cuda/stage_profile.py "$(model1b)" $DEVICE llama \
      2>&1 | grep "ms/token" ;;
  # the 1B's decode loop alone, ours and llama.cpp's, 2 x 6 steps under Nsight Compute (kernels
  # inside CUDA graphs one by one): the GPU time by kernel per step
  ncu) NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
    [ -z "$NCU" ] && { echo "no ncu here"; continue; }
    for who in ours llama; do
      LLMRPC_PROFILE_N=6 timeout 100 "$NCU" --clock-control none --metrics gpu__time_duration.sum --csv \
        --print-kernel-base function --print-units base python3 bench/cuda/stage_profile.py "$(model1b)" $DEVICE $who \
        >/tmp/ncu-$who.csv 2>&1
      echo "-- ncu $who"; grep "ms/token\|ERR" /tmp/ncu-$who.csv | head -5
      python3 bench/cuda/ncu_sum.py /tmp/ncu-$who.csv 12
    done ;;
  esac
done
stamp end
