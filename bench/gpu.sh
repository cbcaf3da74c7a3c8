#!/usr/bin/env bash
# One prepared run for a (short, rented) GPU machine: the CUDA tests and every GPU benchmark in under
# 8 minutes, full logs under LOGDIR, a compact table printed last.
#
#   bash bench/gpu.sh LOGDIR            # run from anywhere; it cds to the repository root
#
# What it does, each phase bounded by `timeout` and by an overall budget (GPU_SH_BUDGET_S, default 420 s):
#   env      nvidia-smi, python, torch/triton versions                      -> LOGDIR/env.log
#   dali     if .dali1/part.* .. .daliN/part.* exist: join them, pip install the wheels --no-index
#            --no-deps --target /tmp/site and export PYTHONPATH=/tmp/site    -> LOGDIR/dali.log
#            (otherwise DALI is absent and bench's loader group reports its DALI variant as skipped)
#   install  pip install --no-deps --no-build-isolation -e . (kernels/ is mapped to deepsim.kernels by
#            pyproject's package-dir); where that fails (e.g. no setuptools), a sitecustomize.py on
#            PYTHONPATH maps deepsim.kernels to ./kernels instead              -> LOGDIR/install.log
#   kernels  python3 -m pytest -q tests/kernels, on CUDA (TRITON_INTERPRET unset, DEEPSIM_AUTOTUNE=0)
#                                                                              -> LOGDIR/tests-kernels.log
#   cuda     python3 -m pytest -q -m cuda tests --ignore=tests/kernels         -> LOGDIR/tests-cuda.log
#   bench    python3 -m bench --out LOGDIR --groups step,loader,kernels (full mode; results.json/.md
#            rewritten after each group; each group at most 120 s, keeping the rows measured before)
#   micro    pytest bench --benchmark-only, if pytest-benchmark is installed and time is left
#   table    python3 -m bench --from-json LOGDIR --compact, and the phase table (also LOGDIR/summary.txt)
#
# Bringing DALI along (the GPU machine has no DALI and no internet): on a machine with internet, in the
# project root, run /work/shared/tools/dali-for-device.sh; it writes git-ignored .dali1 .. .daliN folders of
# at most 55 MiB each. Carry them to the GPU machine's copy of the project one per transfer (e.g. the device
# tool's `carry: [".dali1"]`, then `[".dali2"]`, ...; pieces already there are kept between calls), then run
# this script: it finds .dali*/part.*, joins them in order and installs the wheels (built for Python 3.12).
#
# The commit: where the copy has no .git, set DEEPSIM_COMMIT=<short hash> before running so the tables say it.
set -uo pipefail

if [ $# -lt 1 ]; then
    echo "usage: bash bench/gpu.sh LOGDIR" >&2
    exit 2
fi
mkdir -p "$1"
LOG=$(cd "$1" && pwd)
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
ROOT=$(pwd)
BUDGET=${GPU_SH_BUDGET_S:-420}
START=$(date +%s)
SUMMARY="$LOG/phases.tsv"
printf 'phase\trc\tseconds\tnote\n' > "$SUMMARY"
PY=${PYTHON:-python3}
unset TRITON_INTERPRET  # Triton compiles for the GPU here; the interpreter is for CPU-only machines
export PYTHONUNBUFFERED=1

left() { echo $((BUDGET - ($(date +%s) - START))); }

# phase NAME LIMIT_S CMD...: run CMD under `timeout` (LIMIT_S, or what is left of the budget if less),
# output to LOG/NAME.log, and record rc + seconds. rc 124/137: timed out.
phase() {
    local name=$1 limit=$2
    shift 2
    local rest
    rest=$(left)
    if [ "$rest" -lt 10 ]; then
        printf '%s\t-\t0\tskipped: budget spent\n' "$name" >> "$SUMMARY"
        echo "== $name: skipped (budget spent)"
        return 0
    fi
    [ "$rest" -lt "$limit" ] && limit=$rest
    echo "== $name (limit ${limit}s) -> $LOG/$name.log"
    local t0=$(date +%s) rc note=""
    # bash -c so that the exported shell functions below run under `timeout` too
    timeout --kill-after=10 "$limit" bash -c '"$@"' _ "$@" > "$LOG/$name.log" 2>&1
    rc=$?
    case $rc in
        124 | 137) note="timed out after ${limit}s" ;;
        5) note="no tests selected" ;;
    esac
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$note" >> "$SUMMARY"
    tail -n 3 "$LOG/$name.log"
    return 0
}

