#!/usr/bin/env bash
# On the lent GPU machine (no network): install the wheels carried in .gpu-wheels/ beside the
# machine's own torch, then run the GPU benchmark. See docs/benchmarks.md, "GPU".
#
#     bash bench/gpu_device.sh [bench.gpu options]     # the table goes to $OUT/gpu.md too
set -euo pipefail
cd "$(dirname "$0")/.."
site=.gpu-site
rm -rf "$site"
python3 -m pip install --quiet --no-index --no-deps --target "$site" .gpu-wheels/*.whl
export PYTHONPATH="$PWD/$site:$PWD"
python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers",
  transformers.__version__, "CUDA", torch.cuda.is_available())'
python3 -m bench.gpu --out "${OUT:-.}/gpu.md" "$@"
