#!/usr/bin/env bash
# The one prepared script a session with the GPU machine runs (issue 12, issue 21): installs the carried wheels,
# shows the GPU, runs the `gpu` tests (CuPy against numpy for the data preparation, the model's safe plane
# sub-batch, the fused sweep) and the benchmarks on config/holodec.yaml (the whole regridded frame, all 1000
# planes), and tees everything to $OUT/device_checks.log. Each step has its own time limit and the script goes
# on after a failed or timed-out step.
#
# Time budget (limits; expected from the issue's estimates, nothing measured on a GPU yet):
#   installing the wheels   30 s   (~10)
#   nvidia-smi              10 s   (~1)
#   versions                30 s   (~15: torch, CuPy, smp imports)
#   gpu-tests              110 s   (~60: CuPy compiles each kernel on its first call)
#   bench_dataprep          90 s   (~50: one full-size hologram simulated, regridded, standardized and
#                                   augmented on numpy, ~35 s, then on CuPy after a warm-up)
#   bench_infer            170 s   (~90: 1000 planes, refinement, baseline)
#   batch-limit             45 s   (~30: 18 full-size planes per batch, run in sub-batches under 2^31 elements)
#   bench_propagate         55 s   (~30: the fused sweep against a bare ifft2, CPU and GPU)
#   total                  540 s = 9 minutes at most (each step may take 10 s more to die), about 5 expected
#
# Prepare here, once (the GPU machine has no internet and simulating the hologram there costs a minute):
#   bash benchmarks/fetch_device_wheels.sh                                   # .whl/, about 28 MB
#   .venv/bin/python benchmarks/bench_infer.py --frame 256x256 --planes 1 --no-baseline   # caches the hologram
# then call the device tool's run with
#   command "bash benchmarks/device_checks.sh", carry [".whl", "benchmarks/out/cache"], timeout_s 600.
# CuPy is not carried (cupy-cuda13x's wheel, 69 MB, is over the tool's 64 MiB): the machine's image holds
# cupy-cuda13x (14.2.0 when last read), and the versions step fails where its CuPy is another CUDA's build.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out/device}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}  # the carried wheels (fetch_device_wheels.sh)

# What runs there, and that holopipe and the carried packages import.
VERSIONS="
import sys, importlib.metadata, torch, cupy, holopipe.detect.infer, holopipe.ml.tune, segmentation_models_pytorch as smp
from holopipe.core.device import CUDA_MAJOR, describe_device
print('python', sys.version.split()[0], '| torch', torch.__version__, 'CUDA', torch.version.cuda,
      '| cupy', cupy.__version__, 'CUDA runtime', cupy.cuda.runtime.runtimeGetVersion(),
      '| smp', smp.__version__, '| holopipe CUDA_MAJOR', CUDA_MAJOR)
try:
    print(f'cupy-cuda{CUDA_MAJOR}x', importlib.metadata.version(f'cupy-cuda{CUDA_MAJOR}x'))
except importlib.metadata.PackageNotFoundError:
    sys.exit(f'this CuPy is not the cupy-cuda{CUDA_MAJOR}x build that holopipe.core.device.CUDA_MAJOR names')
print(describe_device(torch.device('cuda', 0)))"

# config/holodec.yaml with 18 planes per model batch, far past the 2^31 elements some CUDA kernels can index
# (its LinkNet's largest activation crosses them at 4 full-size planes): infer must split them into safe
# sub-batches, and the step shows that it runs and what it costs.
BATCH_CONFIG=/tmp/holodec-batch-planes-18.yaml
WRITE_BATCH_CONFIG="
import sys, yaml
config = yaml.safe_load(open('config/holodec.yaml'))
config['infer']['batch_planes'] = 18
yaml.safe_dump(config, open(sys.argv[1], 'w'), sort_keys=False)"

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
  printf '#!/bin/sh\nexec %s -m holopipe.run.cli "$@"\n' "$(command -v "$PYTHON")" > /tmp/holopipe-bin/holopipe
  chmod +x /tmp/holopipe-bin/holopipe
  export PATH="/tmp/holopipe-bin:$PATH"

  summary=()
  step nvidia-smi 10 nvidia-smi
  step versions 30 "$PYTHON" -c "$VERSIONS"
  step gpu-tests 110 "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider --continue-on-collection-errors \
    --timeout 120 tests
  step bench_dataprep 90 "$PYTHON" benchmarks/bench_dataprep.py --config config/holodec.yaml --repeats 1
  step bench_infer 170 "$PYTHON" benchmarks/bench_infer.py --config config/holodec.yaml
  "$PYTHON" -c "$WRITE_BATCH_CONFIG" "$BATCH_CONFIG" || echo "writing $BATCH_CONFIG failed"
  step batch-limit 45 "$PYTHON" benchmarks/bench_infer.py --config "$BATCH_CONFIG" --planes 36 --no-baseline
  step bench_propagate 55 "$PYTHON" benchmarks/bench_propagate.py --config config/holodec.yaml

  echo "=== summary"
  printf '%s\n' "${summary[@]}"
}

checks 2>&1 | tee "$OUT/device_checks.log"
