"""Compares kairos' captured hidden states (dense and MXFP4-MLP SmolLM2, CPU backend) with
the torch target that tools/train_dflash.py trains drafters against (dense and
`--target-quant mxfp4`), at the drafter's layers, on the same tokens.

  # here (kairos, CPU): writes DIR/tokens.json, DIR/dense.f32, DIR/mxfp4.f32
  KAIROS_DUMP_HIDDEN=DIR cargo test --release --test dflash mxfp4 -- --nocapture
  # where torch is (the device machine):
  python3 tools/compare_mxfp4_hidden.py MODEL.gguf DIR [--layers 1,14,27]

Prints the relative RMS difference per layer (rows after the first) for kairos vs torch
(dense), kairos vs torch (MXFP4) and the MXFP4 drift of each side. A drafter trained on
torch's MXFP4 target transfers to kairos' only if the second line is small.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_dflash import load_target, quantize_mlps  # noqa: E402


def rel(a, b):
    a, b = a[1:].astype(np.float64), b[1:].astype(np.float64)
    return float(np.sqrt(((a - b) ** 2).sum() / (b**2).sum()))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("dump")
    ap.add_argument("--layers", default="1,14,27")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    layers = [int(x) for x in a.layers.split(",")]
    d = Path(a.dump)
    toks = json.loads((d / "tokens.json").read_text())
    n = len(toks)

    def kairos(name):
        x = np.fromfile(d / name, dtype="<f4")
        return x.reshape(n, len(layers), -1)

    def torch_side(quant):
        model, _ = load_target(a.model, a.device, torch.float32)
        if quant:
            quantize_mlps(model, "mxfp4")
        with torch.no_grad():
            o = model(input_ids=torch.tensor([toks], device=a.device), output_hidden_states=True)
        return np.stack([o.hidden_states[l + 1][0].float().cpu().numpy() for l in layers], axis=1)

    kd, kq = kairos("dense.f32"), kairos("mxfp4.f32")
    td, tq = torch_side(False), torch_side(True)
    print(f"{n} tokens, layers {layers}; relative RMS difference per layer (rows 1..):")
    for what, x, y in [
        ("kairos dense vs torch dense", kd, td),
        ("kairos mxfp4 vs torch mxfp4", kq, tq),
        ("kairos mxfp4 drift (vs kairos dense)", kq, kd),
        ("torch mxfp4 drift (vs torch dense)", tq, td),
    ]:
        print(f"  {what:<40} " + " ".join(f"{rel(x[:, k], y[:, k]):.4f}" for k in range(len(layers))))


if __name__ == "__main__":
    main()
