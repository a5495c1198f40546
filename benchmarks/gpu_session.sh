#!/usr/bin/env bash
# The GPU checks and benchmarks of a session with the device machine, in as few calls as possible.
#
# Here (a machine with PyPI), once per clone: fetch the peers' wheels into .whl/ (git-ignored):
#   bash benchmarks/gpu_session.sh fetch
# There (the device machine, no network; name .whl in the call's carry), one part per call:
#   bash benchmarks/gpu_session.sh tests     # the kernel tests, compiled on the GPU (no interpret)
#   bash benchmarks/gpu_session.sh ce        # the ce suite: N=8192, V in {32000, 128256, 256000}
#   bash benchmarks/gpu_session.sh linear    # the linear suite, bf16: N=16384, D=4096
# Back here, copy the returned files into benchmarks/results/ and read the goals from them:
#   python -m benchmarks.goals               # writes benchmarks/results/goals_gpu.json
# Parts can be chained in one call (`bash benchmarks/gpu_session.sh tests ce`), but at most 8
# files come back from a call, so run ce and linear (4 files each, plus a log) in separate calls.
# Each part writes into $OUT (the device tool's folder that comes back; benchmarks/results/gpu
# elsewhere) and is bounded by `timeout`, so a call ends inside the tool's 10 minutes with its
# output saved.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}

fetch() {
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >>.git/info/exclude
  local platforms="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64"
  platforms+=" --platform manylinux2014_x86_64 --platform any"
  # Both are pure Python; torch and triton, which they need, are on the device image.
  # shellcheck disable=SC2086
  "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    $platforms -d .whl "liger-kernel==0.8.5" "cut-cross-entropy==25.1.1"
}

setup() {
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  # No network there: build with the setuptools already installed.
  "$PY" -m pip install -q --no-deps --no-build-isolation -e . || exit 1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
  "$PY" - <<'EOF' | tee -a "$OUT/device.txt"
import importlib.metadata as md
import jax
print("jax devices:", jax.devices())
for name in ("jax", "jaxlib", "optax", "torch", "triton", "liger-kernel", "cut-cross-entropy"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "not installed")
EOF
}

tests() {
  # The native schedule compiles for the GPU; the TPU schedule runs in its interpreter.
  timeout 420 "$PY" -m pytest -q -n 4 -x --junitxml="$OUT/tests.xml" \
    tests/test_pallas.py tests/test_linear.py tests/test_cross_entropy.py 2>&1 |
    tee "$OUT/tests.log" | tail -40
}

ce() {
  timeout 540 "$PY" -m benchmarks.run --suite ce --device gpu --out "$OUT" 2>&1 |
    tee "$OUT/ce.log" | tail -20
}

linear() {
  timeout 540 "$PY" -m benchmarks.run --suite linear --device gpu --dtypes bfloat16 \
    --out "$OUT" 2>&1 | tee "$OUT/linear.log" | tail -20
}

goals() {
  "$PY" -m benchmarks.goals --ce "$OUT/ce_gpu.json" --linear "$OUT/linear_gpu.json" \
    --out "$OUT/goals_gpu.json"
}

[ $# -gt 0 ] || set -- tests
if [ "$1" = fetch ]; then
  fetch
  exit
fi
setup
status=0
for part in "$@"; do
  case "$part" in
    tests | ce | linear | goals) "$part" || status=1 ;;
    *) echo "unknown part: $part" >&2 && exit 2 ;;
  esac
done
exit $status
