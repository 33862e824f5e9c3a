#!/usr/bin/env bash
# One GPU session: build from source, run the CUDA tests (plain and under compute-sanitizer),
# then the benchmarks. Logs and results go to $OUT (or ./gpu-out). Usage:
#   bash benchmarks/gpu_session.sh [pytest -k expression for the sanitizer] [bench names...]
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then  # wheels the GPU machine lacks (liger-kernel, ...)
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.used --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda)" | tee -a "$OUT/gpu.txt"

start=$SECONDS
SPECX_CUDA=ON python3 -m pip install -q --no-build-isolation --no-deps . > "$OUT/build.log" 2>&1 \
  || { tail -40 "$OUT/build.log"; exit 1; }
python3 -c "import specx; assert specx.cuda_built, 'CUDA kernels missing'; print('specx built with CUDA')"
echo "build: $((SECONDS - start)) s"

sanitize_k=${1:-cuda}
shift || true
tests=${SPECX_TESTS:-tests}
python3 -m pytest -q -p no:cacheprovider $tests 2>&1 | tee "$OUT/pytest.log" | grep -E "passed|failed|Error|FAILED|Fatal" | tail -25
echo "pytest exit ${PIPESTATUS[0]}; tests: $((SECONDS - start)) s"
for tool in memcheck racecheck; do
  compute-sanitizer --tool $tool --print-limit 20 --error-exitcode 99 \
    python3 -m pytest -q -p no:cacheprovider $tests -k "$sanitize_k" > "$OUT/sanitizer_$tool.log" 2>&1
  echo "compute-sanitizer $tool exit $? ($(grep -cE 'ERROR SUMMARY: 0 errors|RACECHECK SUMMARY: 0 hazards' "$OUT/sanitizer_$tool.log") clean summaries)"
  grep -E "SUMMARY|passed|failed" "$OUT/sanitizer_$tool.log" | tail -3
done
echo "sanitizers: $((SECONDS - start)) s"
if [ $# -gt 0 ]; then
  SPECX_GIT_COMMIT=$(cat .git-commit 2>/dev/null || echo unknown) specx-bench "$@" --out "$OUT/results" 2>&1 \
    | tee "$OUT/bench.log" | grep -v "it/s\]" | tail -60
fi
echo "total: $((SECONDS - start)) s"