env_report() {
    nvidia-smi || true
    "$PY" --version
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'available', torch.cuda.is_available()); print('card', torch.cuda.get_device_name() if torch.cuda.is_available() \
else None); print('triton', triton.__version__)"
    "$PY" -m pip list 2>/dev/null | grep -i -E "torch|triton|dali|pytest|setuptools" || true
}

install_dali() {
    local parts=() n=1
    while [ -d ".dali$n" ]; do  # .dali1, .dali2, ... in numeric order (a glob would put .dali10 before .dali2)
        for p in ".dali$n"/part.*; do [ -e "$p" ] && parts+=("$p"); done
        n=$((n + 1))
    done
    if [ ${#parts[@]} -eq 0 ]; then
        echo "no .dali*/part.* here: running without DALI (the loader benchmark's dali variant is skipped)"
        return 0
    fi
    echo "joining ${#parts[@]} pieces: ${parts[*]}"
    rm -rf /tmp/dali-wheels && mkdir -p /tmp/dali-wheels
    cat "${parts[@]}" | tar -x -C /tmp/dali-wheels || return 1
    ls -l /tmp/dali-wheels
    "$PY" -m pip install -q --no-index --no-deps --target /tmp/site /tmp/dali-wheels/*.whl || return 1
    PYTHONPATH=/tmp/site "$PY" -c "import nvidia.dali as d; print('DALI', d.__version__)"
}

install_deepsim() {
    rm -rf /tmp/deepsim-path  # a fallback left by an earlier run may point at another checkout
    if "$PY" -m pip install --no-deps --no-build-isolation -e . && (cd /tmp && "$PY" -c "import deepsim.kernels"); then
        echo "installed: pip install --no-deps --no-build-isolation -e ."
        return 0
    fi
    echo "pip install -e . failed; mapping deepsim.kernels -> $ROOT/kernels with a sitecustomize.py on PYTHONPATH"
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
    echo "export PYTHONPATH=/tmp/deepsim-path" > /tmp/deepsim-path/env
}

export PY ROOT LOG
export -f env_report install_dali install_deepsim
phase env 30 env_report
phase dali 90 install_dali
if [ -d /tmp/site/nvidia/dali ]; then
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    DALI_NOTE="DALI from .dali* pieces"
else
    DALI_NOTE="no DALI: the loader group's dali variant is skipped (see $LOG/bench.log)"
fi
phase install 90 install_deepsim
if [ -f /tmp/deepsim-path/env ]; then
    export PYTHONPATH="/tmp/deepsim-path${PYTHONPATH:+:$PYTHONPATH}"
fi
# DEEPSIM_AUTOTUNE=0: one conv config in the tests (each autotune config is a Triton compile per test shape:
# minutes over the suite); the benchmarks autotune the full lists.
phase tests-kernels 150 env DEEPSIM_AUTOTUNE=0 "$PY" -m pytest -q tests/kernels
phase tests-cuda 60 env DEEPSIM_AUTOTUNE=0 "$PY" -m pytest -q -m cuda tests --ignore=tests/kernels
# step first (the headline numbers), then the quick loader group, then kernels. A group cut by
# --group-timeout keeps the rows it measured (step and kernels report "partial: ...").
phase bench 240 "$PY" -m bench --out "$LOG" --groups step,loader,kernels --group-timeout 120
if "$PY" -c "import pytest_benchmark" 2>/dev/null && [ "$(left)" -ge 45 ]; then
    phase micro 60 "$PY" -m pytest -q bench --benchmark-only --benchmark-max-time=0.5 \
        --benchmark-json "$LOG/micro.json"
else
    printf 'micro\t-\t0\tskipped: no pytest-benchmark or under 45 s left\n' >> "$SUMMARY"
fi

# Failed phases: rc not 0 (rc 5 = "no tests selected" and skipped phases do not count); exit 1 if any.
failed=$(awk -F'\t' 'NR > 1 && $2 != "-" && $2 != 0 && $2 != 5 {print $1}' "$SUMMARY" | tr '\n' ' ')
{
    echo
    echo "== bench/gpu.sh: $(( $(date +%s) - START )) s in all; logs in $LOG; $DALI_NOTE"
    column -t -s $'\t' "$SUMMARY" 2>/dev/null || cat "$SUMMARY"
    [ -n "$failed" ] && echo "failed phases: $failed(see their logs)"
    echo
    if [ -f "$LOG/results.json" ]; then
        timeout 30 "$PY" -m bench --from-json "$LOG" --compact
    else
        echo "no $LOG/results.json: see $LOG/bench.log"
    fi
} 2>&1 | tee "$LOG/summary.txt"
[ -z "$failed" ]
