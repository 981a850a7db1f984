#!/usr/bin/env bash
# Train qvlq-mini on a GPU, one or more configurations at once, and archive each run for copying back.
#
# Usage: OUT=dir bash benchmarks/train_mini_gpu.sh NAME="train-mini options" [NAME="..." ...]
#   e.g. OUT=/tmp/t BUDGET=220 bash benchmarks/train_mini_gpu.sh mini="--size mini --batch 256"
#   BUDGET=...   each run's --time-budget in seconds (default 220: data, training, final eval, writing)
#   WORKERS=...  rendering processes per run (default: the cores shared out, at most 12)
#   PYTHON=...   interpreter with CUDA torch (default python3)
#   DEVICE=...   default cuda (cpu: a quick check of this script with --size micro)
# Each run is its own process: a model this small leaves the GPU mostly idle between its kernels, so two
# runs share one GPU at little cost to each. Every run ends as $OUT/NAME.tar (the checkpoint directory
# in the official layout with train_log.json, plus NAME.log), so at most a few files come back.
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the output directory}"
PY="${PYTHON:-python3}"
BUDGET="${BUDGET:-220}"
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 COLUMNS="${COLUMNS:-160}"
(( $# >= 1 )) || { echo "usage: OUT=dir bash $0 NAME=\"options\" [...]" >&2; exit 2; }
per=$(( ($(nproc) - $#) / $# )); (( per < 1 )) && per=1; (( per > 12 )) && per=12
WORKERS="${WORKERS:-$per}"
mkdir -p "$OUT"
pids=()
for spec in "$@"; do
    name="${spec%%=*}"
    opts="${spec#*=}"
    # shellcheck disable=SC2086  # the options are meant to split
    timeout -k 10 $(( ${BUDGET%.*} + 90 )) "$PY" -m qvlq.cli train-mini "$OUT/$name" --device "${DEVICE:-cuda}" \
        --time-budget "$BUDGET" --workers "$WORKERS" --overwrite $opts >"$OUT/$name.log" 2>&1 &
    pids+=($!)
    echo "[$(date +%H:%M:%S)] started $name (pid $!): train-mini --time-budget $BUDGET --workers $WORKERS $opts"
done
status=0
for i in "${!pids[@]}"; do
    wait "${pids[$i]}" || status=1
done
for spec in "$@"; do
    name="${spec%%=*}"
    echo "--- $name"; tail -n 6 "$OUT/$name.log"
    files=("$name.log")
    [[ -d "$OUT/$name" ]] && files+=("$name")
    tar -cf "$OUT/$name.tar" -C "$OUT" "${files[@]}" && rm -rf "${OUT:?}/$name" "$OUT/$name.log"
done
exit $status
