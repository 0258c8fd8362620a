#!/usr/bin/env bash
# Kiln on one NVIDIA GPU, in at most ~8 minutes, installing nothing (needs the .venv that
# `make install` builds):
#   1. every GPU kernel (Triton library kernels, generated kernels, models compiled for
#      target cuda) against torch on the device: the tests in tests/gpu/interpret, which on a
#      GPU run on the device (and here, with --dry-run, under Triton's CPU interpreter);
#   2. the example models: Kiln vs eager vs torch.compile (Inductor), one table.
# Usage: bench/gpu_check.sh [--dry-run] [--small]
#   --dry-run  no device: step 1 under the interpreter, step 2 builds every kernel to cubin
#              and stops before the device.
set -u
cd "$(dirname "$0")/.."
PY=.venv/bin/python
if [ ! -x "$PY" ]; then echo "gpu_check: $PWD/.venv is missing; run 'make install' first"; exit 2; fi
DRY=0; SMALL=""
for a in "$@"; do
  case "$a" in
    --dry-run) DRY=1 ;;
    --small) SMALL="--small" ;;
    *) echo "gpu_check: unknown argument $a"; exit 2 ;;
  esac
done
START=$(date +%s)
if [ "$DRY" = 0 ]; then
  if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    "$PY" -c "import torch; print('gpu_check: torch', torch.__version__, '(CUDA build:', torch.version.cuda, ') sees no CUDA device.')"
    echo "gpu_check: this needs an NVIDIA GPU and a CUDA build of torch in .venv; the CPU-only torch wheel cannot"
    echo "gpu_check: use the device. Nothing was measured. (bench/gpu_check.sh --dry-run checks everything up to the device.)"
    exit 3
  fi
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
fi
STATUS=0
echo "== 1/2: GPU kernels against torch $( [ "$DRY" = 1 ] && echo '(Triton interpreter on CPU: dry run)' || echo '(on the device)')"
if [ "$DRY" = 1 ]; then
  TRITON_INTERPRET=1 timeout 240 "$PY" -m pytest -q -p no:logging -p no:cacheprovider -W ignore tests/gpu/interpret || STATUS=1
else
  timeout 200 "$PY" -m pytest -q -p no:logging -p no:cacheprovider -W ignore tests/gpu/interpret tests/gpu/test_target_cuda.py || STATUS=1
fi
LEFT=$(( 470 - ($(date +%s) - START) ))
[ "$LEFT" -lt 60 ] && LEFT=60
echo "== 2/2: models (Kiln vs eager vs Inductor), budget ${LEFT}s"
if [ "$DRY" = 1 ]; then
  timeout $((LEFT + 30)) "$PY" bench/gpu_models.py --dry-run $SMALL --budget "$LEFT" || STATUS=1
else
  timeout $((LEFT + 30)) "$PY" bench/gpu_models.py $SMALL --budget $((LEFT - 20)) || STATUS=1
fi
echo "gpu_check: done in $(( $(date +%s) - START )) s, status $STATUS"
exit $STATUS
