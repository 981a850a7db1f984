#!/usr/bin/env bash
# The GPU checks in one command, sized for one 9-minute device call on an H100/H200, most wanted first:
#   0. qvlq.int4_mma's first contact: compile, launch, where each weight comes from (mma_diagnose.py, <= 60 s)
#   2. int4 GEMV per full-size shape: tinygemm vs both kernels, and w1+w2 as one fused GEMV (what fusing them
#      would save a step)                                                   (benchmarks/int4_gemv.py, <= 90 s)
#   2b. decode attention per cache length and position: SDPA over the whole cache, SDPA over 512-slot buckets,
#      the Triton split-KV kernel over slots 0..pos             (benchmarks/decode_attention.py, <= 45 s)
#   3. the profile: fast engine compiled, BF16 + Int4, contexts 2048 and 8192 (benchmarks/profile_full.sh),
#      attention "fastest" (SDPA vs the Triton kernel timed per cache length at engine build, recorded)
#      with QVLQ_INT4_BACKEND=fastest over tinygemm and each of qvlq's kernels that 0 and 2 found right (mma;
#      Triton only without mma): each int4 shape tuned, checked and timed at build, the fastest kept and
#      recorded in the report                                                                   (<= 300 s)
#   3f. only if step 3 brought back no Int4 figure: the same without fused blocks and PDL (never run on a GPU
#      yet), into $OUT/fallback/                                                                 (<= 240 s)
#   5. Int4 fast at 2048 with the token-embedding table in host memory, read in place (--host-embedding): its
#      memory cells (the issue's absolute encode-2048 figure) and its decode tok/s against step 3's (qvlq profile,
#      <= 100 s)
#   then the issue's targets over the profiles that came back (benchmarks/profile_targets.py -> targets.md)
#   1. CUDA tests of qvlq's int4 kernels (Triton, mma), chat's CUDA-graph engine and the host-memory modes (last:
#      a fault there would take the CUDA context from the tests after it)  (pytest -m gpu, <= 150 s)
#      if the budget has room left
#   5b. Int4 as in 5 with the vision tower streamed from host memory too (--stream-vision): memory and time to
#      first token; --stream-vision alone if step 5 brought back no Int4 figure; then the targets again
#                                                                                 (qvlq profile, <= 100 s)
#   4. the compiled decode step kernel by kernel, with the same int4 choice  (benchmarks/decode_kernels.py)
#      if the budget has room left
#   4b. the same for Int4 with the FastEngine's fusion off (--fuse off): the A/B of the fused blocks
#      if the budget has room left
#   4c. the same for Int4 fused, with the tuners' PDL launches left out (QVLQ_PDL=0): the A/B of PDL
#      if the budget has room left
# The `hf` engine (the seed's eager loop) is left out: it does not change with these kernels and its cells
# are in reports/profile/h200-random-full-2026-11-26/; `bash benchmarks/profile_full.sh` runs everything.
#
# Usage: OUT=dir bash benchmarks/gpu_checks.sh     (PYTHON=... as in profile_full.sh; BUDGET=540 seconds)
#   STEPS="3 1"   run only these steps (default: all); without 2, step 3 times tinygemm and mma (the tuner
#                 checks each config against the reference) unless 0 ran and failed
#   KV_BLOCK=512  profile with SDPA over the first multiple of 512 cache slots instead of the default attention
#                 choice (one recompile: the length becomes dynamic); step 2b measures both ways per position.
#   FUSE=mlp|off  profile with less of the FastEngine's int4 fusion (default block; step 4b measures off)
# Output in $OUT: gpu-checks.log, mma-diagnose.json, int4-gemv.json, decode-attention.json, decode-kernels.json,
# decode-kernels-unfused.json, decode-kernels-nopdl.json, profile-full.log, profile-full/, profile-host-embedding.log,
# profile-host-embedding/, profile-host-weights.log, profile-host-weights/, targets.md.
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the output directory}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
START=$(date +%s)
BUDGET="${BUDGET:-540}"
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 COLUMNS="${COLUMNS:-200}"
LOG="$OUT/gpu-checks.log"
want() { [[ " ${STEPS:-0 2 2b 3 5 1 5b 4 4b 4c} " == *" $1 "* ]]; }
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
say() { echo "[$(date +%H:%M:%S) +$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }

# run_step STEP TITLE LIMIT SCRIPT JSON: one benchmark script with its JSON in $OUT; prints its exit status,
# or "skipped" when STEPS leaves it out
run_step() {
    if ! want "$1"; then echo skipped; return; fi
    say "$1. $2" >&2
    timeout -k 5 "$3" "$PY" "$4" --out "$OUT/$5" 2>&1 | tee -a "$LOG" | tail -n 40 >&2
    local rc=$?
    say "$1. rc=$rc" >&2
    echo "$rc"
}

say "gpu_checks: start; $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null)"
diag_rc=$(run_step 0 "int4_mma layout probe" 60 benchmarks/mma_diagnose.py mma-diagnose.json)
run_step 2 "int4 GEMV benchmark" 90 benchmarks/int4_gemv.py int4-gemv.json >/dev/null  # read back from its JSON
attn_rc=$(run_step 2b "decode attention benchmark" 45 benchmarks/decode_attention.py decode-attention.json)

ATTENTION=fastest
if [[ $attn_rc != 0 && $attn_rc != skipped ]]; then ATTENTION=sdpa; fi
if [[ -n "${KV_BLOCK:-}" ]]; then ATTENTION=sdpa; fi

# the profile times the kernels per shape ("fastest": each candidate tuned and checked against the reference
# at model build); Triton only when the mma kernel failed its probe or the benchmark (Triton measured
# 0.62-0.75x tinygemm: its tuning costs profile time)
BACKEND=fastest
export QVLQ_INT4_CANDIDATES=$("$PY" - "$OUT/int4-gemv.json" "$diag_rc" <<'PYEOF'
import json, sys
try:
    rows = json.load(open(sys.argv[1]))["shapes"]
except (OSError, ValueError, KeyError):
    rows = None  # step 2 did not run (or died): the tuners' own checks decide
def good(k):
    return rows is None or bool(rows) and all(f"{k}_us" in r and not r.get(f"{k}_mismatch") for r in rows)
mma = sys.argv[2] in ("0", "skipped") and good("mma")
pick = ["int4_cuda"] + (["mma"] if mma else ["triton"] if good("triton") else [])
print(",".join(pick))
PYEOF
)
if want 3; then
    P_TIMEOUT=$(( $(left) - 10 < 300 ? $(left) - 10 : 300 ))
    say "3. profile with QVLQ_INT4_BACKEND=$BACKEND over $QVLQ_INT4_CANDIDATES, attention $ATTENTION (limit ${P_TIMEOUT}s)"
    QVLQ_INT4_BACKEND=$BACKEND FAST_COMPILE=auto MAX_SECONDS=$(( P_TIMEOUT - 25 )) TIMEOUT=$P_TIMEOUT OUT="$OUT" \
        PYTHON="$PY" bash benchmarks/profile_full.sh --engine fast --int4-dtype bf16 --windowed '' \
        --attention "$ATTENTION" --fuse "${FUSE:-block}" ${KV_BLOCK:+--kv-block "$KV_BLOCK"} >/dev/null 2>&1
    p_rc=$?
    say "3. rc=$p_rc; $(grep -E '^(│ (bf16|int4) +│ fast)' "$OUT/profile-full.log" | head -4 | tr -s ' ' | tr '\n' ' ')"
    say "3. greedy tokens against the HF loop: $(grep -E 'reference run' "$OUT/profile-full.log" | tr -s ' ' | tr '\n' ' ')"
    # no Int4 figure (a crash takes the CUDA context and every later cell with it): the same profile without the
    # levers no GPU has run yet (fused blocks, PDL), so the session still brings back a number to compare
    if ! grep -qE '^│ int4 +│ fast +│ [0-9]' "$OUT/profile-full.log" && (( $(left) >= 150 )); then
        F_TIMEOUT=$(( $(left) - 10 < 240 ? $(left) - 10 : 240 ))
        PRECS=int4
        grep -qE '^│ bf16 +│ fast +│ [0-9]' "$OUT/profile-full.log" || PRECS=bf16,int4
        say "3f. no Int4 figure: $PRECS again with --fuse off and QVLQ_PDL=0 (limit ${F_TIMEOUT}s)"
        QVLQ_PDL=0 QVLQ_INT4_BACKEND=$BACKEND FAST_COMPILE=auto MAX_SECONDS=$(( F_TIMEOUT - 25 )) TIMEOUT=$F_TIMEOUT \
            OUT="$OUT/fallback" PYTHON="$PY" bash benchmarks/profile_full.sh --engine fast --int4-dtype bf16 \
            --windowed '' --precisions "$PRECS" --attention "$ATTENTION" --fuse off >/dev/null 2>&1
        say "3f. rc=$?; $(grep -E '^(│ (bf16|int4) +│ fast)' "$OUT/fallback/profile-full.log" | head -4 | tr -s ' ' | tr '\n' ' ')"
    fi
fi

# run_host STEP NAME TITLE FLAGS...: Int4 fast at 2048 with some weights in host memory, into $OUT/NAME/; the log
# line shows the row, the memory cells and the feature checks
run_host() {
    local step=$1 name=$2 title=$3 limit
    shift 3
    if ! want "$step"; then return; fi
    if (( $(left) < 75 )); then say "$step. skipped: $(left) s left"; return; fi
    limit=$(( $(left) - 5 < 100 ? $(left) - 5 : 100 ))
    say "$step. Int4 with $title ($*; limit ${limit}s)"
    QVLQ_INT4_BACKEND=$BACKEND timeout -k 5 "$limit" "$PY" -m qvlq.cli profile --random-weights full \
        --precisions int4 --int4-dtype bf16 --engine fast --contexts 2048 --runs 1 --warmup-tokens 32 \
        --attention "$ATTENTION" --fuse "${FUSE:-block}" "$@" --max-seconds $(( limit - 15 )) \
        --out "$OUT/$name" --overwrite > "$OUT/$name.log" 2>&1
    say "$step. rc=$?; $(grep -E '^│ int4 +│ fast' "$OUT/$name.log" | head -3 | tr -s ' ' | tr '\n' ' ')"
    say "$step. $(grep -E -A1 'against the resident one' "$OUT/$name.log" | tr -s ' ' | tr '\n' ' ')"
}
run_host 5 profile-host-embedding "the embedding table in host memory" --host-embedding

# the issue's targets over every profile that came back so far (a few seconds; run again after 5b, so that a
# later step cut off by the device call's limit cannot take it along)
check_targets() {
    local reports
    reports=$(ls "$OUT"/profile-*/report.json "$OUT"/fallback/profile-*/report.json 2>/dev/null)
    [[ -n $reports ]] || return
    # shellcheck disable=SC2086
    "$PY" benchmarks/profile_targets.py $reports --out "$OUT/targets.md" > /dev/null 2>&1
    say "targets: rc=$?; $(grep -cE '\| NO \|' "$OUT/targets.md" 2>/dev/null) not met (targets.md)"
    grep -E '^\| ' "$OUT/targets.md" 2>/dev/null | tee -a "$LOG"
}
check_targets

if want 1 && (( $(left) >= 40 )); then
    say "1. CUDA tests (limit $(( $(left) < 150 ? $(left) : 150 ))s)"
    timeout -k 5 $(( $(left) < 150 ? $(left) : 150 )) "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_decode_attention.py tests/test_int4_mma.py \
        tests/test_int4_triton.py tests/test_chat.py "tests/test_fast.py::test_cuda_triton_attention_matches_hf" \
        "tests/test_fast.py::test_cuda_mma_int4_with_fused_mlp_matches_hf" tests/test_stream.py \
        2>&1 | tee -a "$LOG" | tail -n 15
    tests_rc=$?
    say "1. rc=$tests_rc"
elif want 1; then
    say "1. skipped: $(left) s left"
fi

# 5b after the tests: the streamed tower is the smaller question once 5 meets the memory figure
if want 5b; then
    if grep -qsE '^│ int4 +│ fast +│ [0-9]' "$OUT/profile-host-embedding.log"; then
        run_host 5b profile-host-weights "the embedding table and the vision tower in host memory" --host-embedding \
            --stream-vision
    else  # the mapped table failed (or 5 did not run): the streamed tower alone
        run_host 5b profile-host-weights "the vision tower streamed from host memory" --stream-vision
    fi
    check_targets
fi

if want 4 && (( $(left) >= 70 )); then
    say "4. decode step kernels (limit $(( $(left) - 5 ))s)"
    QVLQ_INT4_BACKEND=$BACKEND timeout -k 5 $(( $(left) - 5 )) "$PY" benchmarks/decode_kernels.py \
        --attention "$ATTENTION" --out "$OUT/decode-kernels.json" 2>&1 | tee -a "$LOG" | grep -v "^USDT" | tail -n 60
    say "4. rc=$?"
elif want 4; then
    say "4. skipped: $(left) s left"
fi

if want 4b && (( $(left) >= 60 )); then
    say "4b. decode step kernels, Int4 unfused (limit $(( $(left) - 5 ))s)"
    QVLQ_INT4_BACKEND=$BACKEND timeout -k 5 $(( $(left) - 5 )) "$PY" benchmarks/decode_kernels.py --precisions int4 \
        --fuse off --attention "$ATTENTION" --out "$OUT/decode-kernels-unfused.json" 2>&1 | tee -a "$LOG" \
        | grep -v "^USDT" | tail -n 30
    say "4b. rc=$?"
elif want 4b; then
    say "4b. skipped: $(left) s left"
fi

if want 4c && (( $(left) >= 60 )); then
    say "4c. decode step kernels, Int4 fused, no PDL launches (limit $(( $(left) - 5 ))s)"
    QVLQ_PDL=0 QVLQ_INT4_BACKEND=$BACKEND timeout -k 5 $(( $(left) - 5 )) "$PY" benchmarks/decode_kernels.py \
        --precisions int4 --attention "$ATTENTION" --out "$OUT/decode-kernels-nopdl.json" 2>&1 | tee -a "$LOG" \
        | grep -v "^USDT" | tail -n 30
    say "4c. rc=$?"
elif want 4c; then
    say "4c. skipped: $(left) s left"
fi
say "gpu_checks: done"
