#!/usr/bin/env bash
# One-shot GPU check (issue 16): on an H100/H200 with nothing but this repository,
#   1. record the machine (nvidia-smi, clocks, driver, library versions),
#   2. build the CUDA extension for this device's architecture only (pip install -e, no build isolation),
#   3. run `pytest -m gpu` with a short summary and a JUnit report,
#   4. run compute-sanitizer memcheck on one small case per CUDA and Triton kernel (bench/gpu_sanitize.py),
#   5. run every benchmark family in quick mode (`efficient_ops.cli bench --quick`),
# and write everything under one folder, ending with summary.md and summary.json.
#
# Every stage runs under `timeout` with its own limit, capped by what is left of the overall budget, so one
# hang cannot eat the rest, and a failing stage never stops the later ones.
#
# Usage:  bash bench/gpu_check.sh [OUT_DIR]        (default: $OUT/gpu_check if $OUT is set, else ./gpu_check_out)
# Environment:
#   GPU_CHECK_DRY=1         dry run (no GPU needed): every stage prints its command and runs a stand-in under
#                           the same time box, so the wiring, the time boxes and the result layout are checked.
#   GPU_CHECK_DRY_HANG=S    in a dry run, stage S's stand-in hangs (proves that the time box ends it).
#   GPU_CHECK_TOTAL_S       overall budget in seconds (default 540: fits a 10-minute device call).
#   GPU_CHECK_T_<STAGE>     per-stage limit in seconds, STAGE in INFO BUILD PYTEST SANITIZE_CUDA SANITIZE_TRITON
#                           BENCH_<FAMILY> (e.g. GPU_CHECK_T_BUILD=200).
#   GPU_CHECK_SKIP="a b"    stages to skip (names as in the summary, e.g. "bench_rsparse sanitize_triton").
#   EFFICIENT_OPS_CUDA_ARCHS  overrides the detected architecture (e.g. 90a on H100/H200).
set -uo pipefail

cd "$(dirname "$0")/.."
REPO=$PWD
OUT_DIR=${1:-${OUT:+$OUT/gpu_check}}
OUT_DIR=${OUT_DIR:-$REPO/gpu_check_out}
mkdir -p "$OUT_DIR/logs"
DRY=${GPU_CHECK_DRY:-0}
TOTAL=${GPU_CHECK_TOTAL_S:-540}
START=$(date +%s)
PY=${PYTHON:-python}
STAGES_TSV="$OUT_DIR/stages.tsv"
: > "$STAGES_TSV"

log() { echo "[gpu_check $(date -u +%H:%M:%S)] $*" | tee -a "$OUT_DIR/logs/gpu_check.log"; }

# run_stage NAME LIMIT_S COMMAND...: run COMMAND with its output in logs/NAME.log, time-boxed to
# min(LIMIT_S, what is left of the budget); record status, exit code and seconds in stages.tsv.
run_stage() {
    local name=$1 limit=$2
    shift 2
    local upper var
    upper=$(echo "$name" | tr '[:lower:]' '[:upper:]')
    var="GPU_CHECK_T_$upper"
    limit=${!var:-$limit}
    if [[ " ${GPU_CHECK_SKIP:-} " == *" $name "* ]]; then
        log "$name: skipped (GPU_CHECK_SKIP)"
        printf '%s\tskipped\t-\t0\t%s\n' "$name" "$limit" >> "$STAGES_TSV"
        return 0
    fi
    local left=$(( TOTAL - ($(date +%s) - START) ))
    if (( left < 5 )); then
        log "$name: not run, the overall budget of ${TOTAL}s is spent"
        printf '%s\tno_time\t-\t0\t%s\n' "$name" "$limit" >> "$STAGES_TSV"
        return 0
    fi
    (( limit > left )) && limit=$left
    local logf="$OUT_DIR/logs/$name.log"
    log "$name: start (limit ${limit}s): $*"
    local t0=$(date +%s) rc
    if [[ "$DRY" == "1" ]]; then
        {
            echo "DRY RUN: would run: $*"
            if [[ "${GPU_CHECK_DRY_HANG:-}" == "$name" ]]; then echo "DRY RUN: hanging on purpose"; fi
        } > "$logf"
        if [[ "${GPU_CHECK_DRY_HANG:-}" == "$name" ]]; then
            timeout -k 2 "$limit" sleep 100000 >> "$logf" 2>&1
        else
            timeout -k 2 "$limit" true >> "$logf" 2>&1
        fi
        rc=$?
    else
        # -k: a command that ignores SIGTERM is killed 10 s later
        timeout -k 10 "$limit" "$@" > "$logf" 2>&1
        rc=$?
    fi
    local secs=$(( $(date +%s) - t0 )) status
    if (( rc == 124 || rc == 137 )); then status=timeout; elif (( rc == 0 )); then status=ok; else status=failed; fi
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$secs" "$limit" >> "$STAGES_TSV"
    log "$name: $status (exit $rc, ${secs}s)"
    tail -n 5 "$logf" | sed 's/^/    /' | tee -a "$OUT_DIR/logs/gpu_check.log"
    return 0
}

