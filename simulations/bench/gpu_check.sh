#!/usr/bin/env bash
# The GPU check of the Triton aggregation kernel, in one run, for a CUDA machine that has torch, Triton,
# numpy and pytest but neither Flower nor the model: the compiled-kernel tests (every test of test_triton.py
# runs on CUDA tensors there, the gpu-marked ones included, plus the sm_90 code checks, and growth on a CUDA
# model: tests/devft/growth/test_on_gpu.py), then the
# benchmark's device section with the launch-configuration sweep (docs/benchmarks.md, "Triton kernel on the
# GPU"). Writes gpu.txt, gpu_tests.txt, bench_gpu.txt and bench_gpu.json (rewritten after every case, so a
# run cut short keeps what it measured) to $OUT (default: the current folder).
# Time limits: TESTS_S (default 180) and BENCH_S (default 360) seconds. Exits non-zero when the tests or the
# benchmark fail or time out; the benchmark runs either way.
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-.}
export PYTHONPATH=.
{ nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv
  python3 -c "import numpy, torch, triton; print('numpy', numpy.__version__, 'torch', torch.__version__,
'triton', triton.__version__, 'cuda', torch.version.cuda)"; } 2>&1 | tee "$out/gpu.txt"
timeout "${TESTS_S:-180}" python3 -m pytest -m "not slow" -q -p no:cacheprovider \
  tests/devft/aggregation/test_triton.py tests/devft/aggregation/test_triton_codegen.py \
  tests/devft/growth/test_on_gpu.py 2>&1 | tee "$out/gpu_tests.txt"
tests=${PIPESTATUS[0]}
timeout "${BENCH_S:-360}" python3 simulations/bench/bench_aggregation.py --gpu-only --shapes static --sweep \
  --json "$out/bench_gpu.json" 2>&1 | tee "$out/bench_gpu.txt"
bench=${PIPESTATUS[0]}
echo "tests exit $tests, bench exit $bench" | tee -a "$out/gpu.txt"
exit $(( tests != 0 || bench != 0 ))
