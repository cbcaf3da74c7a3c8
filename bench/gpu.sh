#!/usr/bin/env bash
# bench/gpu.sh: the one prepared run for a lent GPU machine, built so that its FIRST run brings back
# everything. That machine comes for 15 minutes of device time in all (its start-up included), its copy of
# the project has no .git, it reaches no network, and only 8 files come back from $OUT (at most 2 folders
# deep). So: full logs go to a scratch folder, and after EVERY phase the output folder OUT gets
#     logs.tar.gz   every phase's full log (+ pytest's JUnit XML, the kernel dispatcher's dispatch.json)
#     summary.txt   the phase table (seconds against the estimates below) and the compact results table
#     phases.tsv    phase, rc, seconds, estimate_s, limit_s, note
#     results.json  every benchmark row (rewritten by the bench processes after EVERY row)
#     results.md    the same as Markdown
#     commit.txt    the commit that ran (git here; on a copy: $DEEPSIM_COMMIT or the bench/COMMIT stamp)
# six files, so what was measured comes back even when the script is killed part-way.
#
#   bash bench/gpu.sh OUT              # on the GPU machine (from anywhere: it cds to the repository root)
#   bash bench/gpu.sh --dry-run OUT    # on a CPU machine: the same phases with CPU stand-ins at tiny sizes
#   bash bench/gpu.sh --stamp          # on the machine with git, before the device call: bench/COMMIT
#
# The plan fits 7 minutes of script (GPU_SH_BUDGET_S, default 420 s). The estimates are predictions for an
# H100 machine on its first run (cold caches), not measurements yet: phases.tsv records each phase's
# seconds beside its estimate, and the next plan should be sized from those.
#   phase          estimate  limit  what
#   env                 5 s   20 s  nvidia-smi, Python and library versions, the commit -> OUT/commit.txt
#   install            20 s   60 s  DALI from carried .dali1.. pieces (if any); pip install -e . (or a path shim)
#   tests-contact      30 s   60 s  the first contact with the card: a run resumed from a CPU-mapped checkpoint
#                                   (optimizer state back on the GPU), the nvjpeg loader under long work queued
#                                   on the training stream (40 batches vs the CPU decode), EXIF-rotated JPEGs
#                                   (nvjpeg; DALI GPU and CPU mode where DALI is carried), --timeout 60
#   tests-kernels      80 s  110 s  pytest tests/kernels on CUDA without test_gpu_compile.py (a CPU-side
#                                   check, ~25 s, that runs in CI), --timeout 60 per test, DEEPSIM_AUTOTUNE=0
#   tests-step         50 s   80 s  pytest -m cuda tests/test_fused_step.py: fused vs reference kernels over
#                                   2 training steps (autoencoder, fc6 inversion), --timeout 120
#   bench-kernels      45 s   60 s  python -m bench --groups kernels (measures the peaks for the whole run)
#   bench-step        150 s  170 s  python -m bench --groups step: autoencoder then fc6 inversion (eager,
#                                   eager-fused, compiled-step, compiled-step-fused, compiled-step-cudagraphs
#                                   + the cudagraphs OR_ERROR check); max-autotune only with time left
#   bench-loader       40 s   60 s  python -m bench --groups loader: PIL DataLoader vs decode_jpeg on the GPU
#                                   vs deepsim's torch loader vs DALI (if carried) vs resident; DALI full
#                                   vs ROI decode on 500x375 JPEGs (64 crop; resize 256 + 227 crop)
#   bench-lpips        25 s   40 s  python -m bench --groups lpips: deepsim LPIPS vs the lpips package (alex,
#                                   batch 64, 64x64 and 256x256, bf16; lpips from a carried .lpips-site/)
#   finish              3 s   10 s  results.json/.md re-read, summary.txt, the compact table printed last
#   total             418 s
# A phase's limit is cut to what the budget has left after reserving min(estimate, 20 s) for each later
# phase; a phase with under 10 s left is skipped. Every phase runs under `timeout --kill-after=5` (a hard
# kill). The bench phases also pass --group-timeout (limit - 20 s: Python, CUDA and the peaks start first):
# the group stops itself (a BaseException, which torch.compile cannot swallow) and keeps the rows it
# measured, marked partial.
# bench-step runs with DEEPSIM_AUTOTUNE=${GPU_SH_STEP_AUTOTUNE:-0} (one conv config: autotuning every
# layer's kernels would take minutes; the kernels group times them tuned).
#
# The device-tool calls, in order (DALI is optional: the loader's GPU-decode baseline needs nothing carried):
#   here:    bash bench/gpu.sh --stamp            (writes bench/COMMIT, git-ignored, hence carried below)
#   here:    bash ../shared/tools/dali-for-device.sh   (optional; writes .dali1 .. .daliN, 55 MiB each)
#   device:  run  command "true"  carry [".dali1"]   ... one call per piece but the last, back to back
#            (a machine left idle for 30 s is given back, and the pieces with it)
#   device:  run  command "bash bench/gpu.sh $OUT"  carry ["bench/COMMIT", ".daliN", ".lpips-site"]  timeout_s 540
#   device:  give_back (unless rerunning at once); then here:
#            python -m bench --from-json <files_at> --append-results   (the run's table into RESULTS.md)
set -uo pipefail

