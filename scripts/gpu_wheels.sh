#!/usr/bin/env bash
# The wheels bench/gpu.py needs on the lent GPU machine, into .gpu-wheels/ (git-ignored).
#
#     bash scripts/gpu_wheels.sh            # for the GPU machine's Python 3.12
#     PYVER=3.11 bash scripts/gpu_wheels.sh # to try the same set here
#
# That machine has no network and its own Python 3.12 with torch 2.11 (CUDA 13.0), transformers
# 5.17 (too old for the engine: it needs 5.24's cache argument), huggingface_hub, tokenizers and
# safetensors, but no bitsandbytes, llguidance or pydantic-settings. What transformers 5.24 and
# pydantic 2.14 check at import comes too (tokenizers >= 0.23.1, safetensors >= 0.8, regex,
# typing-extensions >= 4.16), whatever the machine has: the set is then the one tested here.
# Versions are uv.lock's. bitsandbytes is cut to its CPU and CUDA 13 libraries (BNB_KEEP): the
# wheel's thirteen others (CUDA 11.8-12.8, ROCm, XPU) are 36 of its 43 MB. The set comes to
# about 30 MiB. The `run` tool carries this folder there (64 MiB in all, the working tree
# included); bench/gpu_device.sh installs it there.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.gpu-wheels
rm -rf "$dest"
mkdir -p "$dest"
version() { grep -A1 "^name = \"$1\"\$" uv.lock | sed -n 's/^version = "\(.*\)"$/\1/p'; }
packages=(transformers bitsandbytes llguidance pydantic-settings pydantic pydantic-core
  python-dotenv typing-inspection annotated-types huggingface-hub tokenizers safetensors regex
  typing-extensions)
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
# bitsandbytes: only the native libraries named in BNB_KEEP, its RECORD rewritten to match.
BNB_KEEP=${BNB_KEEP:-cpu cuda130 cuda132} python3 - "$dest"/bitsandbytes-*.whl <<'PY'
import os, re, sys, zipfile

wheel = sys.argv[1]
keep = {f"libbitsandbytes_{name}.so" for name in os.environ["BNB_KEEP"].split()}
trimmed = wheel + ".trimmed"
with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(trimmed, "w", zipfile.ZIP_DEFLATED) as out:
    names = source.namelist()
    dropped = {
        n for n in names
        if re.search(r"libbitsandbytes_\w+\.so$", n) and os.path.basename(n) not in keep
    }
    for info in source.infolist():
        if info.filename in dropped:
            continue
        data = source.read(info)
        if info.filename.endswith(".dist-info/RECORD"):
            lines = data.decode().splitlines(keepends=True)
            data = "".join(l for l in lines if l.split(",")[0] not in dropped).encode()
        out.writestr(info, data)
os.replace(trimmed, wheel)
kept = sorted(os.path.basename(n) for n in names if re.search(r"libbitsandbytes_\w+\.so$", n)
              and n not in dropped)
print(f"bitsandbytes: kept {', '.join(kept)}; dropped {len(dropped)} other native libraries")
PY
ls -l "$dest"
wheels=$(du -cb "$dest"/*.whl | tail -1 | cut -f1)
tree=$(git ls-files -co --exclude-standard -z | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s}')
echo "wheels: $((wheels / 1048576)) MiB; with the working tree that travels beside them:" \
  "$(((wheels + tree) / 1048576)) MiB (the device tool carries 64 MiB at most)"