# The device's architecture: 9.0 -> 90a (Hopper's wgmma / TMA machine code), others as plain SASS + PTX.
detect_arch() {
    local cap
    cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' .')
    case "$cap" in
        90) echo 90a ;;
        100) echo 100a ;;
        "") echo "" ;;
        *) echo "$cap" ;;
    esac
}

machine_info() {
    echo "== date"; date -u
    echo "== nvidia-smi"; nvidia-smi || true
    echo "== nvidia-smi -q (clocks, power, performance)"; nvidia-smi -q -d CLOCK,POWER,PERFORMANCE,COMPUTE || true
    echo "== nvcc"; (nvcc --version || /usr/local/cuda/bin/nvcc --version) 2>&1 || true
    echo "== compute-sanitizer"; ("$SANITIZER" --version) 2>&1 || echo "compute-sanitizer not found"
    echo "== python packages"
    "$PY" - <<'EOF'
import importlib, platform, sys
print("python", sys.version.split()[0], platform.platform())
for name in ("torch", "triton", "numpy", "pytest", "hypothesis", "transformers", "pynvml", "setuptools",
             "pybind11", "cmake", "ninja"):
    try:
        mod = importlib.import_module(name)
        print(name, getattr(mod, "__version__", "?"))
    except Exception as exc:
        print(name, "MISSING", type(exc).__name__)
try:
    import torch
    print("torch cuda", torch.version.cuda, "available", torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print("device", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs",
              round(p.total_memory / 2 ** 30, 1), "GiB")
except Exception as exc:
    print("torch probe failed", exc)
EOF
}

SANITIZER=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
ARCH=${EFFICIENT_OPS_CUDA_ARCHS:-$(detect_arch)}
ARCH=${ARCH:-90a}
NPROC=$(nproc 2>/dev/null || echo 4)
log "output: $OUT_DIR; dry run: $DRY; budget ${TOTAL}s; arch $ARCH; $NPROC CPUs"

# efficient_ops.triton_kernels / efficient_ops.bench map onto triton_kernels/ and bench/ (setup.py's package_dir);
# links make the tree importable from the repository root as well as through the editable install.
for pkg in triton_kernels bench; do
    [[ -e efficient_ops/$pkg ]] || ln -s "../$pkg" "efficient_ops/$pkg"
done

export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
# the benchmark families as the CLI knows them (one bench/<family>.py each)
FAMILIES=$("$PY" -c "from efficient_ops.cli import FAMILIES; print(' '.join(FAMILIES))" 2>/dev/null) ||
    FAMILIES="lowbit rsparse speculative sparse_attention"
if [[ "$DRY" == "1" ]]; then  # what can be checked without a GPU: the drivers' argument parsing and case lists
    DRY=0 run_stage dry_checks 60 bash -c "'$PY' bench/gpu_sanitize.py --list && \
        '$PY' -m efficient_ops.cli bench --help && '$PY' -m pytest --version"
fi
export SANITIZER PY
export -f machine_info
run_stage info 30 bash -c machine_info
cp "$OUT_DIR/logs/info.log" "$OUT_DIR/machine.txt" 2>/dev/null

run_stage build 200 env EFFICIENT_OPS_BUILD_CUDA=1 EFFICIENT_OPS_CUDA_ARCHS="$ARCH" MAX_JOBS="$NPROC" \
    "$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e .
run_stage ext_info 30 "$PY" -m efficient_ops.cli info

run_stage pytest 130 "$PY" -m pytest -m gpu -q -rfEs -p no:cacheprovider --junitxml="$OUT_DIR/pytest_gpu.xml" tests

# Memcheck: the caching allocator hides out-of-bounds accesses inside its pooled blocks, so it is off here.
MEMCHECK=("$SANITIZER" --tool memcheck --error-exitcode 3 --print-limit 20 --launch-timeout 60)
if [[ "$DRY" != "1" && ! -x "$SANITIZER" ]]; then
    log "compute-sanitizer not found: the sanitize stages run their cases without memcheck"
    MEMCHECK=()
fi
for backend in cuda triton; do
    run_stage "sanitize_$backend" 60 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "${MEMCHECK[@]}" \
        "$PY" bench/gpu_sanitize.py --backend "$backend" --json "$OUT_DIR/sanitize_$backend.json"
done

for family in $FAMILIES; do
    run_stage "bench_$family" 40 "$PY" -m efficient_ops.cli bench --quick --family "$family" --out "$OUT_DIR/bench"
done

# ---- summary: summary.json (stages, pytest counts) and summary.md (the same as a table)
"$PY" - "$OUT_DIR" "$DRY" "$ARCH" "$TOTAL" "$(( $(date +%s) - START ))" <<'EOF'
import json, os, sys
import xml.etree.ElementTree as ET

out, dry, arch, total, elapsed = sys.argv[1], sys.argv[2] == "1", sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
stages = []
for line in open(os.path.join(out, "stages.tsv")):
    name, status, rc, secs, limit = line.rstrip("\n").split("\t")
    stages.append(dict(name=name, status=status, exit_code=None if rc == "-" else int(rc), seconds=int(secs),
                       limit_s=int(limit), log=f"logs/{name}.log"))
summary = dict(dry_run=dry, arch=arch, budget_s=total, elapsed_s=elapsed, stages=stages)
junit = os.path.join(out, "pytest_gpu.xml")
if os.path.isfile(junit):
    root = ET.parse(junit).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["failed_tests"] = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                              if c.find("failure") is not None or c.find("error") is not None]
    summary["pytest"] = counts
