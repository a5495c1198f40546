#!/usr/bin/env bash
# The GPU checks and benchmarks of a session with the device machine, in ONE call.
#
# A session's device time is 15 minutes in all, the machine's start (a minute or more) included,
# one command runs at most 10 minutes, and no machine starts with under 4 minutes left: there is
# time for one call, so it does everything, each step bounded, the most wanted results first.
#
#   here, once per clone:     bash benchmarks/gpu_session.sh fetch
#                             (Liger, cut cross-entropy and setuptools wheels into .whl/)
#   there, in one run call:   bash benchmarks/gpu_session.sh       (carry [".whl"], timeout_s 600)
#   a second call, after a change to the kernels, if the session has 4 minutes left:
#                             SESSION_S=200 bash benchmarks/gpu_session.sh tests
#   back here:                bash benchmarks/gpu_session.sh unpack FILES_AT
#                             (FILES_AT: the folder the call's files came back to; the results
#                             go to benchmarks/results/, and README.md's tables are regenerated)
#
# The call, within SESSION_S seconds (default 540):
#   1. setup: the carried wheels and the project (no network there); nvidia-smi and the package
#      versions -> device.txt.
#   2. tests: the GPU schedules' tests (test_pallas, test_linear, test_aux, test_numerics),
#      compiled for the GPU, not interpreted; at most TESTS_S seconds (default 150), and only as
#      much as leaves the bench 240 s (so none with SESSION_S <= 240) -> tests.txt.
#   3. bench: the ce and linear suites, the goal cases first (V=128256, bfloat16 before float32),
#      then the rest of the grids: it starts no measurement later than 75 s before the session's
#      end, and is killed 30 s before it. The harness rewrites its JSON after every measurement,
#      so a cut run keeps what it measured -> results/.
#   4. goals: python -m benchmarks.goals on that JSON -> results/goals_gpu.{json,md}.
# All of it lands in $OUT/gpu_session.tar.gz (the tool returns at most 8 files), with device.txt,
# tests.txt, goals_gpu.md and session.log beside it to read at once.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
PY=${PYTHON:-python3}
SESSION_S=${SESSION_S:-540}
TESTS_S=${TESTS_S:-150}
# For a dry run of the plumbing on a CPU: DEVICE=cpu BENCH_ARGS="--n 16 ..." OUT=/tmp/out, and
# unpack it into a scratch folder (unpack's second argument).
DEVICE=${DEVICE:-gpu}
BENCH_ARGS=${BENCH_ARGS:-}
WHEELS=("liger-kernel==0.8.5" "cut-cross-entropy==25.1.1" "setuptools==80.9.0")

fetch() {
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >>.git/info/exclude
  local platforms="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64"
  platforms+=" --platform manylinux2014_x86_64 --platform any"
  # All pure Python; torch and triton, which the peers need, are on the device image. setuptools
  # builds the project there (pyproject's SPDX license needs setuptools >= 77).
  # shellcheck disable=SC2086
  "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    $platforms -d .whl "${WHEELS[@]}"
}