DRY_RUN=0
case "${1:-}" in
    --dry-run) DRY_RUN=1; shift ;;
    --stamp)
        cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
        exec "${PYTHON:-python3}" -m bench --stamp-commit ;;
esac
if [ $# -lt 1 ]; then
    echo "usage: bash bench/gpu.sh [--dry-run] OUT | bash bench/gpu.sh --stamp" >&2
    exit 2
fi
mkdir -p "$1" || exit 2
OUT=$(cd "$1" && pwd)
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
ROOT=$(pwd)
LOG=$(mktemp -d "${TMPDIR:-/tmp}/deepsim-gpu-logs.XXXXXX")
BUDGET=${GPU_SH_BUDGET_S:-420}
START=$(date +%s)
PY=${PYTHON:-python3}
PHASES="$OUT/phases.tsv"
export PYTHONUNBUFFERED=1 PY ROOT LOG OUT DRY_RUN
# Triton compiles for the GPU; on a CPU (dry run) the bench groups time the references, as python -m bench
# does there (tests/conftest.py turns the interpreter on for the pytest phases by itself).
unset TRITON_INTERPRET
if [ "$DRY_RUN" = 1 ]; then
    export DEEPSIM_BENCH_DRY_RUN=1
    BENCH_MODE="--dry-run"
else
    BENCH_MODE="--device cuda"
fi
export BENCH_MODE
# A fresh run: no results of an earlier run in OUT to merge into (the device tool empties $OUT anyway).
for f in commit.txt logs.tar.gz phases.tsv results.json results.md summary.txt; do rm -f "$OUT/$f" "$OUT/$f.tmp"; done
printf 'phase\trc\tseconds\testimate_s\tlimit_s\tnote\n' > "$PHASES"

# The plan: name and estimate (seconds), in order; a phase's reserve for the phases after it comes from here.
PLAN_NAMES=(env install tests-contact tests-kernels tests-step bench-kernels bench-step bench-loader bench-lpips finish)
PLAN_ESTIMATES=(5 20 30 70 50 45 140 35 20 3)

left() { echo $((BUDGET - ($(date +%s) - START))); }

reserve_after() {  # seconds kept for the phases after $1: min(estimate, 20) each
    local name=$1 seen=0 sum=0 i e
    for i in "${!PLAN_NAMES[@]}"; do
        if [ "$seen" = 1 ]; then
            e=${PLAN_ESTIMATES[$i]}
            sum=$((sum + (e < 20 ? e : 20)))
        fi
        [ "${PLAN_NAMES[$i]}" = "$name" ] && seen=1
    done
    echo "$sum"
}

estimate_of() {
    local i
    for i in "${!PLAN_NAMES[@]}"; do [ "${PLAN_NAMES[$i]}" = "$1" ] && echo "${PLAN_ESTIMATES[$i]}" && return; done
    echo 0
}

# collect: the output folder as it should come back, after every phase (each file replaced whole).
collect() {
    "$PY" - "$OUT" <<'EOF' > /dev/null 2>> "$LOG/collect.log"
import sys
from pathlib import Path
from bench.outputs import write_outputs
from bench.results import load_run
out = Path(sys.argv[1])
if (out / "results.json").exists():  # a group left "running" by a killed process becomes partial here
    write_outputs(load_run(out), out)
EOF
    {
        echo "bench/gpu.sh$([ "$DRY_RUN" = 1 ] && echo ' --dry-run (CPU stand-ins: no figure here says anything about speed)')"
        echo "commit: $(cat "$OUT/commit.txt" 2>/dev/null || echo unknown)"
        echo "$(( $(date +%s) - START )) s of the ${BUDGET} s budget used; ${CURRENT:-no phase running}"
        echo
        column -t -s $'\t' "$PHASES" 2>/dev/null || cat "$PHASES"
        echo
        if [ -f "$OUT/results.json" ]; then
            timeout 30 "$PY" -m bench --from-json "$OUT" --compact 2>&1
        else
            echo "no results.json yet"
        fi
    } > "$OUT/summary.txt.tmp" 2>&1 && mv "$OUT/summary.txt.tmp" "$OUT/summary.txt"
    tar -czf "$OUT/logs.tar.gz.tmp" -C "$LOG" . 2>/dev/null && mv "$OUT/logs.tar.gz.tmp" "$OUT/logs.tar.gz"
}

# phase NAME LIMIT_S CMD...: run CMD under `timeout` (LIMIT_S, or what the budget leaves after the reserve
# for later phases if less), output to LOG/NAME.log; record rc, seconds, estimate and limit; collect.
phase() {
    local name=$1 limit=$2
    shift 2
    local est rest t0 rc note=""
    est=$(estimate_of "$name")
    rest=$(( $(left) - $(reserve_after "$name") ))
    if [ "$rest" -lt 10 ]; then
        printf '%s\t-\t0\t%s\t0\tskipped: budget spent\n' "$name" "$est" >> "$PHASES"
        echo "== $name: skipped (budget spent)"
        collect
        return 0
    fi
    [ "$rest" -lt "$limit" ] && limit=$rest
    PHASE_LIMIT=$limit
    CURRENT="phase $name running since $(( $(date +%s) - START )) s (limit ${limit} s)"
    collect
    echo "== $name (estimate ${est} s, limit ${limit} s) -> $LOG/$name.log"
    t0=$(date +%s)
    # bash -c so that the exported shell functions below run under `timeout` too
    timeout --kill-after=5 "$limit" bash -c '"$@"' _ "$@" > "$LOG/$name.log" 2>&1
    rc=$?
    case $rc in
        124 | 137) note="killed at its ${limit} s limit" ;;
        5) note="no tests selected" ;;
    esac
    local took=$(( $(date +%s) - t0 ))
    [ -z "$note" ] && [ "$took" -gt "$est" ] && note="$((took - est)) s over the estimate"
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$took" "$est" "$limit" "$note" >> "$PHASES"
    tail -n 3 "$LOG/$name.log"
    CURRENT=""
    collect
    return 0
}

