#!/usr/bin/env bash
# The GPU check of the Triton aggregation kernel, in one run, for a CUDA machine that has torch, Triton,
# numpy and pytest but neither Flower nor the model:
# 0. a preflight (gpu_preflight.py): CUDA usable by torch, and a tiny Triton kernel compiled and run (Triton
#    builds its launcher with a C compiler and Python's headers on first use); stops at once, saying why;
# 1. the compiled-kernel tests: test_triton.py on CUDA tensors (the gpu-marked ones included; a few check
#    CPU inputs or record payloads, as on any machine),
#    the sm_90 code checks, and growth on a CUDA model (tests/devft/growth/test_on_gpu.py);
# 2. the benchmark's device section with the launch-configuration sweep (docs/benchmarks.md, "Triton kernel
#    on the GPU").
# Writes gpu.txt, gpu_tests.txt, bench_gpu.txt and bench_gpu.json (rewritten after every case, so a run cut
# short keeps what it measured) to $OUT (default: the current folder).
# Time limits: TESTS_S (default 150) and BENCH_S (default 270) seconds, each killed 10 s after its limit.
# Exits non-zero when the preflight, the tests or the benchmark fail or time out; the benchmark runs even
# when a test failed.
set -uo pipefail
out=$(mkdir -p "${OUT:-.}" && cd "${OUT:-.}" && pwd)
cd "$(dirname "$0")/../.."
export PYTHONPATH=. PYTHONUNBUFFERED=1 TRITON_INTERPRET=0  # compiled kernels only: never the CPU interpreter
{ nvidia-smi --query-gpu=name,memory.total,clocks.max.memory,driver_version --format=csv
  echo "compilers: $(command -v gcc cc clang | tr '\n' ' ')"
  timeout -k 10 90 python3 simulations/bench/gpu_preflight.py
} 2>&1 | tee "$out/gpu.txt"
preflight=${PIPESTATUS[0]}
if [ "$preflight" -ne 0 ]; then
  echo "preflight failed (exit $preflight): see gpu.txt; tests and benchmark not run" | tee -a "$out/gpu.txt"
  exit 1
fi
timeout -k 10 "${TESTS_S:-150}" python3 -m pytest -m "not slow" -v -p no:cacheprovider -o faulthandler_timeout=60 \
  --durations=15 tests/devft/aggregation/test_triton.py tests/devft/aggregation/test_triton_codegen.py \
  tests/devft/growth/test_on_gpu.py 2>&1 | tee "$out/gpu_tests.txt"
tests=${PIPESTATUS[0]}
timeout -k 10 "${BENCH_S:-270}" python3 simulations/bench/bench_aggregation.py --gpu-only --shapes static --sweep \
  --json "$out/bench_gpu.json" 2>&1 | tee "$out/bench_gpu.txt"
bench=${PIPESTATUS[0]}
echo "tests exit $tests, bench exit $bench" | tee -a "$out/gpu.txt"
exit $(( tests != 0 || bench != 0 ))
