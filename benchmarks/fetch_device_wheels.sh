#!/usr/bin/env bash
# Download into .whl/ the wheels that the GPU machine (Python 3.12, x86-64 manylinux, no internet; torch, cupy,
# xarray, scipy, pandas and pytest already there) lacks to import holopipe and collect its tests, at the
# versions this checkout's .venv runs, so that benchmarks/device_checks.sh can install them offline.
# Not needed: snakemake (no test module imports it; the workflow tests do not run there). Not fetched:
# cupy-cuda13x, which the CuPy stages need: its wheel (69 MB for 14.2.0) is over the 64 MiB the device tool
# carries in all, and the machine's image already holds it (14.2.0, CUDA 13 as holopipe.core.device.CUDA_MAJOR);
# device_checks.sh's versions step fails where the machine's CuPy is another CUDA's build.
#   bash benchmarks/fetch_device_wheels.sh        # then carry .whl (git-ignored via .git/info/exclude)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV_PYTHON=${VENV_PYTHON:-.venv/bin/python}
DEST=.whl

# holopipe's imports (array-api-compat, netCDF4, zarr, dask, jsonschema), the test modules' (optuna,
# segmentation-models-pytorch), and each one's requirements the machine does not have.
NAMES=(
  array-api-compat
  netCDF4 cftime
  zarr numcodecs donfig google-crc32c
  dask partd locket
  jsonschema jsonschema-specifications referencing rpds-py
  optuna alembic SQLAlchemy greenlet colorlog Mako
  segmentation-models-pytorch
)

grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p "$DEST"
specs=()
for name in "${NAMES[@]}"; do
  version=$("$VENV_PYTHON" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")
  specs+=("$name==$version")
done
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
           manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$tag")
done
"$VENV_PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$DEST" "${specs[@]}"
ls -1 "$DEST"
du -ch "$DEST"/*.whl | tail -n 1
