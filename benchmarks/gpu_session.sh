#!/usr/bin/env bash
# Every GPU measurement of the project in one command, for a session lent a device machine
# (the device tool's `run`, from the repository root, e.g. timeout_s 560):
#
#     bash benchmarks/gpu_session.sh            # reports -> $OUT (or benchmarks/reports/ without $OUT)
#
# Each script gets a time limit so that one slow part cannot starve the others; a part that times
# out leaves its log. Uses the machine's own python3 (PyTorch, safetensors, tqdm, scipy,
# scikit-learn are there) with PYTHONPATH=src; nothing is installed. Copy the reports into
# benchmarks/reports/ and name the device with every figure you quote.
set -u
DEST="${OUT:-benchmarks/reports}"
mkdir -p "$DEST"
export PYTHONPATH="src:benchmarks${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$DEST/gpu_device.txt" 2>&1
part() {  # name, seconds, command...
  local name=$1 secs=$2
  shift 2
  echo "== $name (limit ${secs}s)"
  timeout "$secs" "$@" >> "$DEST/gpu_session.log" 2>&1
  echo "   exit $?"
}
part parallel 240 "$PY" benchmarks/gpu_parallel.py --repeats 5 --out "$DEST/parallel_gpu.md"
part generate 150 "$PY" benchmarks/gpu_generate.py --out "$DEST/generate_gpu.md"
part noise 60 "$PY" benchmarks/noise_cost.py --device cuda --out "$DEST/noise_cost_gpu.md"
part sync 60 "$PY" benchmarks/gpu_sync.py --out "$DEST/gpu_sync.md"
ls -l "$DEST"
