# Sourced by the scripts that run on the device machine (device_suite.sh, device_ab.sh):
# the CUDA libraries on the loader path, NVRTC's PTX cache, NCCL without multicast, and the
# binaries of scripts/device_build.sh unpacked into $bin (kairos, cuda).
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export PATH=/usr/local/cuda/bin:$PATH
export KAIROS_PTX_CACHE=${KAIROS_PTX_CACHE:-/tmp/ptx} KAIROS_REQUIRE_CUDA=1 NCCL_NVLS_ENABLE=0
# cudarc opens libnccl.so; the machines ship only libnccl.so.2
nccl=$(ldconfig -p | grep -o '/[^ ]*libnccl\.so\.2' | head -1 || true)
if [ -n "$nccl" ]; then
  mkdir -p /tmp/ncclib && ln -sf "$nccl" /tmp/ncclib/libnccl.so
  export LD_LIBRARY_PATH=/tmp/ncclib:$LD_LIBRARY_PATH
fi
# the binaries travel xz-compressed
bin=/tmp/kairos-bin
mkdir -p "$bin"
for f in .dev/kairos.xz .dev/cuda.xz; do
  [ -f "$f" ] || { echo "missing $f: run scripts/device_build.sh here first" >&2; exit 1; }
  [ "$bin/$(basename "$f" .xz)" -nt "$f" ] || { xz -dc "$f" >"$bin/$(basename "$f" .xz)" && chmod +x "$bin/$(basename "$f" .xz)"; }
done
# h100 / h200: result files are named by the card they ran on
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
case $gpu in *H200*) card=h200 ;; *) card=h100 ;; esac
