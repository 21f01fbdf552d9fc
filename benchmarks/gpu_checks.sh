#!/usr/bin/env bash
# One command for a GPU session: smoke-test seqpar's CUDA paths, then run the pending GPU measurements.
#
# Why one script: a GPU session gets a few minutes of device time and one command per call, so every
# check is prepared here, each step bounded by its own timeout and the whole run by a time budget,
# and a failing step never stops the others (no `set -e`). Run from the repository root:
#
#     bash benchmarks/gpu_checks.sh
#
# Each step's full output goes to a file under ${OUT:-/tmp/gpu_out}; the device tool brings back at most 8
# files, so related steps append to one file (run_step appends); stdout gets one status line per step and,
# at the end, a short digest.
#
# Environment:
#   GPU_CHECKS_DEVICE=cpu   run everything on CPU with tiny sizes (validates flags and non-GPU crashes)
#   GPU_CHECKS_BUDGET=540   seconds for the whole run; a step's timeout is cut to what is left
#   PYTHON=python3          the interpreter (seqpar is not installed: PYTHONPATH=src:. is used)
set -u

OUT_DIR=${OUT:-/tmp/gpu_out}
DEV=${GPU_CHECKS_DEVICE:-cuda}
BUDGET=${GPU_CHECKS_BUDGET:-540}
PY=${PYTHON:-python3}
KILL_GRACE=5  # after a step's SIGINT (pytest prints its summary, pools close), SIGKILL this much later
mkdir -p "$OUT_DIR"
rm -f "$OUT_DIR"/0[0-9]*  # run_step appends: start from empty files
export PYTHONUNBUFFERED=1 PYTHONPATH=src:. SEQPAR_TEST_DEVICE=$DEV DEV BUDGET PY  # cuda: fail, not fall back
STATUS=()

# run_step NAME FILE TIMEOUT CMD...: CMD's stdout+stderr to FILE, bounded by TIMEOUT and the budget left.
run_step() {
    local name=$1 file=$OUT_DIR/$2 limit=$3
    shift 3
    local left=$((BUDGET - SECONDS - KILL_GRACE))
    if ((left < 20)); then
        STATUS+=("$name: SKIPPED (time budget spent)")
        echo "[gpu_checks] ${STATUS[-1]}"
        echo "$name skipped: ${SECONDS}s of the ${BUDGET}s budget used" >>"$file"
        return
    fi
    ((limit > left)) && limit=$left
    echo "[gpu_checks] $name: running (timeout ${limit}s) -> $file"
    local start=$SECONDS
    local rc
    {
        echo "## $name"
        echo "\$ $*"
        echo
        # SIGINT first: pytest still prints its failures, the benchmarks' worker pools shut down
        timeout -s INT -k "$KILL_GRACE" "$limit" "$@"
        rc=$?
        echo
        echo "[exit status $rc]"
        echo
    } >>"$file" 2>&1
    local what="ok"
    case $rc in
        0) ;;
        124 | 130 | 137) what="TIMEOUT after ${limit}s (rc $rc; partial output kept)" ;;
        *) what="FAILED (rc $rc)" ;;
    esac
    STATUS+=("$name: $what in $((SECONDS - start))s")
    echo "[gpu_checks] ${STATUS[-1]}"
}

env_info() {
    echo "date: $(date -u +%FT%TZ)  device mode: $DEV  budget: ${BUDGET}s"
    echo "git: $(git rev-parse --short HEAD 2>/dev/null) $(git status --porcelain 2>/dev/null | wc -l) changed files"
    nvidia-smi -L 2>&1 || echo "(no nvidia-smi)"
    nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,compute_cap --format=csv 2>&1 || true
    echo "nproc: $(nproc)"
    "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| cuDNN", torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
try:
    import transformers
    print("transformers", transformers.__version__)
except Exception as exc:  # the HF step needs it; say so here
    print("transformers: not importable:", exc)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("cuda:0", p.name, f"cc {p.major}.{p.minor}", f"{p.total_memory / 2**30:.0f} GiB")
    import torch.distributed as dist
    print("gloo", dist.is_gloo_available(), "| nccl", dist.is_nccl_available())
EOF
}

if [ "$DEV" = cpu ]; then  # tiny sizes: the same flags and code paths, minutes on a laptop
    RING=(--heads 4 --kv-heads 4 --head-dim 64 --nproc 8 --seq-lens 1024 2048)
    MASKED=(--heads 4 --kv-heads 4 --head-dim 64 --nproc 8 --seq-lens 2048 --masks causal packed window
            --doc-len 256 --window 64)
    COMPILED=(--nproc 2 --seq-len 512 --heads 4 --kv-heads 2 --head-dim 64 --doc-len 128 --window 64 --backend aot_eager)
    FLASH=()  # no flash kernel on CPU
    PLAN=(--seq-lens 256 512)
    INF=(--nproc 4 --hidden 256 --heads 4 --kv-heads 2 --layers 2 --prompt-lens 256 512 --decode-tokens 4 --reps 1)
