#!/bin/sh
# `make gpu-check` on the GPU machine (no package registry there): install the wheels that
# `make gpu-wheels` prepared here into a private folder, then run benchmarks/gpu_check.py with them.
#   sh benchmarks/gpu_check.sh [--out FILE] [--work DIR]      (the device tool: carry .gpu-wheels)
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SITE=${MTDIST_GPU_SITE:-/tmp/mtdist-site}
WHEELS=${MTDIST_GPU_WHEELS:-.gpu-wheels}
if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "gpu-check: no wheels in $WHEELS/: run 'make gpu-wheels' where PyPI is reachable, and bring $WHEELS/ along" >&2
    exit 2
fi
start=$(date +%s)
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
echo "[gpu-check] installed $(ls "$WHEELS"/*.whl | wc -l) wheels into $SITE in $(( $(date +%s) - start )) s" >&2
PYTHONPATH="$SITE:$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONPATH PYTHONUNBUFFERED=1
exec "$PY" -m benchmarks.gpu_check "$@"
