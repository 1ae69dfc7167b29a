#!/usr/bin/env bash
# The GPU check, prepared to run in one go on a machine with CUDA (about 7 minutes on one GPU):
#
#   1. correctness on CUDA: every layer-table configuration and five ResNet-20s against float64
#      on the CPU, bfloat16 autocast, inductor on CUDA (tests/test_devices.py and the inductor
#      cases of tests/test_compile.py, with NORMKIT_TEST_DEVICES=cuda);
#   2. timings on CUDA: `normkit bench --device cuda`, eager, float32 then bfloat16, both memory
#      formats, every case and shape; then torch.compile on the targets' cases.
#
# Each phase has its own time limit and writes its own files, so a phase that runs out of time
# loses only itself. Run from the repository root; nothing is installed (the package is imported
# from src/), so the machine's own PyTorch is what is tested.
#
#   OUT=results/ benchmarks/device_check.sh          # results: OUT/*.log, OUT/*.json, OUT/*.xml
#   DEVICE=cpu QUICK=1 benchmarks/device_check.sh    # a plumbing check without a GPU
#
# Environment: OUT (results folder, default: a new temporary one), DEVICE (default: cuda),
# PY (default: python3), JOBS (pytest workers, default: 8), QUICK=1 (tiny shapes, short limits).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-$(mktemp -d)}
DEVICE=${DEVICE:-cuda}
PY=${PY:-python3}
JOBS=${JOBS:-8}
QUICK=${QUICK:-0}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0

if [ "$QUICK" = 1 ]; then
    test_limit=300 bench_limit=120 bench_args=(--quick --layers sabn,wsconv,resnet20-fixup)
    compile_args=(--quick --layers sabn)
else
    test_limit=150 bench_limit=150 bench_args=()
    compile_args=(--layers sabn,ccbn,auxbn,bcn,bcn-est,wsconv,wsconv-eval,resnet20-fixup
        --formats contiguous)
fi

phase() {  # phase NAME LIMIT COMMAND...: run, log to OUT/NAME.log, record its exit status
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc; last lines:"
    tail -n 5 "$OUT/$name.log"
    [ "$rc" -eq 0 ] || status=1
}

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || true
    "$PY" -c 'import torch, sys; print("python", sys.version.split()[0]); print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version()); print("devices", [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])'
} >"$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

workers=()
if "$PY" -c 'import xdist' 2>/dev/null; then workers=(-n "$JOBS"); fi
NORMKIT_TEST_DEVICES=$DEVICE phase tests "$test_limit" "$PY" -m pytest -q -p no:cacheprovider \
    "${workers[@]}" --junitxml="$OUT/tests.xml" tests/test_devices.py \
    tests/test_compile.py::test_fullgraph_inductor_matches_eager

for dtype in float32 bfloat16; do
    phase "bench-$dtype" "$bench_limit" "$PY" -m normkit bench --device "$DEVICE" \
        --dtypes "$dtype" --no-progress --json "$OUT/bench-$dtype.json" "${bench_args[@]}"
done
phase bench-compile "$bench_limit" "$PY" -m normkit bench --device "$DEVICE" --modes compile \
    --no-progress --json "$OUT/bench-compile.json" "${compile_args[@]}"

echo "== results in $OUT; exit $status"
exit "$status"
