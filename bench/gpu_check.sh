#!/usr/bin/env bash
# flashsae GPU check: what a machine with a CUDA GPU can tell that the CPU tests cannot, in < 8 minutes.
#
#   bash bench/gpu_check.sh                  # from the repository root; results under bench/results/gpu-check/
#   OUT=/tmp/gc BUDGET_S=300 bash bench/gpu_check.sh
#
# Parts, most valuable first, each under its own timeout and all under one budget (BUDGET_S, default
# 450 s; a part that would start with under 30 s left is skipped and says so):
#   env        nvidia-smi (read only), versions, which comparison libraries import
#   install    pip install -e ".[test]", only when flashsae does not import
#   tests      tests/kernels/test_triton.py with the kernels compiled for this GPU (TRITON_INTERPRET=0:
#              the test module falls back to the interpreter when the variable is unset)
#   probe      python -m bench.gpu_probe at bench.compare's gpu preset: ms/step with AuxK off, with 5
#              dead latents and with half of them dead, host syncs inside a step (sync debug mode
#              and a count of Python-level reads), the host batches' feed rate
#   compare    python -m bench.compare --device cuda --preset gpu against the libraries installed here
#   sanitizer  compute-sanitizer memcheck over the Triton kernel tests, when compute-sanitizer exists
# Everything lands in $OUT: summary.md (the one file to read: every part's status and results),
# gpu_check.json (the same, with the probe's and the comparison's JSON inside), and each part's log.
# Never changes the GPU's settings; installs nothing when flashsae already imports.
set -u -o pipefail

REPO="$(pwd)"
if [ ! -f "$REPO/src/flashsae/kernels/triton_ops.py" ] || [ ! -f "$REPO/bench/gpu_probe.py" ]; then
    echo "gpu_check: run me from the flashsae repository root" >&2
    exit 2
fi
OUT="${OUT:-$REPO/bench/results/gpu-check}"
PY="${PYTHON:-python}"
BUDGET_S="${BUDGET_S:-450}"
COMPARE_ROWS="${COMPARE_ROWS:-1048576}"   # 64 steps of 16384 rows (the preset's own is 2^21)
mkdir -p "$OUT"
T0=$(date +%s)
STATUS="$OUT/status.tsv"
: > "$STATUS"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg TQDM_DISABLE=1
# Compiled kernels throughout: tests/kernels/test_triton.py turns the interpreter on when this is unset.
export TRITON_INTERPRET=0
unset FLASHSAE_KERNELS                    # the default dispatch is what is under test

left() { echo $(( BUDGET_S - ($(date +%s) - T0) )); }

# part NAME CAP_S LOG CMD...: run CMD under timeout min(CAP_S, budget left - 10), log to LOG, record status
part() {
    local name=$1 cap=$2 log=$3
    shift 3
    local avail=$(( $(left) - 10 ))
    if (( avail < 30 )); then
        printf '%s\tskipped\t0\tbudget (%ss left)\n' "$name" "$avail" >> "$STATUS"
        echo "gpu_check: $name skipped, budget"
        return 0
    fi
    local t=$(( cap < avail ? cap : avail ))
    local start=$(date +%s)
    echo "gpu_check: $name (timeout ${t}s)"
    echo "### $* (timeout ${t}s, $(date -u '+%H:%M:%S UTC'))" >> "$log"
    PROBE_DEADLINE=$(( $(date +%s) + t - 15 )) timeout -k 10 "$t" "$@" >> "$log" 2>&1
    local rc=$?
    local what="rc=$rc"
    (( rc == 124 || rc == 137 )) && what="timed out"
    printf '%s\t%s\t%s\t%s\n' "$name" "$what" "$(( $(date +%s) - start ))" "$(basename "$log")" >> "$STATUS"
    return 0
}

# ---- env (read only) --------------------------------------------------------------------------
{
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC'); commit: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')"
    timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,temperature.gpu \
        --format=csv 2>&1 || echo "nvidia-smi failed"
    timeout 60 "$PY" -c "
import importlib, sys, torch
print('python', sys.version.split()[0], '| torch', torch.__version__, 'cuda', torch.version.cuda,
      '| devices', torch.cuda.device_count() if torch.cuda.is_available() else 0)
try:
    import triton; print('triton', triton.__version__)
except Exception as e:
    print('triton not importable:', type(e).__name__)
for mod in ('sae_lens', 'sparsify', 'dictionary_learning', 'sklearn'):
    try:
        importlib.import_module(mod); print('have', mod)
    except Exception as e:
        print('lack', mod, '(' + type(e).__name__ + ')')
" 2>&1
    command -v compute-sanitizer >/dev/null 2>&1 && echo "compute-sanitizer: $(command -v compute-sanitizer)"
} > "$OUT/env.txt" 2>&1
if ! timeout 60 "$PY" -c "import torch, triton, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA device, or no torch/triton in $PY; see $OUT/env.txt" | tee -a "$OUT/env.txt"
    printf 'env\tno CUDA device or triton\t0\tenv.txt\n' >> "$STATUS"
    SKIP_GPU=1
