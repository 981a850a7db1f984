#!/usr/bin/env bash
# The one GPU command for `qvlq profile`: the full-size Qwen-VL-Chat geometry with RANDOM weights
# (generated on the device, no checkpoint or download), BF16 and Int4 (RTN 4-bit g128 sym packed in
# the official GPTQ v1 layout, from the same weights, in place), engines hf and fast, contexts 2048
# and 8192 (the seed's protocol) -- sized to finish inside ONE 10-minute command on an H100/H200.
#
# Usage: bash benchmarks/profile_full.sh [extra qvlq-profile options]
#   PYTHON=...        interpreter with CUDA torch (default: .venv/bin/python if it sees CUDA, else python3)
#   OUT=...           reports go to $OUT/profile-full/ (+ profile-full.log); else reports/profile/<gpu>-<date>/
#   FAST_COMPILE=...  FastEngine compile mode (default off, see below)
#   MAX_SECONDS=...   the profile's own wall-clock budget (default 510)
#   TIMEOUT=...       hard limit on the profile process (default 585, inside a 600 s device command)
#   DRY_RUN=1         check this script on a CPU box: the same plan on the tiny geometry, short contexts
#
# Time budget (seconds; H100 guesses: hf eager ~30-50 tok/s, fast with a CUDA graph ~100-200 tok/s)
#   startup: python + torch/transformers imports, CUDA init, tokenizer, copy-bandwidth test   ~20-30
#   BF16 random weights generated on the device (9.66 B params)                                 ~5
#   BF16 share of the budget (~240):
#     hf   @2048  warm-up 64 tok + encode 2047 + run 1 (1792 tok at 30 tok/s = 60)               ~65
#                 run 2 only if what follows still fits (adaptive)                               +60
#     fast @2048  graph capture + warm-up + encode + 2 runs x 1792 tok (12-18 each)              ~35
#     hf   @8192  WINDOWED: 5 windows x 48 tokens after prefills to 289..8143, + encode 8191      ~20
#     fast @8192  warm-up + encode 8191 + ONE full run of 7934 tok (50-80)                      ~60-85
#   Int4 in place (160 linears: RTN + v1 pack + tinygemm repack)                               ~10-20
#   Int4 share: the same plan (hf similar, fast faster with the int4 kernel)                 ~150-230
#   report (json, md, svg, png)                                                                 ~5
#   => ~450-540 s. `--max-seconds` makes the profile itself skip (reported "skipped: budget") or
#   stop early (reported "partial: budget") whatever would not fit, so it ends before `timeout 585`.
#
# Choices:
#   * hf @8192 is windowed: one full hf run is 7934 tok / ~30 tok/s = ~265 s, two precisions alone
#     would take the whole budget. Per-token cost depends only on the context length, so windows at 5
#     positions after prefills, interpolated over the run, estimate its decode rate (marked "~").
#     Its "generate 8192" memory is the last window's (a prefill to 8143 + 49 tokens), flagged; the
#     protocol's full-length "generate 8192" memory comes from the fast engine's full run.
#   * runs 2 at 2048, 1 at 8192 after one 64-token warm-up per engine instance (the decode tok/s of
#     the seed is a single long generation; repeats at 2048 give a run-to-run stdev).
#   * FastEngine with FAST_COMPILE=off: its eager decode step captured in one CUDA graph (~1 s). The
#     default torch.compile (reduce-overhead) costs ~1-2 min per engine instance and there are 4
#     (2 precisions x 2 contexts, each with its own static cache size): it would not fit. Run again
#     with FAST_COMPILE=auto and `--engine fast` for compiled numbers if device time allows.
set -euo pipefail
cd "$(dirname "$0")/.."
ts() { date +%H:%M:%S; }
START=$(date +%s)
echo "[$(ts)] profile_full: start ($(pwd))"

PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
    if [[ -x .venv/bin/python ]] && .venv/bin/python -c 'import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
        PY=.venv/bin/python
    else
        PY=python3
    fi
fi
export COLUMNS="${COLUMNS:-220}"  # rich tables in the log at full width
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"

if [[ -n "${OUT:-}" ]]; then
    REPORT_DIR="$OUT/profile-full"
    LOG="$OUT/profile-full.log"
else
    REPORT_DIR=""  # the profile's default: reports/profile/<gpu>-<date>/
    mkdir -p reports/profile
    LOG="reports/profile/profile-full-$(date +%Y%m%d-%H%M%S).log"
fi

# Preflight (~2 s): fail fast, before device time goes to a broken environment (no heavy imports).
DRY_RUN="${DRY_RUN:-0}" "$PY" - <<'EOF'
import importlib.util
import os
import sys
missing = [m for m in ("torch", "transformers", "tiktoken", "typer", "rich", "matplotlib", "psutil", "pynvml")
           if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"profile_full: {sys.executable} lacks {', '.join(missing)}; set PYTHON=... to a CUDA env with them")
import torch
if os.environ["DRY_RUN"] == "1":
    print(f"preflight ok (DRY_RUN on CPU): torch {torch.__version__}")
    sys.exit(0)
if not torch.cuda.is_available():
    sys.exit("profile_full: CUDA is not available to this python (set PYTHON=... to a CUDA torch)")
p = torch.cuda.get_device_properties(0)
print(f"preflight ok: torch {torch.__version__}, CUDA {torch.version.cuda}, {p.name}, {p.total_memory / 1e9:.0f} GB")
EOF
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.max.memory --format=csv || true
fi

ARGS=(profile --random-weights full --precisions bf16,int4 --engine both --contexts 2048,8192
      --runs 2,1 --warmup-tokens 64 --windowed hf@8192 --window-tokens 48 --window-points 5
      --fast-compile "${FAST_COMPILE:-off}" --max-seconds "${MAX_SECONDS:-510}" --overwrite)
if [[ "${DRY_RUN:-0}" == 1 ]]; then
    ARGS=(profile --random-weights tiny --precisions bf16,int4 --engine both --contexts 300,320
          --runs 2,1 --warmup-tokens 8 --windowed hf@320 --window-tokens 8 --window-points 3
          --device cpu --max-seconds "${MAX_SECONDS:-510}" --overwrite)
fi
[[ -n "$REPORT_DIR" ]] && ARGS+=(--out "$REPORT_DIR")

echo "[$(ts)] running: qvlq ${ARGS[*]} $*"
# -k: a process that ignores SIGTERM is killed 10 s later; 585 s leaves a 600 s limit some slack.
timeout -k 10 "${TIMEOUT:-585}" "$PY" -m qvlq.cli "${ARGS[@]}" "$@" 2>&1 | tee "$LOG"
echo "[$(ts)] profile_full: done in $(( $(date +%s) - START )) s; log $LOG${REPORT_DIR:+, report $REPORT_DIR}"
