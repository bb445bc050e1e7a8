#!/usr/bin/env bash
# The wheels bench/gpu.py needs on the lent GPU machine, into .gpu-wheels/ (git-ignored).
#
#     bash scripts/gpu_wheels.sh            # for the GPU machine's Python 3.12
#     PYVER=3.11 bash scripts/gpu_wheels.sh # to try the same set here
#
# That machine has no network and its own Python 3.12 with torch, transformers 5.17 (too old for
# the engine: it needs 5.24's cache argument), huggingface_hub and tokenizers, but no
# bitsandbytes, llguidance or pydantic-settings. The `run` tool carries this folder there (64 MiB
# in all: these come to about 61 MiB); bench/gpu_device.sh installs them there. Versions are
# uv.lock's.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.gpu-wheels
rm -rf "$dest"
mkdir -p "$dest"
version() { grep -A1 "^name = \"$1\"\$" uv.lock | sed -n 's/^version = "\(.*\)"$/\1/p'; }
packages=(transformers bitsandbytes llguidance pydantic-settings pydantic pydantic-core
  python-dotenv typing-inspection annotated-types huggingface-hub)
pins=()
for package in "${packages[@]}"; do
  pins+=("$package==$(version "$package")")
done
platforms=(--platform any --platform manylinux2014_x86_64)
for glibc in $(seq 17 35); do platforms+=(--platform "manylinux_2_${glibc}_x86_64"); done
pyver=${PYVER:-3.12}
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$pyver" \
  --implementation cp --abi "cp${pyver/./}" --abi abi3 --abi none "${platforms[@]}" \
  -d "$dest" "${pins[@]}"
ls -l "$dest"
du -sh "$dest"
