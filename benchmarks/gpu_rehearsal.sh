#!/usr/bin/env bash
# `make gpu-rehearsal`: benchmarks/gpu_device.sh, exactly as the device machine runs it, on this CPU, in an
# emulation of the device image: a CPython 3.12 venv (.cache/gpu-rehearsal/venv) holding the image's torch 2.11.0,
# torchvision 0.26.0 and the other `image` packages of benchmarks/gpu_wheels.txt (from PyPI, once), and nothing of
# this project's: that comes from .whl/ only, --no-index. OUT: .cache/gpu-rehearsal/out (emptied first).
set -euo pipefail
cd "$(dirname "$0")/.."
R=.cache/gpu-rehearsal
PY312=${PY312:-$(ls -d "$HOME"/.pyenv/versions/3.12*/bin/python3 2>/dev/null | tail -1)}
PY312=${PY312:-$(command -v python3.12 || true)}
[ -n "$PY312" ] || { echo "gpu-rehearsal: no Python 3.12 found (pyenv's or python3.12 on PATH; or set PY312=)"; exit 2; }
ls .whl/*.whl >/dev/null 2>&1 || { echo "gpu-rehearsal: .whl/ is empty: run make gpu-wheels first"; exit 2; }
image=$(python3 -m benchmarks.gpu_wheels image)
stamp=$R/venv/.image-$(echo "$image" | sha1sum | cut -c1-12)
if [ ! -e "$stamp" ]; then   # the image's packages, from PyPI: the only download
  rm -rf "$R/venv"
  "$PY312" -m venv "$R/venv"
  "$R/venv/bin/python" -m pip install -q --disable-pip-version-check $image
  touch "$stamp"
fi
rm -rf "$R/out" "$R/site"
mkdir -p "$R/out"
start=$(date +%s)
set +e
PATH=$PWD/$R/venv/bin:$PATH OUT=$PWD/$R/out GPU_SITE=$PWD/$R/site GPU_NO_SHM_REMOUNT=1 PYTHONPATH= \
  TORCH_EXTENSIONS_DIR=$PWD/$R/torch_extensions GPU_CHECK_TIMEOUT_S=${GPU_CHECK_TIMEOUT_S:-2400} \
  bash benchmarks/gpu_device.sh --cpu-dry-run
rc=$?
echo "gpu-rehearsal: exit $rc in $(( $(date +%s) - start )) s; results: $R/out/results.jsonl"
exit $rc
