#!/usr/bin/env python3
"""Writes tests/fixtures/llama_nvfp4_modelopt: the tiny `llama` fixture with every
decoder linear in NVFP4, in the layout NVIDIA ModelOpt's HF export produces, by a
writer independent of kairos (numpy/torch only), plus its reference logits.

Usage (from the repo root, after tools/make_fixtures.py made tests/fixtures/llama):

    python tools/make_nvfp4_modelopt.py

Layout written (ModelOpt `NVFP4QTensor` / `export_hf_checkpoint`, as read by vLLM's
`modelopt_fp4` loader), per quantized linear `<p>` (q/k/v/o_proj, gate/up/down_proj):

* `<p>.weight`         uint8 `[out, in/2]`: E2M1 codes, `(odd << 4) | even`.
* `<p>.weight_scale`   float8_e4m3fn `[out, in/16]`: per-block scale
                       `e4m3(amax_block / (6 * weight_scale_2))`.
* `<p>.weight_scale_2` float32 scalar: `amax(W) / (6 * 448)`.
* `<p>.input_scale`    float32 scalar: activation amax / (6 * 448) (for W4A4 kernels;
                       a weight-only runtime ignores it).

and dequantization `W = e2m1(code) * float(weight_scale) * weight_scale_2`.
`lm_head`, embeddings and norms stay float32 (ModelOpt's default `exclude_modules`).
config.json gets `quantization_config = {quant_method: modelopt, quant_algo: NVFP4,
group_size: 16, ...}` and hf_quant_config.json the `quantization` section ModelOpt writes.

reference.json: transformers' LlamaForCausalLM (float32, eager) with every quantized
linear replaced by its dequantized weights, on the fixture prompts: `first_logits`
and `greedy_ids` as in the other fixtures (schema in tools/FIXTURES.md).
"""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402  (reference runner and JSON helpers only)

SRC = mf.FIX / "llama"
DST = mf.FIX / "llama_nvfp4_modelopt"
GROUP = 16
E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=np.float32)
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def e2m1_codes(x):
    """Nearest E2M1 code of each element (ties to the even code), saturating at 6."""
    a = np.minimum(np.abs(x), 6.0)
    d = np.abs(a[..., None] - E2M1)  # distance to every magnitude
    best = d.min(axis=-1, keepdims=True)
    ties = d == best
    # among equally near magnitudes prefer the one with an even code (mantissa bit 0)
    even = (np.arange(8) % 2 == 0)
    mag = np.where((ties & even).any(axis=-1), np.argmax(ties & even, axis=-1), np.argmax(ties, axis=-1))
    sign = (np.signbit(x) & (mag > 0)).astype(np.uint8) << 3
    return mag.astype(np.uint8) | sign


def quantize_nvfp4(w):
    """(packed u8, block scales as float8_e4m3fn tensor, scale_2 f32, dequantized f32)."""
    w = w.astype(np.float32)
    out, inp = w.shape
    scale_2 = np.float32(np.abs(w).max() / (6.0 * 448.0))
    blocks = w.reshape(out, inp // GROUP, GROUP)
    amax_b = np.abs(blocks).max(axis=-1)
    s = torch.from_numpy(amax_b / (6.0 * scale_2)).to(torch.float8_e4m3fn)
    s_f = s.to(torch.float32).numpy()
    s_f = np.where(s_f == 0, 1.0, s_f)  # all-zero block: any scale, codes are 0
    codes = e2m1_codes(blocks / (s_f * scale_2)[..., None]).reshape(out, inp)
    packed = (codes[:, 1::2] << 4) | codes[:, 0::2]
    deq = (np.where(codes & 8, -1.0, 1.0) * E2M1[codes & 7]).reshape(out, inp // GROUP, GROUP)
    deq = (deq * (s_f * scale_2)[..., None]).reshape(out, inp).astype(np.float32)
    return packed.astype(np.uint8), s, scale_2, deq


def main():
    torch.manual_seed(0)
    state = load_file(str(SRC / "model.safetensors"))
    packed_state, deq_state = {}, {}
    for name, t in state.items():
        prefix = name[: -len(".weight")] if name.endswith(".weight") else None
        if prefix and prefix.split(".")[-1] in LINEARS:
            packed, s, s2, deq = quantize_nvfp4(t.to(torch.float32).numpy())
            packed_state[f"{prefix}.weight"] = torch.from_numpy(packed)
            packed_state[f"{prefix}.weight_scale"] = s
            packed_state[f"{prefix}.weight_scale_2"] = torch.tensor(s2, dtype=torch.float32)
            deq_state[name] = torch.from_numpy(deq)
        else:
            packed_state[name] = t
            deq_state[name] = t

    cfg = json.loads((SRC / "config.json").read_text())
    tok = mf.AutoTokenizer.from_pretrained(SRC)
    model = mf.load_folder(SRC)
    model.load_state_dict(deq_state, strict=True)

    # input_scale: activation amax over the reference prompts / (6 * 448), as ModelOpt calibrates it.
    amax = {}
    hooks = []
    for n, mod in model.named_modules():
        if n.split(".")[-1] in LINEARS:
            def hook(m, args, n=n):
                amax[n] = max(amax.get(n, 0.0), float(args[0].abs().max()))
            hooks.append(mod.register_forward_pre_hook(hook))
    cases = mf.run_cases(model, tok, mf.TINY_CASES, 16)
    for h in hooks:
        h.remove()
    for n, a in amax.items():
        packed_state[f"{n}.input_scale"] = torch.tensor(a / (6.0 * 448.0), dtype=torch.float32)

    if DST.exists():
        shutil.rmtree(DST)
    DST.mkdir(parents=True)
    save_file(packed_state, str(DST / "model.safetensors"), metadata={"format": "pt"})
    quant = {"quant_algo": "NVFP4", "kv_cache_quant_algo": None, "group_size": GROUP, "exclude_modules": ["lm_head"]}
    cfg["quantization_config"] = {"quant_method": "modelopt", **quant}
    (DST / "config.json").write_text(json.dumps(cfg, indent=1) + "\n")
    hf_quant = {"producer": {"name": "modelopt", "version": "independent-writer"}, "quantization": quant}
    (DST / "hf_quant_config.json").write_text(json.dumps(hf_quant, indent=1) + "\n")
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copyfile(SRC / f, DST / f)
    mf.write_reference(DST, tok, cases, extra={"note": "transformers on the dequantized NVFP4 weights"})
    print(f"wrote {DST}")


if __name__ == "__main__":
    main()
