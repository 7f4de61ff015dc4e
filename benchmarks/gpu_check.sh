#!/usr/bin/env bash
# One command for a lent GPU machine (H100/H200; PyTorch, Triton and nvcc installed, nothing of
# ours, no internet): build the extension in place, run the CUDA and real (compiled) Triton
# tests, run the GPU benchmarks at paper scale, print a compact table last. About 8 minutes.
#
#   benchmarks/gpu_check.sh              # on the GPU machine, from anywhere in the repository
#   benchmarks/gpu_check.sh --dry-run    # anywhere: the CPU path, in a minute or two
#
# Environment: OUT (folder for the results; default .benchmarks/gpu_check), PYTHON (default
# python3), GPU_CHECK_BUDGET (seconds in all, default 480), PATCHDDM_SCALING_SIZES (sampling
# sizes of the scaling study, default 64..448), TORCH_CUDA_ARCH_LIST (default 9.0).
# Writes to OUT: table.md (the table printed last), gpu_check.log (everything), bench.json
# (all benchmarks, pytest-benchmark layout), limits-*.md, scaling-*.png/.csv/-capacity.md.
# Missing optional packages are reported and worked around: without pytest-benchmark the
# benchmarks time with benchmarks/fallback.py; benchmark files whose imports fail (e.g.
# test_data.py without nibabel) are skipped and listed; without matplotlib no plot.

set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-480}
DRY_RUN=0
[ "${1:-}" = "--dry-run" ] && DRY_RUN=1
OUT_DIR=${OUT:-$ROOT/.benchmarks/gpu_check}
mkdir -p "$OUT_DIR"
WORK=$(mktemp -d)            # per-file JSON and reports; only the chosen files go to OUT
LOG=$OUT_DIR/gpu_check.log
: > "$LOG"
START=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
STATUS=()                    # one line per step, printed before the table

say() { echo "[gpu_check $(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
# run_step NAME SECONDS COMMAND...: runs with a time limit, logs, records the outcome
run_step() {
    local name=$1 limit=$2; shift 2
    if [ "$limit" -le 5 ]; then STATUS+=("$name: not run (time budget spent)"); say "skip $name: no time left"; return 1; fi
    say "$name (limit ${limit}s): $*"
    local t0=$(date +%s)
    timeout --signal=INT --kill-after=10 "$limit" "$@" >> "$LOG" 2>&1
    local rc=$?
    local dt=$(( $(date +%s) - t0 ))
    case $rc in
        0) STATUS+=("$name: ok (${dt}s)") ;;
        124|137) STATUS+=("$name: TIMED OUT after ${dt}s") ;;
        *) STATUS+=("$name: FAILED rc=$rc (${dt}s, see gpu_check.log)") ;;
    esac
    say "$name: rc=$rc in ${dt}s"
    return $rc
}

# -- 1. what is here ------------------------------------------------------------------------
GPU=0
if [ $DRY_RUN = 0 ] && $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>>"$LOG"; then
    GPU=1
fi
CARD=$($PY -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" 2>/dev/null)
[ $GPU = 0 ] && CARD="cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')"
say "device: $CARD (gpu=$GPU, dry_run=$DRY_RUN)"
$PY - >> "$LOG" 2>&1 <<'EOF'
import importlib, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
for name in ("triton", "numpy", "scipy", "nibabel", "tqdm", "matplotlib", "pytest", "pytest_benchmark", "psutil", "ninja"):
    try:
        module = importlib.import_module(name)
        print(f"  {name:17s} {getattr(module, '__version__', 'present')}")
    except Exception as error:
        print(f"  {name:17s} MISSING ({type(error).__name__})")
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv >> "$LOG" 2>&1
HAVE_PYTEST=0; $PY -c "import pytest" 2>/dev/null && HAVE_PYTEST=1
if ! $PY -c "import pytest_benchmark" 2>/dev/null; then
    STATUS+=("pytest-benchmark missing: benchmarks timed with benchmarks/fallback.py")
fi

# -- 2. the package imports without the optional packages -------------------------------------
run_step "import without nibabel/scipy/tqdm/matplotlib" 60 $PY - <<'EOF'
import sys
BLOCKED = ("nibabel", "scipy", "tqdm", "matplotlib")
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} blocked by gpu_check (is it imported at import time?)")
sys.meta_path.insert(0, Block())
import patchddm_fast, patchddm_fast.ops, patchddm_fast.nn  # noqa: E401
print("patchddm_fast, .ops and .nn import without", BLOCKED)
try:
    import patchddm_fast.diffusion  # noqa: F401
    print("patchddm_fast.diffusion imports without them too")
except ImportError as error:
    print("NOTE: patchddm_fast.diffusion needs an optional package at import time:", error)
EOF

# -- 3. build --------------------------------------------------------------------------------
if [ $GPU = 1 ]; then
    run_step "build (CUDA, in place)" 300 env TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" PATCHDDM_FORCE_CUDA=1 \
        MAX_JOBS="${MAX_JOBS:-16}" $PY setup.py build_ext --inplace