else
    RING=(--heads 32 --kv-heads 32 --head-dim 128 --nproc 8 --seq-lens 32768 131072)
    # packed 8 x 16k documents and a 4096 window at 128k, H=32, D=128 (the masked path's target shapes)
    MASKED=(--heads 32 --kv-heads 32 --head-dim 128 --nproc 8 --seq-lens 131072 --masks causal packed window
            --doc-len 16384 --window 4096)
    COMPILED=(--nproc 2 --seq-len 16384 --heads 16 --kv-heads 4 --head-dim 128 --doc-len 2048 --window 1024)
    FLASH=(--backend flash)
    PLAN=(--seq-lens 4096 16384)
    INF=(--nproc 4 --hidden 2048 --heads 16 --kv-heads 4 --layers 8 --prompt-lens 8192 32768)
fi

export -f env_info  # timeout runs programs, not functions
run_step env 00_env.txt 30 bash -c env_info
# not -x: one broken kernel must not hide the state of every other path; --maxfail bounds a cascade
run_step tests 01_tests.txt 150 "$PY" -m pytest -q -rfEs --maxfail=25 --durations=10 -p no:cacheprovider tests/gpu
run_step ring_efficiency 02_ring_efficiency.md 150 \
    "$PY" benchmarks/attention.py --emulate-ring --device "$DEV" --dtype bfloat16 "${RING[@]}" --backward --reps 3
# the same at 32k with the PyTorch merge instead of the fused Triton one: what the fused merge buys
run_step ring_efficiency_unfused 02_ring_efficiency.md 60 \
    env SEQPAR_FUSED_MERGE=0 "$PY" benchmarks/attention.py --emulate-ring --device "$DEV" --dtype bfloat16 \
    "${RING[@]:0:8}" --seq-lens "${RING[9]}" --backward --reps 3
# ---- attention hot path (issue 15): the fused masked path, its efficiency per unit of visible work, the
# compiled ring.  Masked blocks run flash-attn's varlen op; "vs causal per pair" compares each mask's time per
# visible query-key pair with the causal mask's (target: masked within 15% of unmasked, i.e. <= 1.15).
# --backend flash: dense blocks on the same flash kernel family (the like-for-like figure); auto: cuDNN dense.
run_step masked_efficiency_flash 02c_masked_compiled.md 120 \
    "$PY" benchmarks/attention.py --emulate-ring --device "$DEV" --dtype bfloat16 "${MASKED[@]}" --backward \
    --reps 3 "${FLASH[@]}"
run_step masked_efficiency_auto 02c_masked_compiled.md 90 \
    "$PY" benchmarks/attention.py --emulate-ring --device "$DEV" --dtype bfloat16 "${MASKED[@]}" --reps 3
run_step compiled_ring 02c_masked_compiled.md 120 \
    "$PY" benchmarks/compiled.py --device "$DEV" --dtype bfloat16 "${COMPILED[@]}" --strategies ring ulysses --reps 5
run_step plan_validation 03_plan_validation.md 90 \
    "$PY" benchmarks/plan_validation.py --device "$DEV" --dtype bfloat16 "${PLAN[@]}"
run_step inference 04_inference.md 120 \
    "$PY" benchmarks/inference.py --device "$DEV" --dtype bfloat16 "${INF[@]}"
run_step inference_hf 05_inference_hf.md 90 \
    "$PY" benchmarks/inference.py --model hf --device "$DEV" --dtype bfloat16 "${INF[@]}"

# digest: what the device tool's 12,000-character output tail should show even if no file comes back
{
    echo "== status (${SECONDS}s of ${BUDGET}s)"
    printf '%s\n' "${STATUS[@]}"
    echo "== env"
    grep -E "^(python|transformers|cuda:0|GPU )" "$OUT_DIR/00_env.txt"
    echo "== tests"
    grep -E "^(FAILED|ERROR|SKIPPED)|passed|failed|error|KeyboardInterrupt" "$OUT_DIR/01_tests.txt" |
        cut -c1-240 | tail -n 40
    for f in 02_ring_efficiency.md 02c_masked_compiled.md 03_plan_validation.md 04_inference.md 05_inference_hf.md; do
        echo "== $f"
        grep -E "^\| [0-9A-Za-z]|^largest|Error|error:" "$OUT_DIR/$f" | cut -c1-200 | tail -n 30
        tail -n 2 "$OUT_DIR/$f"
    done
} >"$OUT_DIR/06_summary.txt" 2>&1
cat "$OUT_DIR/06_summary.txt"

# ==================================================================================================
# Engineer B's block (issue 16, memory beyond attention): the planner's peak memory per GPU against
# max_memory_allocated, every memory setting on and off (recompute, host offload, tiled MLP, chunked
# loss, ZeRO-3), 4 ranks on cuda:0 over gloo, bf16. One step, one file (07), appended to the digest.
# A ratio far from 1 in a row names the setting whose CUDA memory differs from the CPU-validated model
# (expected: RMSNorm may run fused on CUDA and keep less; cuBLAS workspaces add a few MB per rank).
# ==================================================================================================
if [ "$DEV" = cpu ]; then
    MEM=(--seq-lens 2048 4096 --dtype float32)
else
    MEM=(--seq-lens 65536 262144 --dtype bfloat16)
fi
run_step memory_plan 07_memory_plan.md 150 "$PY" benchmarks/memory_peak.py --device "$DEV" "${MEM[@]}"
{
    echo "== 07_memory_plan.md"
    grep -E "^\| [A-Za-z]|^#|Error|error:" "$OUT_DIR/07_memory_plan.md" | cut -c1-200 | tail -n 24
    tail -n 2 "$OUT_DIR/07_memory_plan.md"
} | tee -a "$OUT_DIR/06_summary.txt"