for backend in ("cuda", "triton"):
    path = os.path.join(out, f"sanitize_{backend}.json")
    if os.path.isfile(path):
        summary[f"sanitize_{backend}"] = json.load(open(path))
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=2)
lines = [f"# GPU check{' (DRY RUN)' if dry else ''}", "",
         f"arch {arch}, {elapsed} s of a {total} s budget; logs in `logs/`, benchmark results in `bench/`.", "",
         "| stage | status | exit | seconds | limit |", "|---|---|---|---|---|"]
lines += [f"| {s['name']} | {s['status']} | {s['exit_code']} | {s['seconds']} | {s['limit_s']} |" for s in stages]
if "pytest" in summary:
    p = summary["pytest"]
    lines += ["", f"pytest -m gpu: {p['tests']} tests, {p['failures']} failures, {p['errors']} errors, "
                  f"{p['skipped']} skipped"] + [f"- {t}" for t in p["failed_tests"][:50]]
for backend in ("cuda", "triton"):
    if f"sanitize_{backend}" in summary:
        cases = summary[f"sanitize_{backend}"]
        lines += ["", f"memcheck {backend}: " + ", ".join(f"{c['kernel']} {c['status']}" for c in cases)]
open(os.path.join(out, "summary.md"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
log "done in $(( $(date +%s) - START ))s: $OUT_DIR/summary.md"