else
    if ls patchddm_fast/_C*.so >/dev/null 2>&1; then
        STATUS+=("build: dry run, extension already built here (on the GPU: TORCH_CUDA_ARCH_LIST=9.0 PATCHDDM_FORCE_CUDA=1 MAX_JOBS=16 $PY setup.py build_ext --inplace)")
    else
        run_step "build (CPU only)" 600 env PATCHDDM_NO_CUDA=1 MAX_JOBS=2 $PY setup.py -q build_ext --inplace
    fi
fi
run_step "extension loads" 60 $PY -c "import patchddm_fast, sys; info = patchddm_fast.info(); print(info); sys.exit(0)"

# -- 4. tests ----------------------------------------------------------------------------------
if [ $HAVE_PYTEST = 0 ]; then
    STATUS+=("tests and pytest benchmarks: not run (pytest missing)")
elif [ $GPU = 1 ]; then
    # CUDA kernels and the real (compiled, not interpreted) Triton kernels; files whose imports
    # fail (optional packages) are reported, not fatal.
    IGNORE=()
    $PY -c "import nibabel" 2>/dev/null || IGNORE+=(--ignore=tests/data)
    $PY -c "import scipy" 2>/dev/null || IGNORE+=(--ignore=tests/test_metrics.py)
    [ ${#IGNORE[@]} -gt 0 ] && STATUS+=("tests not collected for missing packages: ${IGNORE[*]}")
    run_step "GPU tests (-m gpu, TRITON_INTERPRET=0)" $(( $(left) > 150 ? 150 : $(left) )) \
        env TRITON_INTERPRET=0 $PY -m pytest tests -m gpu -q -p no:cacheprovider "${IGNORE[@]}" -rfE
else
    run_step "syntax of benchmarks and tests" 60 $PY -m py_compile benchmarks/*.py tests/*.py
    run_step "benchmark collection" 120 $PY -m pytest benchmarks --collect-only -q -p no:cacheprovider
    run_step "unit tests of the benchmark helpers" 180 $PY -m pytest tests/test_benchmark_limits.py -q -p no:cacheprovider \
        -k "bytes or fit or held or tracker or elementwise"
fi

# -- 5. benchmarks -------------------------------------------------------------------------------
BENCH_ARGS=(--benchmark-only -q -p no:cacheprovider --bench-out "$WORK")
if [ $HAVE_PYTEST = 1 ] && [ $GPU = 1 ]; then
    # most telling first; each file gets its cap or what is left, minus 40 s for the table
    for spec in test_limits.py:90 test_ops_group_norm_silu.py:60 test_ops_noise_update.py:40 test_unet.py:70 \
                test_sampler.py:45 test_end_to_end.py:90 test_train.py:60 test_ops_assemble_input.py:40 \
                test_scaling.py:150 test_data.py:40; do
        file=${spec%%:*}; cap=${spec##*:}
        [ -f "benchmarks/$file" ] || continue
        if ! $PY -c "import benchmarks.${file%.py}" >> "$LOG" 2>&1; then
            STATUS+=("$file: skipped, its imports fail here (see gpu_check.log)"); continue
        fi
        budget=$(( $(left) - 40 )); [ $budget -gt $cap ] && budget=$cap
        run_step "bench $file" $budget $PY -m pytest "benchmarks/$file" "${BENCH_ARGS[@]}" \
            --benchmark-json "$WORK/bench-${file%.py}.json"
    done
elif [ $HAVE_PYTEST = 1 ]; then
    # dry run: a few quick benchmarks, once with pytest-benchmark (if any) and once with the fallback
    run_step "bench (CPU, quick)" 240 $PY -m pytest benchmarks/test_limits.py "${BENCH_ARGS[@]}" \
        -k "peak or avg_skip" --benchmark-json "$WORK/bench-quick.json"
    run_step "bench (CPU, fallback timing)" 240 env PATCHDDM_BENCH_FALLBACK=1 $PY -m pytest -p no:benchmark \
        benchmarks/test_limits.py "${BENCH_ARGS[@]}" -k "peak or assemble" --benchmark-json "$WORK/bench-fallback.json"
    run_step "scaling report (counted only)" 120 $PY -m benchmarks.scaling --counted-only --out "$WORK"
else
    run_step "scaling study (no pytest)" $(( $(left) - 30 )) $PY -m benchmarks.scaling --out "$WORK"
fi

# -- 6. results --------------------------------------------------------------------------------
cp "$WORK"/limits-*.md "$WORK"/scaling-*.png "$WORK"/scaling-*.csv "$WORK"/scaling-*-capacity.md "$OUT_DIR"/ 2>/dev/null
TABLE=$OUT_DIR/table.md
{
    echo "# gpu_check $(date -u +%Y-%m-%dT%H:%MZ) on $CARD"
    echo
    for line in "${STATUS[@]}"; do echo "- $line"; done
    echo
    for f in "$WORK"/limits-*.md "$WORK"/scaling-*-capacity.md; do
        [ -f "$f" ] && { cat "$f"; echo; }
    done
    if ls "$WORK"/bench-*.json >/dev/null 2>&1; then
        $PY -m benchmarks.report "$WORK"/bench-*.json --card "$CARD" --merged "$OUT_DIR/bench.json"
    else
        echo "(no benchmark results)"
    fi
} > "$TABLE" 2>> "$LOG"
say "done in $(( $(date +%s) - START ))s; results in $OUT_DIR"
rm -rf "$WORK"
echo
cat "$TABLE"
