#!/usr/bin/env bash
# Everything the CUDA path needs measured, in one run on a GPU machine (issue #16, part 2):
#   bash benchmarks/gpu_check.sh [OUT_DIR]      (default: $OUT, else ./gpu-check)
# Python: where `python3` already has a CUDA torch (an offline GPU image), that one, with the
# packages it lacks installed from wheels in $SLI_WHEELS (a folder of .whl files) into a
# --target folder; else a venv of its own (a CUDA torch from the package registry, then the
# locked set). Then the CUDA tests (pytest -m cuda), then the streaming benchmark on a 7B-shaped
# 8-layer model under a 2 GB GPU budget beside accelerate. Everything lands in OUT_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-./gpu-check}}"
mkdir -p "$OUT_DIR"
exec > >(tee "$OUT_DIR/log.txt") 2>&1
if python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    PY=python3
    if [ -n "${SLI_WHEELS:-}" ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/sli-site "$SLI_WHEELS"/*.whl
        export PYTHONPATH="/tmp/sli-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    else
        export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    fi
    SLI=(python3 -c "import sys; from sli.cli import main; sys.argv[0] = 'sli'; sys.exit(main())")
else
    VENV=/tmp/sli-gpu-venv
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q "torch==$(sed -n 's/^torch==//p' requirements/torch.txt)"  # the CUDA build
    grep -v '^torch' requirements/lock.txt > "$OUT_DIR/lock-no-torch.txt"
    "$VENV/bin/python" -m pip install -q -c "$OUT_DIR/lock-no-torch.txt" -e ".[test,gguf]"
    PY="$VENV/bin/python"
    SLI=("$VENV/bin/sli")
fi
"$PY" -c "import torch, transformers, numba, numpy; assert torch.cuda.is_available(), 'no CUDA'
print(torch.cuda.get_device_name(0), 'torch', torch.__version__, 'transformers', transformers.__version__,
      'numba', numba.__version__, 'numpy', numpy.__version__)"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT_DIR/gpu.txt" || true
timeout 240 "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py | tee "$OUT_DIR/cuda-tests.txt" || true
MODEL=/tmp/sli-gpu-7b
[ -f "$MODEL/config.json" ] || "${SLI[@]}" synth "$MODEL" --family llama --preset 7b --layers 8
timeout 300 "$PY" benchmarks/gpu_streaming.py --model-dir "$MODEL" --budget-gb 2 \
    --modes none,int8,nf4 --out "$OUT_DIR"
