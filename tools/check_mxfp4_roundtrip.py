"""Checks train_dflash.py's MXFP4 round trip (the --target-quant mxfp4 target)
against kairos' own quantizer, tensor by tensor.

  kairos quantize --model tests/fixtures/llama --out /tmp/q_llama --experts mxfp4
  python3 tools/check_mxfp4_roundtrip.py tests/fixtures/llama /tmp/q_llama

Decodes kairos' packed MXFP4 (blocks [rows, cols/32, 16], low nibble = even
element; E8M0 scales 2^(s-127)) and compares it with mxfp4_roundtrip of the
source's f32 weights: they must be equal (exit 1 otherwise). Needs torch and
safetensors (the device machine has both).
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_dflash import E2M1_GRID, mxfp4_roundtrip  # noqa: E402


def decode(blocks, scales):
    rows, nb, _ = blocks.shape
    b = blocks.long()
    codes = torch.stack([b & 0xF, b >> 4], dim=-1).reshape(rows, nb, 32)
    grid = torch.tensor(E2M1_GRID + tuple(-v for v in E2M1_GRID))
    vals = grid[codes]
    d = torch.exp2(scales.float() - 127.0)[..., None]
    return (vals * d).reshape(rows, nb * 32)


def main():
    src, quant = load_file(sys.argv[1] + "/model.safetensors"), load_file(sys.argv[2] + "/model.safetensors")
    checked, bad = 0, 0
    for name, blocks in quant.items():
        if not name.endswith(".weight_blocks"):
            continue
        base = name[: -len("_blocks")]
        want = decode(blocks, quant[base + "_scales"])
        got = mxfp4_roundtrip(src[base].float())
        diff = (want - got).abs().max().item()
        checked += 1
        if diff != 0.0:
            bad += 1
            print(f"{base}: max |kairos - roundtrip| = {diff:.3e}")
    print(f"mxfp4 round trip: {checked} tensors, {bad} differ")
    sys.exit(1 if bad or not checked else 0)


if __name__ == "__main__":
    main()
