#!/usr/bin/env bash
# Everything the CUDA path needs measured, in one run on a GPU machine (issue #16, part 2):
#   bash benchmarks/gpu_check.sh [OUT_DIR]      (default: $OUT, else ./gpu-check)
# Builds its own venv (a CUDA torch from the package registry, then the locked set), runs the
# CUDA tests (pytest -m cuda), then the streaming benchmark on a 7B-shaped 8-layer model under
# a 2 GB GPU budget beside accelerate. Everything lands in OUT_DIR (log, JSON, timelines).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-./gpu-check}}"
mkdir -p "$OUT_DIR"
exec > >(tee "$OUT_DIR/log.txt") 2>&1
VENV=/tmp/sli-gpu-venv
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "torch==$(sed -n 's/^torch==//p' requirements/torch.txt)"  # the CUDA build
grep -v '^torch' requirements/lock.txt > "$OUT_DIR/lock-no-torch.txt"
"$VENV/bin/python" -m pip install -q -c "$OUT_DIR/lock-no-torch.txt" -e ".[test,gguf]"
"$VENV/bin/python" -c "import torch; assert torch.cuda.is_available(), 'no CUDA'; print(torch.cuda.get_device_name(0))"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT_DIR/gpu.txt" || true
timeout 180 "$VENV/bin/python" -m pytest -q -m cuda tests/ | tee "$OUT_DIR/cuda-tests.txt"
MODEL=/tmp/sli-gpu-7b
[ -f "$MODEL/config.json" ] || "$VENV/bin/sli" synth "$MODEL" --family llama --preset 7b --layers 8
timeout 300 "$VENV/bin/python" benchmarks/gpu_streaming.py --model-dir "$MODEL" --budget-gb 2 \
    --modes none,int8,nf4 --out "$OUT_DIR"
