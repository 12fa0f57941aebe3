#!/usr/bin/env bash
# The GPU checks, as one command of at most 590 s (the stages below, each with its own timeout):
#
#   bash bench/device_check.sh [build] [tests] [bench] [costs] [tune]   # default: all five, in this order
#
# build (90 s):  the package (C++ core too) into the machine's python3, no network
#                (--no-build-isolation, --no-deps: scikit-build-core, pybind11, cmake and ninja are
#                on the image); 18 s on 2 cores here.
# tests (150 s): tests/test_triton_*.py on the GPU (the same tests CI runs in the interpreter), 8
#                workers (kernel compiles dominate).
# bench (230 s): bench/run.py --device cuda --sizes h100 (the GPU sizes' targets), 2 timed runs each:
#                the float32 baselines at N = 4M, C = 50,000 take about 8 s a call.
# costs (120 s):  bench/run.py --device cuda --ops probe,dxd --sizes h100 (bench/costs.py): what
#                measuring costs on the GPU, LayerProbe.measure against one forward pass and
#                nc_metrics against float64 X^T X + eigvalsh(D); no target yet.
# tune (the rest, at least 120 s): bench/gpu_tune.py, each kernel alone over its tile shapes, with
#                the GPU's ceilings (NCC first; its JSON is rewritten after each part).
#
# Every stage has its own timeout and writes its log (and JSON) under $OUT as it goes, so a stage
# that runs long still leaves the others' results. Stages can be split over two calls while the
# machine is warm (it is given back 30 s after a call; the build stays while it is warm).
set -uo pipefail
OUT=${OUT:-/tmp/ncfast-device}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CMAKE_BUILD_PARALLEL_LEVEL=16
PY=${PYTHON:-python3}
stages=("$@")
((${#stages[@]})) || stages=(build tests bench costs tune)
say() { printf '\n== %s %s\n' "$(date -u +%T)" "$*"; }
# One deadline for the whole call: a stage gets its own cap or what is left of 590 s, whichever is
# less, so the time a quick stage leaves goes to the later ones.
start=$SECONDS
cap() { local left=$((590 - (SECONDS - start))); ((left < $1)) && echo $((left > 5 ? left : 5)) || echo "$1"; }

say "machine"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt"
$PY -c "import torch, triton, sys; print(sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" 2>&1 | tee -a "$OUT/gpu.txt"

for stage in "${stages[@]}"; do
  case $stage in
    build)
      say "build"
      timeout "$(cap 90)" $PY -m pip install -q --no-build-isolation --no-deps --config-settings=cmake.define.NCFAST_BENCH=ON -e . >"$OUT/build.log" 2>&1
      rc=$?
      if ((rc)); then  # an older scikit-build-core may not do editable installs: a plain one then
        tail -5 "$OUT/build.log"
        timeout "$(cap 90)" $PY -m pip install -q --no-build-isolation --no-deps --config-settings=cmake.define.NCFAST_BENCH=ON . >>"$OUT/build.log" 2>&1
        rc=$?
      fi
      echo "build rc $rc"; tail -5 "$OUT/build.log"
      $PY -c "import ncfast; print('ncfast', ncfast.__version__, ncfast.compile_options())" ;;
    tests)
      say "tests (tests/test_triton_*.py on the GPU)"
      workers=(); $PY -c "import xdist" 2>/dev/null && workers=(-n 8)
      timeout "$(cap 150)" $PY -m pytest -q "${workers[@]}" -p no:cacheprovider tests/test_triton_*.py >"$OUT/tests.log" 2>&1
      echo "tests rc $?"; tail -15 "$OUT/tests.log" ;;
    tune)
      say "tune (bench/gpu_tune.py)"
      timeout "$(cap 590)" $PY bench/gpu_tune.py --json "$OUT/gpu_tune.json" 2>&1 | tee "$OUT/tune.log" | tail -45 ;;
    bench)
      say "bench (bench/run.py --device cuda --sizes h100)"
      timeout "$(cap 230)" $PY bench/run.py --device cuda --sizes h100 --repeat 2 --json "$OUT/h100.json" >"$OUT/bench.log" 2>&1
      echo "bench rc $?"; tail -40 "$OUT/bench.log" ;;
    costs)
      say "costs (bench/run.py --device cuda --ops probe,dxd --sizes h100)"
      timeout "$(cap 120)" $PY bench/run.py --device cuda --ops probe,dxd --sizes h100 --repeat 2 --json "$OUT/costs.json" >"$OUT/costs.log" 2>&1
      echo "costs rc $?"; tail -25 "$OUT/costs.log" ;;
    *) echo "unknown stage $stage (build, tests, bench, costs, tune)"; exit 2 ;;
  esac
done
say "done"
