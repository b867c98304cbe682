#!/usr/bin/env bash
# Every GPU benchmark (and the CUDA-only tests) in one command; JSON and logs land in $1 (default .bench/).
#
#   bash benchmarks/run_gpu.sh [OUT_DIR] [NAME ...]     # NAME: tests trace rope tracing boost kernel sink asd dataset decode
#
# Each step has its own time limit and a failing step does not stop the others, so one call on a
# lent GPU returns whatever finished. On a machine without nnsight, install the carried wheels first
# (docs/benchmarks.md, "Running them").
set -u
cd "$(dirname "$0")/.."
out=${1:-.bench}
shift || true
steps=${*:-tests rope tracing boost kernel sink asd dataset decode}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

step() {  # step NAME LIMIT_S COMMAND...
  local name=$1 limit=$2
  shift 2
  case " $steps " in *" $name "*) ;; *) return 0 ;; esac
  local start=$SECONDS
  echo "=== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  echo "=== $name: exit $rc after $((SECONDS - start))s"
  tail -n 3 "$out/$name.log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
python3 -c 'import torch, transformers, nnsight; print("torch", torch.__version__, "transformers",
transformers.__version__, "nnsight", nnsight.__version__)'

step tests 180 python3 -m pytest -p no:cacheprovider -o addopts="" -q -rs tests/test_gpu.py tests/test_mds.py tests/test_rope.py \
  tests/test_asd.py tests/test_host_syncs.py tests/test_batching.py -k "gpu or triton or static"
step trace 120 python3 benchmarks/bench_trace.py --tokens 1700 8000 --repeat 20 --out "$out/trace.json"
step rope 150 python3 benchmarks/bench_rope.py --tokens 1600 --repeat 20 --out "$out/rope.json"
step tracing 300 python3 benchmarks/bench_tracing.py --repeat 3 --out "$out/tracing.json"
step boost 130 python3 benchmarks/bench_attention_boost.py --tokens 1700 --repeat 15 --out "$out/boost.json"
step kernel 120 python3 benchmarks/bench_column_kernel.py --out "$out/kernel.json"
step sink 240 python3 benchmarks/bench_sink_attention.py --repeat 7 --out "$out/sink.json"
step asd 200 python3 benchmarks/bench_asd.py --repeat 5 --out "$out/asd.json"
step dataset 420 python3 benchmarks/bench_dataset.py --repeat 3 --out "$out/dataset.json"
step decode 480 python3 benchmarks/bench_decode.py --new-tokens 128 --repeat 5 --out "$out/decode.json"
exit 0
