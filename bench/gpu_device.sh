#!/usr/bin/env bash
# On the lent GPU machine (no network): install the wheels carried in .gpu-wheels/ beside the
# machine's own torch, then run the GPU benchmark. See docs/benchmarks.md, "GPU".
#
#     bash bench/gpu_device.sh [bench.gpu options]
#
# Everything goes to $OUT (here, without it: .gpu-out/) as it comes: gpu.md (the table so far),
# gpu.jsonl (one line a figure) and gpu.log (this whole output). bench.gpu's preflight prints
# the versions it runs on and stops at once, in one line, if one of them cannot import.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-$PWD/.gpu-out}
mkdir -p "$out"
fail() {
  echo "PREFLIGHT FAILED: $*. Nothing was measured."
  echo "PREFLIGHT FAILED: $*. Nothing was measured." >"$out/gpu.md"
  exit 2
}
{
  shopt -s nullglob
  wheels=(.gpu-wheels/*.whl)
  ((${#wheels[@]})) ||
    fail "no wheels in .gpu-wheels/ (run 'bash scripts/gpu_wheels.sh' here, carry .gpu-wheels)"
  echo "Carried: $(du -sh .gpu-wheels | cut -f1) in ${#wheels[@]} wheels"
  site=$PWD/.gpu-site
  rm -rf "$site"
  python3 -m pip install --quiet --no-index --no-deps --no-compile --target "$site" \
    "${wheels[@]}" || fail "pip could not install the carried wheels (its error is above)"
  export PYTHONPATH="$site:$PWD" GPU_CARRIED_SITE="$site" PYTHONUNBUFFERED=1
  python3 -m bench.gpu --out "$out" "$@"
} 2>&1 | tee "$out/gpu.log"
