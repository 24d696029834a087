#!/usr/bin/env bash
# Everything only a GPU can show, in one call of about 6 minutes on a lent GPU, cold compiles included.
#
# Every step runs under its own time limit and is independent of the others: a failure or a timeout is reported and
# the next step runs (no `set -e`, no `pytest -x`). The limit is sent as SIGINT first, so that pytest prints its summary
# and a Python program its traceback; what is left of the whole budget caps each limit, and a step with no time left
# is reported as skipped. The decisive checks come first: the runtime self-check of each compiled backend, the op
# table on CUDA tensors (every backend against the oracle) and each op's bandwidth against a device copy; then CUDA
# graphs and streams, the seed comparison (BERT-base shapes) and the parity suite on the GPU, as far as the time goes.
# The CUDA extension builds in the background while Triton's kernels compile for the first check.
#
# Output: each step's, as it finishes, on stdout and appended to $OUT/gpu_check.log (a running step writes
# $OUT/gpu_<step>.txt until then); the summary last, also in $OUT/gpu_summary.txt. At most 4 files at a time in $OUT.
# Environment: OUT (default /tmp/fastadv-gpu-check); FASTADV_GPU_CHECK_SECONDS, the whole budget (default 360);
# FASTADV_GPU_CHECK_TIME_SCALE, a percentage applied to every step's limit (default 100). To try the control flow on a
# CPU in about three minutes: a fake nvidia-smi first on PATH, FASTADV_GPU_CHECK_TIME_SCALE=20 and
# FASTADV_BENCH_SCALE=0.01; the GPU steps then fail or time out, each reported, and the others still run.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
out="${OUT:-/tmp/fastadv-gpu-check}"
mkdir -p "$out"
log="$out/gpu_check.log"
: >"$log"
budget=${FASTADV_GPU_CHECK_SECONDS:-360}
scale=${FASTADV_GPU_CHECK_TIME_SCALE:-100}
export PYTHONUNBUFFERED=1
declare -A pids begun
summary=()
trap 'kill "${pids[@]}" 2>/dev/null' EXIT

say() { echo "$*" | tee -a "$log"; }

# The limit of a step that asks for $1 seconds: scaled, and no more than what is left of the budget.
limit() {
  local want=$(($1 * scale / 100)) left=$((budget - SECONDS))
  echo $((want < left ? want : left))
}

# start NAME SECONDS COMMAND...: runs COMMAND in the background under its limit, its output to $out/gpu_NAME.txt.
start() {
  local name=$1 seconds
  seconds=$(limit "$2")
  shift 2
  if ((seconds < 5)); then
    summary+=("$(printf '%-16s %-20s' "$name" "skipped: no time")")
    return
  fi
  say "[${SECONDS}s] $name: started, limit ${seconds}s: $*"
  begun[$name]=$SECONDS
  timeout --signal=INT --kill-after=15 "$seconds" "$@" >"$out/gpu_$name.txt" 2>&1 &
  pids[$name]=$!
}

# finish NAME [LINES]: waits for the step, shows the last LINES of its output (all of it goes to the log), and records
# how it ended, with pytest's summary line if it printed one.
finish() {
  local name=$1 lines=${2:-40} status verdict took tally file="$out/gpu_$1.txt"
  [[ -n ${pids[$name]:-} ]] || return 0
  wait "${pids[$name]}"
  status=$?
  unset "pids[$name]"
  took=$((SECONDS - begun[$name]))
  case $status in
    0) verdict=ok ;;
    124 | 137) verdict="TIMED OUT" ;;
    *) verdict="FAILED (exit $status)" ;;
  esac
  say "== $name: $verdict after ${took}s"
  tail -n "$lines" "$file"
  cat "$file" >>"$log"
  tally=$(grep -E '[0-9]+ (passed|failed|errors?|deselected)|no tests ran' "$file" | tail -n 1 | tr -d '=')
  rm -f "$file"
  summary+=("$(printf '%-16s %-20s %4ss %s' "$name" "$verdict" "$took" "$tally")")
}

step() { start "$@" && finish "$1"; }

# pytest: every failure listed (no -x; the project's addopts already has -q), in 4 processes where pytest-xdist is
# there (Triton's cold compiles then run in parallel).
pytest=(python3 -m pytest -p no:cacheprovider)
python3 -c "import xdist" 2>/dev/null && pytest+=(-n 4)
ignore=()  # hypothesis is a test dependency the image may lack
python3 -c "import hypothesis" 2>/dev/null || ignore=(--ignore tests/test_properties.py)

step device 30 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader &&
  python3 -c "import torch, triton; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\",
triton.__version__, \"gpu\", torch.cuda.get_device_name())" && (git rev-parse --short HEAD 2>/dev/null || true)'
step install 90 python3 -m pip install --quiet --no-deps --no-build-isolation -e .

# The extension builds while the Triton kernels compile for their self-check (which loads no extension: anything that
# does, the op table's collection for one, would wait for the build's lock).
start cuda_build 240 env MAX_JOBS=12 python3 -m fastadv.ext build --cuda
start selfcheck_triton 180 python3 -m fastadv.selfcheck triton
finish selfcheck_triton
finish cuda_build 5

step selfcheck_ext 60 python3 -m fastadv.selfcheck ext
step ops 180 "${pytest[@]}" tests/test_ops.py -k "triton-cuda or ext-cuda or torch-cuda"
step bandwidth 90 python3 -m fastadv.bench --bandwidth --repeats 20
# CUDA graphs and streams; what of the triton, ext and selfcheck tests runs on the GPU (not the sm_90 builds that
# need none)
gpu_tests="test_cuda_graphs or (test_triton and not sm90 and not rounded and not 16_byte and not box_bounds)"
gpu_tests+=" or (test_ext and (cuda_matches_cpu or (split and cuda))) or backends_pass or compiled_backend"
step graphs 90 "${pytest[@]}" tests/test_cuda_graphs.py tests/test_triton.py tests/test_ext.py tests/test_selfcheck.py \
  -k "$gpu_tests"
step bench_quick 90 python3 -m fastadv.bench --quick --repeats 5
step parity 240 "${pytest[@]}" "${ignore[@]}" tests/test_parity.py tests/test_input_attacks.py \
  tests/test_mixed_precision.py tests/test_awp.py tests/test_row_hints.py tests/test_rows_auto.py

{
  echo
  echo "fastadv GPU check: ${SECONDS}s of a ${budget}s budget, outputs in $out"
  printf '%s\n' "${summary[@]}"
} | tee "$out/gpu_summary.txt" | tee -a "$log"