unpack() {
  local tmp results=${2:-} readme=${3:-README.md}
  tmp=$(mktemp -d)
  tar -xzf "$1/gpu_session.tar.gz" -C "$tmp" || return 1
  if [ -z "$results" ]; then
    # The committed results take a GPU run's files only: a CPU dry run's would replace the
    # committed CPU results and README tables.
    if ! compgen -G "$tmp/gpu/results/*_gpu*.json" >/dev/null; then
      echo "no *_gpu*.json in $1/gpu_session.tar.gz (a CPU dry run?): nothing copied;" \
        "name a results folder and README to unpack it there" >&2
      return 1
    fi
    results=benchmarks/results
  fi
  cp "$tmp"/gpu/results/* "$results/"
  for f in device.txt tests.txt session.log; do
    [ ! -f "$tmp/gpu/$f" ] || cp "$tmp/gpu/$f" "$results/gpu_$f"
  done
  "$PY" -m benchmarks.report --results "$results" --readme "$readme"
}

left() { echo $((SESSION_S - SECONDS)); }

setup() {
  # The peers' wheels go on PYTHONPATH for the whole call; setuptools only for the project's
  # build (no network there, so --no-build-isolation), not to shadow the image's own.
  local peers=() build=()
  for whl in .whl/*.whl; do
    [ -f "$whl" ] || continue
    case $(basename "$whl") in
      setuptools-*) build+=("$whl") ;;
      *) peers+=("$whl") ;;
    esac
  done
  if [ ${#peers[@]} -gt 0 ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site "${peers[@]}" && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  if ! "$PY" -c "import jax_softmax_ce.kernels" 2>/dev/null; then
    if [ ${#build[@]} -gt 0 ]; then
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/build "${build[@]}" || return 1
    fi
    PYTHONPATH=/tmp/build${PYTHONPATH:+:$PYTHONPATH} \
      "$PY" -m pip install -q --no-deps --no-build-isolation -e . || return 1
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  "$PY" - <<'EOF'
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
  # The GPU schedules compiled for the GPU; the TPU ones would only run in their interpreter.
  # SIGINT at the limit makes pytest stop and still print its summary of failures.
  timeout -s INT -k 20 "$1" "$PY" -m pytest -q -n 4 -p no:cacheprovider -k "gpu or filter" \
    --tb=short -rfE tests/test_pallas.py tests/test_linear.py tests/test_aux.py \
    tests/test_numerics.py
}

tests_only() {
  # A second call of a session, after a change to the kernels: setup and the GPU tests alone,
  # within SESSION_S seconds -> $OUT/device.txt, $OUT/tests.txt.
  : "${OUT:?run this on the device machine, where the tool sets OUT}"
  setup >"$OUT/device.txt" 2>&1 || { tail -5 "$OUT/device.txt"; return 1; }
  tests $(($(left) - 10)) >"$OUT/tests.txt" 2>&1
  echo "tests rc=$? (124: cut by the time limit)"
  tail -25 "$OUT/tests.txt"
}

bench() {
  # shellcheck disable=SC2086
  timeout "$1" "$PY" -m benchmarks.run --suite all --device "$DEVICE" --first-v 128256 \
    --repeats 5 --budget-s "$2" --out "$WORK/results" $BENCH_ARGS
}

goals() {
  # Whichever files the harness wrote (ce_<device>.json, or ce_<device>_quick.json with --quick).
  local ce=("$WORK/results/ce_$DEVICE"*.json) linear=("$WORK/results/linear_$DEVICE"*.json)
  "$PY" -m benchmarks.goals --ce "${ce[0]}" --linear "${linear[0]}" \
    --out "$WORK/results/goals_$DEVICE.json" | tee "$WORK/results/goals_$DEVICE.md"
}

session() {
  : "${OUT:?run this on the device machine, where the tool sets OUT}"
  WORK=$(mktemp -d)/gpu
  mkdir -p "$WORK/results"
  {
    echo "== setup ($(left) s left)"
    setup >"$WORK/device.txt" 2>&1
    local setup_rc=$?
    cat "$WORK/device.txt"
    if [ "$setup_rc" -ne 0 ]; then
      echo "setup failed (rc $setup_rc): nothing else can run"
    else
      local t=$((TESTS_S < $(left) - 240 ? TESTS_S : $(left) - 240))
      if [ "$t" -gt 0 ]; then
        echo "== tests (at most $t s; $(left) s left)"
        tests "$t" >"$WORK/tests.txt" 2>&1
        echo "tests rc=$? (124: cut at $t s)"
        tail -25 "$WORK/tests.txt"
      fi
      echo "== bench ($(left) s left)"
      bench $(($(left) - 30)) $(($(left) - 75))
      echo "bench rc=$? (124: cut by its timeout)"
      echo "== goals ($(left) s left)"
      goals
    fi
  } 2>&1 | tee "$WORK/session.log"
  tar -czf "$OUT/gpu_session.tar.gz" -C "$(dirname "$WORK")" gpu
  for f in device.txt tests.txt session.log "results/goals_$DEVICE.md"; do
    [ ! -f "$WORK/$f" ] || cp "$WORK/$f" "$OUT/"
  done
}

case "${1:-session}" in
  fetch) fetch ;;
  unpack) unpack "${2:?unpack needs the folder where the files of the call came back}" "${@:3}" ;;
  session) session ;;
  tests) tests_only ;;
  *) echo "usage: $0 [fetch | session | tests | unpack FILES_AT]" >&2 && exit 2 ;;
esac
