#!/usr/bin/env bash
# One timed MLPerf run of ResNet-50 v1.5, the way the MLPerf reference benchmarks are driven:
#
#   ./run_and_time.sh SEED                      # data under /imn (train.lmdb, val.lmdb)
#   SEED=7 ./run_and_time.sh                    # the seed from the environment (docker run -e SEED=7)
#   DATA_DIR=/data/imagenet-lmdb ./run_and_time.sh 3
#   DATA_DIR=tiny-lmdb TRAIN_ARGS="--device cpu --width 0.0625 --image-size 32 --batch-size 16
#     --epochs 3 --target-accuracy 0.1" ./run_and_time.sh 1            # CI-sized, on the CPU
#
# Environment:
#   DATA_DIR    folder with train.lmdb and val.lmdb (made by `python -m data.pack`); default /imn
#   RUN_DIR     where train.py writes mlperf.log, checkpoints and plots;
#               default runs/mlperf-seed<SEED>-<date> under the current directory
#   TRAIN_ARGS  extra train.py flags, split on whitespace (for CI and experiments)
#   PYTHON      the interpreter; default: $PYTHON, else .venv/bin/python next to this script
#               (the README's plain route), else python3 from PATH (the container's venv)
#
# Prints "STARTING TIMING RUN AT <date>", train.py's output (the MLLOG lines among it),
# "ENDING TIMING RUN AT <date>", and last one line
#   RESULT,IMAGE_CLASSIFICATION,<seed>,<seconds>,<user>,<start date>
# where <seconds> is the time to train from the MLPerf log (run_start -> run_stop, the MLPerf
# definition; bench/mlperf_result.py reads it), or the wall-clock time of the whole script
# when the log has no run_stop (a crash), which is then said on stderr.
# Exit status: 0 when the target accuracy was reached; otherwise train.py's exit status
# (1 target not reached, 2 bad usage or missing data, 3 diverged, 4 out of device memory,
# 130 interrupted), or 1 when train.py exited 0 but the log does not say "success".
set -uo pipefail  # no -e: train.py's failure must still produce the ENDING and RESULT lines

usage() {
    echo "usage: $0 SEED   (SEED: a non-negative integer, or set in the environment; also DATA_DIR, RUN_DIR, TRAIN_ARGS, PYTHON)" >&2
    exit 2
}

main() {
    [[ $# -le 1 ]] || usage
    SEED=${1:-${SEED:-}}
    [[ -n $SEED ]] || usage
    [[ $SEED =~ ^[0-9]+$ ]] || { echo "$0: SEED must be a non-negative integer, got '$SEED'" >&2; usage; }

    # The project folder; relative DATA_DIR and RUN_DIR stay relative to the caller's directory.
    HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

    if [[ -n ${PYTHON:-} ]]; then
        :
    elif [[ -x $HERE/.venv/bin/python ]]; then
        PYTHON=$HERE/.venv/bin/python
    else
        PYTHON=python3
    fi
    command -v "$PYTHON" >/dev/null 2>&1 || { echo "$0: no Python interpreter '$PYTHON' (set PYTHON=...)" >&2; exit 2; }

    DATA_DIR=${DATA_DIR:-/imn}
    RUN_DIR=${RUN_DIR:-runs/mlperf-seed${SEED}-$(date +%Y%m%d-%H%M%S)}
    read -r -a EXTRA_ARGS <<< "${TRAIN_ARGS:-}"
    RUN_USER=${USER:-$(id -un 2>/dev/null || echo unknown)}
    mkdir -p "$RUN_DIR" || exit 2
    LOG="$RUN_DIR/mlperf.log"

    start=$(date +%s)
    start_fmt=$(date "+%Y-%m-%d %r")
    echo "STARTING TIMING RUN AT $start_fmt"

    # Unbuffered, so that the log lines and the progress bars interleave in time order under tee.
    PYTHONUNBUFFERED=1 "$PYTHON" "$HERE/train.py" --data "$DATA_DIR" --seed "$SEED" --out "$RUN_DIR" ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}
    train_status=$?

    end=$(date +%s)
    end_fmt=$(date "+%Y-%m-%d %r")
    echo "ENDING TIMING RUN AT $end_fmt"

    # The summariser needs only the standard library: run it as a file, installed or not.
    SUMMARISER=$HERE/bench/mlperf_result.py
    if seconds=$("$PYTHON" "$SUMMARISER" --time-to-train "$LOG"); then
        :
    else
        seconds=$((end - start))
        echo "$0: no time to train in $LOG; the RESULT line gives the wall-clock seconds of the whole run" >&2
    fi
    status=$("$PYTHON" "$SUMMARISER" --status "$LOG" 2>/dev/null) || status=missing

    echo "RESULT,IMAGE_CLASSIFICATION,$SEED,$seconds,$RUN_USER,$start_fmt"

    if [[ $train_status -ne 0 ]]; then
        echo "$0: train.py exited with status $train_status (run_stop status: $status); target not reached" >&2
        exit "$train_status"
    fi
    if [[ $status != success ]]; then
        echo "$0: train.py exited 0 but the MLPerf log's run_stop status is '$status'; counting it as a failed run" >&2
        exit 1
    fi
    exit 0
}

# The whole script is read before it runs (bash otherwise reads as it goes), so editing or
# updating this file during an hours-long run cannot break the run's last lines.
main "$@"; exit $?