else
    SKIP_GPU=0
fi

# ---- install, only if needed --------------------------------------------------------------------
if ! timeout 60 "$PY" -c "import flashsae" 2>/dev/null; then
    part install 150 "$OUT/install.log" "$PY" -m pip install -q -e ".[test]"
else
    printf 'install\tnot needed (flashsae imports)\t0\t-\n' >> "$STATUS"
fi

LIBS="flashsae"
for pair in saelens:sae_lens sparsify:sparsify dictionary_learning:dictionary_learning; do
    timeout 60 "$PY" -c "import ${pair#*:}" 2>/dev/null && LIBS="$LIBS,${pair%%:*}"
done

if (( SKIP_GPU == 0 )); then
    # ---- Triton kernel tests, compiled ----------------------------------------------------------
    part tests 170 "$OUT/tests.log" \
        "$PY" -m pytest tests/kernels/test_triton.py -p no:cacheprovider -rfEs --durations=5

    # ---- step probe at the gpu preset -----------------------------------------------------------
    part probe 130 "$OUT/probe.log" "$PY" -m bench.gpu_probe --device cuda --json "$OUT/probe.json" \
        --markdown "$OUT/probe.md"

    # ---- bench.compare, gpu preset, installed libraries ------------------------------------------
    # Each library runs in its own subprocess under --timeout: their sum fits the part's cap.
    avail=$(( $(left) - 10 ))
    cap=$(( avail < 170 ? avail : 170 ))
    n_libs=$(( $(tr -cd , <<< "$LIBS" | wc -c) + 1 ))
    part compare 170 "$OUT/compare.log" "$PY" -m bench.compare --device cuda --preset gpu --libraries "$LIBS" \
        --rows "$COMPARE_ROWS" --no-append --json "$OUT/compare.json" --timeout $(( (cap - 20) / n_libs > 20 ? (cap - 20) / n_libs : 20 ))

    # ---- compute-sanitizer memcheck over the kernel tests ----------------------------------------
    SAN="$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)"
    if [ -n "$SAN" ]; then
        # No caching allocator: an out-of-bounds access inside a cached block would go unseen.
        part sanitizer 100 "$OUT/sanitizer.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
            "$SAN" --tool memcheck --error-exitcode 9 --print-limit 20 \
            "$PY" -m pytest tests/kernels/test_triton.py -x -p no:cacheprovider -k "reference or zero_value or decode"
    else
        printf 'sanitizer\tskipped\t0\tno compute-sanitizer\n' >> "$STATUS"
    fi
fi

# ---- one summary: markdown and JSON ---------------------------------------------------------------
OUT="$OUT" LIBS="$LIBS" TOTAL_S=$(( $(date +%s) - T0 )) BUDGET_S="$BUDGET_S" timeout 60 "$PY" - <<'PYEOF'
import json, os, re
from pathlib import Path

out = Path(os.environ["OUT"])
def read(name):
    p = out / name
    return p.read_text(errors="replace") if p.exists() else ""

status = [line.split("\t") for line in read("status.tsv").splitlines() if line.strip()]
tests_log = read("tests.log")
tests_line = next((l for l in reversed(tests_log.splitlines()) if re.search(r"\d+ (passed|failed|error)", l)), "")
san_log = read("sanitizer.log")
san_line = next((l for l in reversed(san_log.splitlines()) if "ERROR SUMMARY" in l), "")
compare = json.loads(read("compare.json")) if read("compare.json") else None
probe = json.loads(read("probe.json")) if read("probe.json") else None
md = [f"# flashsae GPU check, {os.environ['TOTAL_S']} s of a {os.environ['BUDGET_S']} s budget", "",
      "```", read("env.txt").strip(), "```", "", "| part | status | seconds | log |", "|---|---|---:|---|"]
md += [f"| {' | '.join((row + ['', '', '', ''])[:4])} |" for row in status]
md += ["", f"kernel tests (compiled): {tests_line or 'no result'}"]
md += [l for l in tests_log.splitlines() if l.startswith(("FAILED", "ERROR"))][:20]
if san_line or san_log:
    md += [f"compute-sanitizer: {san_line or 'no ERROR SUMMARY line (see sanitizer.log)'}"]
md += ["", "## Step probe", "", read("probe.md").strip() or "no result (see probe.log)"]
md += ["", "## bench.compare --preset gpu (libraries: " + os.environ["LIBS"] + ")", ""]
table = [l for l in read("compare.log").splitlines() if l.startswith("|")]
md += table or ["no table (see compare.log)"]
(out / "summary.md").write_text("\n".join(md) + "\n")
summary = {"status": [dict(zip(("part", "status", "seconds", "log"), row)) for row in status],
           "kernel_tests": tests_line, "sanitizer": san_line, "probe": probe, "compare": compare,
           "env": read("env.txt")}
(out / "gpu_check.json").write_text(json.dumps(summary, indent=1, default=str))
print("\n".join(md))
PYEOF
