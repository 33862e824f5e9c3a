#!/usr/bin/env bash
# One GPU session: build from source, run the CUDA tests (plain and under compute-sanitizer),
# then the benchmarks, each stage under its own time limit. Logs and results go to $OUT
# (default ./gpu-out). Settings (environment):
#   SANITIZE_K   pytest -k expression run under memcheck   (default: cuda)
#   RACECHECK_K  pytest -k expression run under racecheck  (default: SANITIZE_K)
#   BENCH        benchmark groups "secs:name name;secs:name" (default: none)
#   TEST_FILES   test files to run (default: tests/test_*.py); TESTS_K: their -k (default: cuda)
#   T_TESTS T_MEMCHECK T_RACECHECK  seconds per stage
#   AFTER_BUILD  a command to run right after the build (a probe, a tuning sweep)
# Logs and results are written to a work folder and packed into $OUT/session.tgz after every
# stage, so a run cut short still returns what it measured (as one file).
set -uo pipefail
FINAL_OUT=${OUT:-$PWD/gpu-out}
OUT=$(mktemp -d)
mkdir -p "$OUT/results" "$FINAL_OUT"
pack() { tar czf "$FINAL_OUT/session.tgz.part" -C "$OUT" . && mv "$FINAL_OUT/session.tgz.part" "$FINAL_OUT/session.tgz"; }
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then  # wheels the GPU machine lacks (liger-kernel, ...)
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.used --format=csv | tee "$OUT/gpu.txt"
start=$SECONDS
SPECX_CUDA=ON python3 -m pip install -q --no-build-isolation --no-deps . > "$OUT/build.log" 2>&1 \
  || { tail -40 "$OUT/build.log"; exit 1; }
python3 -c "import specx; assert specx.cuda_built, 'CUDA kernels missing'; print('specx built with CUDA')"
echo "build: $((SECONDS - start)) s"
pack
if [ -n "${AFTER_BUILD:-}" ]; then (eval "$AFTER_BUILD") 2>&1 | tee "$OUT/after_build.log" | grep -v "^\[" | tail -40; fi

# Each test file in its own process: one crash cannot hide the other files' results.
deadline=$((SECONDS + ${T_TESTS:-150}))
for f in ${TEST_FILES:-tests/test_*.py}; do
  left=$((deadline - SECONDS)); [ $left -gt 5 ] || { echo "$f: no time left"; continue; }
  timeout $left python3 -m pytest -q -p no:cacheprovider "$f" -k "${TESTS_K:-cuda}" > "$OUT/pytest_$(basename $f .py).log" 2>&1
  echo "$f: exit $? $(tail -1 "$OUT/pytest_$(basename $f .py).log")"
done
pack
sanitize() {  # tool, -k expression, seconds
  timeout "$3" compute-sanitizer --tool "$1" --print-limit 20 python3 -m pytest -q -p no:cacheprovider tests -k "$2" \
    > "$OUT/sanitizer_$1.log" 2>&1
  echo "compute-sanitizer $1 exit $?: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/sanitizer_$1.log" | tail -1)" \
       "$(grep -E 'passed|failed' "$OUT/sanitizer_$1.log" | tail -1)"
}
sanitize memcheck "${SANITIZE_K:-cuda}" "${T_MEMCHECK:-90}"
sanitize racecheck "${RACECHECK_K:-${SANITIZE_K:-cuda}}" "${T_RACECHECK:-60}"
pack
echo "tests and sanitizers: $((SECONDS - start)) s"
# BENCH: groups separated by ';', each "seconds:name name ..." run in one process.
IFS=';' read -ra groups <<< "${BENCH:-}"
for group in "${groups[@]}"; do
  secs=${group%%:*}; names=${group#*:}; tag=$(echo $names | tr ' ' '_')
  SPECX_GIT_COMMIT=$(cat .git-commit 2>/dev/null || echo unknown) timeout "$secs" \
    specx-bench $names --out "$OUT/results" > "$OUT/bench_$tag.log" 2>&1
  echo "== bench $names: exit $? at $((SECONDS - start)) s"
  pack
done
echo "total: $((SECONDS - start)) s"
pack
