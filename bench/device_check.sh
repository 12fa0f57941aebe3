#!/usr/bin/env bash
# Issue 4's checks on a lent GPU, as one call of the device tool (about 9 minutes on an H100/H200):
#
#   bash bench/device_check.sh [build] [tests] [tune] [bench]     # default: all four, in this order
#
# build: the package (C++ core too) into the machine's python3, no network (--no-build-isolation,
#        --no-deps: scikit-build-core, pybind11, cmake and ninja are on the image).
# tests: tests/test_triton.py on the GPU (the same tests CI runs in the interpreter), 8 workers.
# tune:  bench/gpu_tune.py, each kernel alone over its tile shapes, with the GPU's ceilings.
# bench: bench/run.py --device cuda --sizes h100 (issue 4's targets), 3 timed runs each.
#
# Every stage has its own timeout and writes its log (and JSON) under $OUT as it goes, so a stage
# that runs long still leaves the others' results. Stages can be split over two calls while the
# machine is warm (the build stays there between calls).
set -uo pipefail
OUT=${OUT:-/tmp/ncfast-device}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CMAKE_BUILD_PARALLEL_LEVEL=16
PY=${PYTHON:-python3}
stages=("$@")
((${#stages[@]})) || stages=(build tests tune bench)
say() { printf '\n== %s %s\n' "$(date -u +%T)" "$*"; }

say "machine"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt"
$PY -c "import torch, triton, sys; print(sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" 2>&1 | tee -a "$OUT/gpu.txt"

for stage in "${stages[@]}"; do
  case $stage in
    build)
      say "build"
      timeout 240 $PY -m pip install -q --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1
      echo "build rc $?"; tail -5 "$OUT/build.log"
      $PY -c "import ncfast; print('ncfast', ncfast.__version__, ncfast.compile_options())" ;;
    tests)
      say "tests (tests/test_triton.py on the GPU)"
      timeout 200 $PY -m pytest -q -x -n 8 -p no:cacheprovider tests/test_triton.py >"$OUT/tests.log" 2>&1
      echo "tests rc $?"; tail -15 "$OUT/tests.log" ;;
    tune)
      say "tune (bench/gpu_tune.py)"
      timeout 150 $PY bench/gpu_tune.py --json "$OUT/gpu_tune.json" 2>&1 | tee "$OUT/tune.log" | tail -45 ;;
    bench)
      say "bench (bench/run.py --device cuda --sizes h100)"
      timeout 300 $PY bench/run.py --device cuda --sizes h100 --repeat 3 --json "$OUT/h100.json" >"$OUT/bench.log" 2>&1
      echo "bench rc $?"; tail -40 "$OUT/bench.log" ;;
    *) echo "unknown stage $stage (build, tests, tune, bench)"; exit 2 ;;
  esac
done
say "done"
