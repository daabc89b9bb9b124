#!/usr/bin/env bash
# Fetches a CUDA 13.5 nvcc (compiler, runtime headers and library, NVVM) from PyPI wheels into
# models/cache/nvcc/ (ignored by git) and prints the folder to put first on PATH. With it the
# standalone micro-benchmarks (bench/micro/*.cu) compile here for sm_90, with -Xptxas -v
# register and shared-memory counts, before a device call runs them:
#   N=$(scripts/fetch_nvcc.sh); PATH=$N/bin:$PATH nvcc -O3 -arch=sm_90 -I$N/include -L$N/lib \
#     -Xptxas -v -o /tmp/lsm bench/micro/layer_stream_micro.cu
# No GPU is needed to compile; the binaries run only on the device machine. cuobjdump and
# nvdisasm come too, for reading the SASS here (scripts/sass_counts.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
dest=models/cache/nvcc
root="$dest/nvidia/cu13"
if [ -x "$root/bin/nvcc" ] && [ -d "$root/nvvm" ] && [ -x "$root/bin/nvdisasm" ]; then
  echo "$PWD/$root"
  exit 0
fi
mkdir -p "$dest"
python3 -m pip download --quiet --no-deps -d "$dest" \
  nvidia-cuda-nvcc==13.5.37 nvidia-cuda-runtime==13.5.37 nvidia-cuda-crt==13.5.37 nvidia-nvvm==13.5.37 \
  nvidia-cuda-cuobjdump==13.5.37 nvidia-cuda-nvdisasm==13.5.37 >&2
python3 - "$dest" <<'PY'
import glob, os, stat, sys, zipfile
dest = sys.argv[1]
for whl in sorted(glob.glob(os.path.join(dest, "nvidia_*-13.5.37-*.whl"))):
    with zipfile.ZipFile(whl) as z:
        for info in z.infolist():
            path = z.extract(info, dest)
            mode = info.external_attr >> 16
            if mode & stat.S_IXUSR:
                os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    os.remove(whl)
PY
# the wheels' nvcc looks for its tools next to it; make the extracted ones executable
chmod +x "$root"/bin/* "$root"/nvvm/bin/* 2>/dev/null || true
echo "$PWD/$root"
