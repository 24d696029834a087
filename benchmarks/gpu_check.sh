#!/usr/bin/env bash
# Everything only a GPU can show, in one call (e.g. on the device machine): the CUDA extension's build, the parity
# suite on CUDA tensors (every backend against fastadv.reference), each op's bandwidth against a device copy, and the
# seed comparison. Writes the full outputs to ${OUT:-/tmp}/gpu_*.txt and prints the short tables last.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu_device.txt"
python -m pip install --quiet --no-deps --no-build-isolation -e . >/dev/null
python -m fastadv.ext build --cuda 2>&1 | tail -n 2
ignore=()  # hypothesis is a test dependency the image may lack (transformers' tests skip by themselves)
python -c "import hypothesis" 2>/dev/null || ignore+=(--ignore tests/test_properties.py)
python -m pytest -q -p no:cacheprovider "${ignore[@]}" tests >"$out/gpu_tests.txt" 2>&1 || true
python -m fastadv.bench --repeats 5 >"$out/gpu_bench.txt" 2>/dev/null
python -m fastadv.bench --bandwidth --repeats 20 >"$out/gpu_bandwidth.txt"
echo; tail -n 3 "$out/gpu_tests.txt"
echo; grep -E "xlm-r-float32-(rows|dense)" "$out/gpu_bench.txt"
echo; cat "$out/gpu_bandwidth.txt"
