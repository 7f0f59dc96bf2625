#!/usr/bin/env bash
# The published OneDC's decode on a GPU (issue 25): the fp32 path (the authors' precision and algorithm:
# LoRA unmerged, fp32, no compile) against each fast path and the bf16 default, 512x512, full size with
# random weights, interleaved round by round after one untimed call per path. The paper reports 0.34 s
# per decode; the aim is < 0.15 s. Extra arguments go to benchmarks/decode.py, e.g. --compile
# (torch.compile of the UNet and the VAE decoder: add its own row) or --size 1024.
#   bash benchmarks/decode_gpu.sh            # ~2-4 min on an H100 incl. building the model
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
export HF_HUB_OFFLINE=1 PYTHONPATH=${PYTHONPATH:-$PWD}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
"$PYTHON" benchmarks/decode.py --mode paths --model onedc_sd15 --size 512 --device cuda --repeats 5 --threads 0 "$@"
