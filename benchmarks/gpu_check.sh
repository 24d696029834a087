#!/usr/bin/env bash
# Everything only a GPU can show, in one call (e.g. on the device machine): the CUDA extension's build, the runtime
# self-check of every compiled backend, the parity suite on CUDA tensors (every backend against fastadv.reference),
# each op's bandwidth against a device copy (target: 85%), and the seed comparison. Writes the full outputs to
# ${OUT:-/tmp}/gpu_*.txt and prints the short tables last.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu_device.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" \
    | tee -a "$out/gpu_device.txt"
git rev-parse --short HEAD 2>/dev/null | tee -a "$out/gpu_device.txt" || true
python -m pip install --quiet --no-deps --no-build-isolation -e . >/dev/null
python -m fastadv.ext build --cuda 2>&1 | tail -n 2
python -m fastadv.selfcheck >"$out/gpu_selfcheck.txt" 2>&1 || true
ignore=()  # hypothesis is a test dependency the image may lack (transformers' tests skip by themselves)
python -c "import hypothesis" 2>/dev/null || ignore+=(--ignore tests/test_properties.py)
# test_misuse's sweeps are device-independent logic: the CPU runs them; here the time goes to parity on the GPU
timeout 240 python -m pytest -q -p no:cacheprovider -x "${ignore[@]}" --ignore tests/test_misuse.py \
    -k "not cuda_build" tests >"$out/gpu_tests.txt" 2>&1 || true
timeout 120 python -m fastadv.bench --repeats 5 >"$out/gpu_bench.txt" 2>/dev/null || true
python -m fastadv.bench --bandwidth --repeats 20 >"$out/gpu_bandwidth.txt"
echo; cat "$out/gpu_selfcheck.txt"
echo; tail -n 3 "$out/gpu_tests.txt"
echo; grep -E "xlm-r-float32-(rows|dense)" "$out/gpu_bench.txt" || true
echo; cat "$out/gpu_bandwidth.txt"
