#!/usr/bin/env bash
# One GPU session's check, ready to run on an offline GPU machine (see bench/gpu_wheels.sh first):
#     bash bench/gpu_session.sh OUTDIR
# installs the carried wheels (.whl/) into /tmp/site, then runs `python -m bench.gpu_check`
# (every stage with its own time limit, 480 s in all) and leaves in OUTDIR: gpu_check.log (the
# console, summary table last), summary.json and gpu_check.tar.gz (every log and JSON): few
# files, easy to copy back from a machine you reach only through a job queue or a shell.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bench/gpu_session.sh OUTDIR}
mkdir -p "$OUT"
WORK=/tmp/gpu_check
rm -rf "$WORK"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee "$OUT/nvidia-smi.txt"
python3 -c "import cupy, numpy; print('cupy', cupy.__version__, 'numpy', numpy.__version__)" 2>&1 | tee "$OUT/versions.txt"
python3 -m bench.gpu_check --out "$WORK" 2>&1 | tee "$OUT/gpu_check.log"
cp "$WORK/summary.json" "$OUT/" 2>/dev/null || true
tar czf "$OUT/gpu_check.tar.gz" -C /tmp gpu_check
