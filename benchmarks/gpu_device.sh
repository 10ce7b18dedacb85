#!/usr/bin/env bash
# The one command for the device machine (README.md "GPU" gives the call): prints the GPU, driver and /dev/shm,
# installs .whl/ (what the image lacks: `make gpu-wheels`), checks each import, then runs benchmarks/gpu_check.py
# under `timeout`. Every step appends one JSON line to $OUT/results.jsonl as it ends, the check one per part; a
# failing part's log tail is in $OUT/failed.log, the section $OUT/section.md, this script's whole output $OUT/device.log:
# at most 8 files, all directly in $OUT (the device tool brings back 8).
#   bash benchmarks/gpu_device.sh [gpu_check args, e.g. --cpu-dry-run]
# Env: OUT (results folder; default logs/gpu-check), GPU_SITE (wheel target; default /tmp/site),
#      GPU_CHECK_TIMEOUT_S (default 500: the parts' budgets sum to 480), GPU_NO_SHM_REMOUNT=1 (leave /dev/shm).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/logs/gpu-check}
SITE=${GPU_SITE:-/tmp/site}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/device.log") 2>&1
export PYTHONUNBUFFERED=1 NO_ALBUMENTATIONS_UPDATE=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/torch_extensions}
jline() { python3 -c 'import json,sys; print(json.dumps(dict(part=sys.argv[1], ok=sys.argv[2]=="0", info=sys.argv[3])))' "$@" >> "$OUT/results.jsonl"; }
rm -f "$OUT/results.jsonl"

gpu=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)
gpu=${gpu:-none (nvidia-smi: no GPU or no nvidia-smi)}
shm=$(df -h /dev/shm 2>/dev/null | awk 'NR==2 {print $2}')
if [ -z "${GPU_NO_SHM_REMOUNT:-}" ] && [ "$(df -k /dev/shm 2>/dev/null | awk 'NR==2 {print $2}')" -lt 16000000 ] 2>/dev/null; then
  mount -o remount,size=32G /dev/shm 2>/dev/null && shm="$shm -> $(df -h /dev/shm | awk 'NR==2 {print $2}')"
fi
echo "gpu-device: GPU: $gpu; /dev/shm: $shm; $(python3 --version 2>&1); $(nproc) CPUs"
jline machine 0 "GPU: $gpu; /dev/shm: $shm; $(python3 --version 2>&1); $(nproc) CPUs"

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
rc=$?; jline wheels $rc "$(ls .whl | tr '\n' ' ')"
[ $rc -eq 0 ] || { echo "gpu-device: installing .whl/ failed ($rc)"; exit $rc; }
export PYTHONPATH=$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}

python3 - "$OUT/results.jsonl" <<'PY' || { echo "gpu-device: an import failed: the check would too"; exit 1; }
import importlib, json, sys
mods = ("torch torchvision triton deepspeed open_clip open_clip_train.main webdataset wids braceexpand omegaconf "
        "ftfy pydantic hjson submitit numpy PIL pyarrow fsspec tqdm sklearn train.core.trainer").split()
bad = 0
with open(sys.argv[1], "a") as out:
    for name in mods:
        try:
            m = importlib.import_module(name)
            info, ok = f"{getattr(m, '__version__', '')} {getattr(m, '__file__', '')}".strip(), True
        except Exception as err:  # one line per module, whatever breaks
            info, ok, bad = f"{type(err).__name__}: {err}", False, 1
        print(f"gpu-device: import {name}: {'ok' if ok else 'FAILED'} {info}", flush=True)
        out.write(json.dumps(dict(part=f"import {name}", ok=ok, info=info)) + "\n")
        out.flush()
sys.exit(bad)
PY

python3 -c "import torch; print('gpu-device: torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
timeout -k 10 "${GPU_CHECK_TIMEOUT_S:-500}" python3 -m benchmarks.gpu_check --out "$OUT" --append "$@"
rc=$?
jline check $rc "gpu_check exit $rc$([ $rc -eq 124 ] && echo ' (timeout)'); "
echo "gpu-device: gpu_check exited with $rc"
exec >&- 2>&-   # close the pipe to tee, and give it a moment to write device.log's last lines before the call ends
sleep 1
exit $rc