env_report() {
    if command -v nvidia-smi > /dev/null; then nvidia-smi; else echo "no nvidia-smi on this machine"; fi
    "$PY" --version
    "$PY" -c "import torch, triton, numpy; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'available', torch.cuda.is_available()); print('card', torch.cuda.get_device_name() if torch.cuda.is_available() \
else None); print('triton', triton.__version__, 'numpy', numpy.__version__)"
    "$PY" -m pip list 2>/dev/null | grep -i -E "^(torch|triton|numpy|nvidia-dali|pytest|setuptools)" || true
    "$PY" -c "from bench.machine import commit_label, git_state; print(commit_label(git_state()))" \
        > "$OUT/commit.txt"
    echo "commit: $(cat "$OUT/commit.txt")"
}

install_dali() {
    local parts=() n=1
    while [ -d ".dali$n" ]; do  # .dali1, .dali2, ... in numeric order (a glob would put .dali10 before .dali2)
        for p in ".dali$n"/part.*; do [ -e "$p" ] && parts+=("$p"); done
        n=$((n + 1))
    done
    if [ ${#parts[@]} -eq 0 ]; then
        echo "no .dali*/part.* here: no DALI (the loader group reports its DALI row as skipped)"
        return 0
    fi
    echo "unpacking ${#parts[@]} DALI pieces into /tmp/site: ${parts[*]}"
    mkdir -p /tmp/site && cat "${parts[@]}" | xz -dc | tar -x -C /tmp/site || return 1
    PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c "import nvidia.dali as d; print('DALI', d.__version__)"
}

install_deepsim() {
    install_dali || echo "DALI pieces did not unpack: going on without DALI"
    rm -rf /tmp/deepsim-path  # a fallback left by an earlier run may point at another checkout
    if [ "$DRY_RUN" = 1 ]; then  # no pip install in a dry run: this checkout as installed, else the fallback
        local where
        where=$(cd /tmp && "$PY" -c "import deepsim.kernels as K; print(K.__file__)" 2> /dev/null)
        if [ -n "$where" ] && [ "${where#"$ROOT"/}" != "$where" ]; then
            echo "dry run: no pip install; deepsim.kernels from $where (this checkout, installed)"
            return 0
        fi
        echo "dry run: no pip install; deepsim ${where:+is installed from elsewhere ($where)}${where:-is not installed}" \
            "for $PY: the sitecustomize fallback below maps it to this checkout"
    elif "$PY" -m pip install --no-deps --no-build-isolation -e . && (cd /tmp && "$PY" -c "import deepsim.kernels"); then
        echo "installed: pip install --no-deps --no-build-isolation -e ."
        return 0
    else
        echo "pip install -e . failed"
    fi
    echo "mapping deepsim -> $ROOT/deepsim and deepsim.kernels -> $ROOT/kernels with a sitecustomize.py on PYTHONPATH"
    mkdir -p /tmp/deepsim-path
    cat > /tmp/deepsim-path/sitecustomize.py <<EOF
# Written by bench/gpu.sh: what pyproject's package-dir does for an install, for a plain checkout.
import importlib.abc, importlib.util, sys
sys.path.insert(0, "$ROOT")
class _DeepsimKernels(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "deepsim.kernels":
            return None
        return importlib.util.spec_from_file_location(
            name, "$ROOT/kernels/__init__.py", submodule_search_locations=["$ROOT/kernels"])
sys.meta_path.insert(0, _DeepsimKernels())
EOF
    (cd /tmp && PYTHONPATH="/tmp/deepsim-path${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c \
        "import deepsim.kernels as K; print('deepsim.kernels from', K.__file__)") || return 1
}

# pytest_phase JUNIT_NAME PER_TEST_TIMEOUT ARGS...: pytest with a per-test timeout where pytest-timeout is
# installed (the GPU image has it; it is in the test extras), JUnit XML into the logs.
pytest_phase() {
    local junit=$1 per_test=$2
    shift 2
    local timeout_args=()
    if "$PY" -c "import pytest_timeout" 2> /dev/null; then
        timeout_args=(--timeout "$per_test")
    else
        echo "pytest-timeout is not installed: no per-test timeout (the phase limit still holds)"
    fi
    "$PY" -m pytest -q -rfE -p no:cacheprovider "${timeout_args[@]}" --junitxml "$LOG/$junit.xml" "$@"
}

bench_group() {  # bench_group GROUP: python -m bench for one group, into OUT (merged), its limit - 20 s
    local group_limit=$((PHASE_LIMIT - 20))
    [ "$group_limit" -lt 5 ] && group_limit=5
    # The kernel dispatcher's decisions (kernels/dispatch.py) go to a file in the logs: shared by the bench
    # phases (the step group reuses the kernels group's timings, as a user's runs would) and brought back.
    export DEEPSIM_DISPATCH_CACHE="${DEEPSIM_DISPATCH_CACHE:-$LOG/dispatch.json}"
    # shellcheck disable=SC2086 # BENCH_MODE is two words on purpose (an array does not export)
    "$PY" -m bench --groups "$1" --out "$OUT" --merge --group-timeout "$group_limit" --compact $BENCH_MODE
}

export -f env_report install_dali install_deepsim pytest_phase bench_group
export PHASE_LIMIT

phase env 20 env_report
phase install 60 install_deepsim
if [ -d /tmp/site/nvidia/dali ]; then
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ -f /tmp/deepsim-path/sitecustomize.py ]; then
    export PYTHONPATH="/tmp/deepsim-path${PYTHONPATH:+:$PYTHONPATH}"
fi
# The same selection on both: on a CPU the CUDA tests skip and DALI's CPU-mode EXIF test runs.
phase tests-contact 60 pytest_phase tests-contact 60 tests/test_resume.py tests/test_data_nvjpeg.py \
    tests/test_data_dali.py -k "on_cuda or survive or exif"
if [ "$DRY_RUN" = 1 ]; then  # stand-ins: the interpreter would take minutes over tests/kernels
    phase tests-kernels 110 pytest_phase tests-kernels 60 tests/kernels/test_backend.py
    phase tests-step 80 pytest_phase tests-step 120 tests/test_fused_step.py -k "identical or cuda"
else
    phase tests-kernels 110 env DEEPSIM_AUTOTUNE=0 bash -c 'pytest_phase tests-kernels 60 tests/kernels \
        --ignore=tests/kernels/test_gpu_compile.py'
    phase tests-step 80 env DEEPSIM_AUTOTUNE=0 bash -c 'pytest_phase tests-step 120 -m cuda tests/test_fused_step.py'
fi
phase bench-kernels 60 bash -c 'bench_group kernels'
phase bench-step 170 env DEEPSIM_AUTOTUNE="${GPU_SH_STEP_AUTOTUNE:-0}" bash -c 'bench_group step'
phase bench-loader 60 bash -c 'bench_group loader'
# The lpips package (pure Python + its lin weights; the machine has no network): carried as .lpips-site/lpips
# (here: mkdir -p .lpips-site && cp -r "$(python -c 'import lpips, os; print(os.path.dirname(lpips.__file__))')" .lpips-site/).
if [ -d "$ROOT/.lpips-site/lpips" ]; then
    export PYTHONPATH="$ROOT/.lpips-site${PYTHONPATH:+:$PYTHONPATH}"
fi
phase bench-lpips 40 bash -c 'bench_group lpips'

CURRENT="finished"
if [ ! -s "$OUT/commit.txt" ]; then  # the env phase did not get to write it
    "$PY" -c "from bench.machine import commit_label, git_state; print(commit_label(git_state()))" \
        > "$OUT/commit.txt" 2> /dev/null || echo "unknown (bench.machine failed; DEEPSIM_COMMIT=${DEEPSIM_COMMIT:-unset})" > "$OUT/commit.txt"
fi
failed=$(awk -F'\t' 'NR > 1 && $2 != "-" && $2 != 0 && $2 != 5 {print $1}' "$PHASES" | tr '\n' ' ')
printf '%s\t%s\t%s\t%s\t%s\t%s\n' finish 0 0 "$(estimate_of finish)" 10 "failed phases: ${failed:-none}" >> "$PHASES"
collect
echo
cat "$OUT/summary.txt"
rm -rf "$LOG"
[ -z "$failed" ]
