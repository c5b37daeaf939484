#!/usr/bin/env bash
# The one prepared script a session with the GPU machine runs (issue 12): installs the carried wheels, shows
# the GPU, runs the `gpu` tests and the benchmarks on config/holodec.yaml (the whole regridded frame, all 1000
# planes), and tees everything to $OUT/device_checks.log. Each step has its own time limit and the script
# goes on after a failed or timed-out step; the limits add up to 8.25 minutes, about 4 expected.
#
# Prepare here, once (the GPU machine has no internet and simulating the hologram there costs a minute):
#   bash benchmarks/fetch_device_wheels.sh                                   # .whl/, about 28 MB
#   .venv/bin/python benchmarks/bench_infer.py --frame 256x256 --planes 1 --no-baseline   # caches the hologram
# then call the device tool's run with
#   command "bash benchmarks/device_checks.sh", carry [".whl", "benchmarks/out/cache"], timeout_s 540.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out/device}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}  # the carried wheels (fetch_device_wheels.sh)

# What runs there, and that holopipe and the carried packages import.
VERSIONS="
import sys, torch, cupy, holopipe.infer, holopipe.tune, segmentation_models_pytorch as smp
from holopipe.device import CUDA_MAJOR, describe_device
print('python', sys.version.split()[0], '| torch', torch.__version__, 'CUDA', torch.version.cuda,
      '| cupy', cupy.__version__, 'CUDA runtime', cupy.cuda.runtime.runtimeGetVersion(),
      '| smp', smp.__version__, '| holopipe CUDA_MAJOR', CUDA_MAJOR)
print(describe_device(torch.device('cuda', 0)))"

step() {  # step NAME SECONDS COMMAND...: run it under a time limit, log its exit status and duration
  local name=$1 limit=$2 start=$SECONDS status
  shift 2
  echo "=== $name (limit ${limit} s): $*"
  timeout --signal=INT --kill-after=10 "$limit" "$@"
  status=$?
  [ "$status" -eq 124 ] && status="$status (timed out)"
  echo "=== $name: exit $status after $((SECONDS - start)) s"
  summary+=("$name: exit $status, $((SECONDS - start)) s")
}

checks() {
  if [ -d "$WHEELS" ]; then
    timeout 30 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site "$WHEELS"/*.whl || { echo "installing the carried wheels failed"; return 1; }
    export PYTHONPATH=/tmp/site
  fi
  # holopipe from this tree, without installing it (the machine cannot fetch its build requirements), and its
  # command for any test that calls it.
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
  mkdir -p /tmp/holopipe-bin
  printf '#!/bin/sh\nexec %s -m holopipe.cli "$@"\n' "$(command -v "$PYTHON")" > /tmp/holopipe-bin/holopipe
  chmod +x /tmp/holopipe-bin/holopipe
  export PATH="/tmp/holopipe-bin:$PATH"

  summary=()
  step nvidia-smi 10 nvidia-smi
  step versions 40 "$PYTHON" -c "$VERSIONS"
  step gpu-tests 110 "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider --continue-on-collection-errors \
    --timeout 120 tests
  step bench_infer 230 "$PYTHON" benchmarks/bench_infer.py --config config/holodec.yaml
  step bench_propagate 75 "$PYTHON" benchmarks/bench_propagate.py --config config/holodec.yaml

  echo "=== summary"
  printf '%s\n' "${summary[@]}"
}

checks 2>&1 | tee "$OUT/device_checks.log"
