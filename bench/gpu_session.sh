#!/usr/bin/env bash
# One GPU session's check, ready to run on an offline GPU machine (see bench/gpu_wheels.sh first):
#     bash bench/gpu_session.sh OUTDIR
# Everything within 9 minutes on one GPU with cold compile caches:
#   1. installs the carried wheels (.whl/*.whl, pytest-xdist among them) into /tmp/site;
#      ($GPU_SESSION_SITE and $GPU_SESSION_WORK, default /tmp/gpu_check, move the two folders)
#   2. says where NVRTC and each CUDA header come from (python -m bench.check_extras --where);
#      when one is missing and .whl/fallback/ carries the crt wheel, installs it and asks again;
#   3. python -m bench.gpu_check --budget 500: env, compile (every kernel once, in parallel
#      processes: CuPy's kernel cache is warm for all that follows), pytest -m gpu -n 8 (nothing
#      is timed meanwhile), then the timed stages one at a time (train, kernels, ncu: Nsight
#      Compute's counts of the cases the performance model gets wrong, "skipped" where ncu is
#      missing or may not read the counters; compare, graph, converge, launch); the stages up to
#      ncu fit the 500 s with their whole limits; a CudaSetupError stops it at once with its one line.
# and leaves in OUTDIR: setup.txt (nvidia-smi, versions, where the headers come from),
# gpu_check.log (the console, summary table last), summary.json and gpu_check.tar.gz (every log
# and JSON, ncu/ncu.json and ncu's raw CSVs among them): few files, easy to copy back from a
# machine you reach only through a job queue or a shell.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bench/gpu_session.sh OUTDIR}
mkdir -p "$OUT"
WORK=${GPU_SESSION_WORK:-/tmp/gpu_check}      # the check's folder (tarred at the end)
SITE=${GPU_SESSION_SITE:-/tmp/site}           # where the carried wheels go
rm -rf "$WORK"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
        && export PYTHONPATH="$SITE:${PYTHONPATH:-}"
fi
export PYTHONUNBUFFERED=1
{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
    python3 -c "import cupy, numpy; print('cupy', cupy.__version__, 'numpy', numpy.__version__)" 2>&1
} > "$OUT/setup.txt"
python3 -m bench.check_extras --where >> "$OUT/setup.txt" 2>&1
headers=$?
if [ "$headers" -eq 2 ] && ls .whl/fallback/*.whl >/dev/null 2>&1; then
    echo "a CUDA header is missing: installing the carried wheel(s) of .whl/fallback" >> "$OUT/setup.txt"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        .whl/fallback/*.whl >> "$OUT/setup.txt" 2>&1
    export PYTHONPATH="$SITE:${PYTHONPATH:-}"
    python3 -m bench.check_extras --where >> "$OUT/setup.txt" 2>&1
fi
cat "$OUT/setup.txt"
python3 -m bench.gpu_check --budget 500 --out "$WORK" 2>&1 | tee "$OUT/gpu_check.log"
cp "$WORK/summary.json" "$OUT/" 2>/dev/null || true
tar czf "$OUT/gpu_check.tar.gz" -C "$(dirname "$WORK")" "$(basename "$WORK")"
