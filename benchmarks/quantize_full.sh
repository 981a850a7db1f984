#!/usr/bin/env bash
# The one GPU command for `qvlq quantize`: the full-size Qwen-VL-Chat geometry with RANDOM bf16 weights
# (19.3 GB written, generated on the GPU), 128 multimodal calibration samples x 2048 tokens (4 mini-suite
# pictures + long text each, via `qvlq calibrate`), then `qvlq quantize` timed, then a load/logits/chat
# check of the Int4 output -- sized for ONE 10-minute command on an H100/H200, nothing downloaded.
#
# Usage: bash benchmarks/quantize_full.sh [extra options of `quantize_bench.py full`]
#   PYTHON=...       interpreter with CUDA torch (default python3)
#   OUT=...          report to $OUT/quantize-full/ (+ quantize-full.log); else reports/quantize/
#   WORK=...         scratch dir, ~40 GiB (default /tmp/qvlq-quantize-bench; removed at the end)
#   MAX_SECONDS=...  the driver's own budget (default 540): a step still running then is stopped and
#                    the report says how far it got (quantize: blocks done, per-block seconds)
#   DRY_RUN=1        check this script on a CPU box: tiny model, 4 x 1024 tokens
#
# Time budget (seconds; H100 estimates):
#   python/torch/transformers imports, once per step process (5 processes)             ~5-15 each
#   machine probe                                                                              ~10
#   init-checkpoint --size full on cuda: randn on the GPU (~1 s), D2H, 19.3 GB safetensors   ~40-90
#     (on the CPU, measured on the 2-core dev box: seeded randn + bf16 cast 7.5 s/GB, safetensors
#      write 3-7 s/GB, i.e. ~3.5 min for 19.3 GB at load ~2 and ~18 min at load ~8: the seeded CPU
#      generator is single-threaded, so even a fast host needs minutes -- hence device=cuda)
#   calibration data: 512 pictures rendered + PNG, JSON                                        ~10
#   qvlq calibrate: 128 rows tokenized, 512 pictures -> 448 px fp32 (1.2 GB bundle)           ~20-40
#   qvlq quantize (bf16 compute, activations 2.1 GB on the GPU):                             ~250-350
#     vision tower on 512 pictures ~10; per block (x32): weights from the page cache ~0.5,
#     ~3.5 block forwards over 262k tokens ~1.5 (1.3e16 bf16 FLOP in all), fp32 Hessians (TF32 off
#     for determinism, 3.2e15 FLOP in all) ~2, GPTQ column loops over 27.4k columns at ~100-150 us
#     of kernel launches each ~3-4; then 9.7 GB Int4 output written ~10-20
#   check: float bf16 + Int4 loaded on the GPU, logits on sample 0, 16-token greedy chat       ~40-60
#   => ~7-8 min. The check is skipped when under 90 s of the budget are left; quantize is stopped
#   at the budget and the report keeps its per-block times (extrapolate: 32 blocks).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
export COLUMNS="${COLUMNS:-200}"
args=(full)
[[ "${DRY_RUN:-}" == "1" ]] && args+=(--dry-run)
echo "[$(date +%H:%M:%S)] quantize_full: start ($(pwd), $PY)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
if [[ -n "${OUT:-}" ]]; then
    mkdir -p "$OUT"
    "$PY" benchmarks/quantize_bench.py "${args[@]}" "$@" 2>&1 | tee "$OUT/quantize-full.log"
else
    "$PY" benchmarks/quantize_bench.py "${args[@]}" "$@"
fi
echo "[$(date +%H:%M:%S)] quantize_full: done"
