#!/usr/bin/env bash
# Fetches NVRTC 13.0 (the device machines' version) from the PyPI wheel
# nvidia-cuda-nvrtc==13.0.88 into models/cache/nvrtc/ (ignored by git) and
# prints the folder holding libnvrtc.so.13. No GPU or driver is needed to
# compile kernels with it: the CUDA backend's unit tests compile every
# kernels/*.cu for sm_90 with it, so CI catches kernel code that does not compile.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=models/cache/nvrtc
lib="$dest/nvidia/cu13/lib"
if [ -s "$lib/libnvrtc.so.13" ]; then
  echo "$PWD/$lib"
  exit 0
fi
mkdir -p "$dest"
python3 -m pip download --quiet --no-deps nvidia-cuda-nvrtc==13.0.88 -d "$dest" >&2
python3 - "$dest" <<'PY'
import glob, os, sys, zipfile
dest = sys.argv[1]
whl = sorted(glob.glob(os.path.join(dest, "nvidia_cuda_nvrtc-13.0.88-*.whl")))[-1]
with zipfile.ZipFile(whl) as z:
    for name in z.namelist():
        if "/lib/libnvrtc" in name:
            z.extract(name, dest)
os.remove(whl)
PY
echo "$PWD/$lib"
