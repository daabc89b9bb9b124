#!/usr/bin/env python3
"""HF transformers decode speed on the GPU, as the peer for `kairos bench decode --model`.

Loads a GGUF (transformers' GGUF loader, needs the `gguf` package) or an HF folder in bf16 on
CUDA and times greedy decoding of a fixed number of new tokens (EOS ignored) at the given
batch sizes, two ways: plain `generate` (dynamic KV cache, what most users run) and
`generate` with the static cache (`cache_implementation="static"`), each after a warm-up run.
Prints one JSON line per measurement.

    python3 tools/hf_decode_peer.py --model models/cache/SmolLM2-135M-Instruct.Q4_1.gguf \
        --batches 1,32 --new-tokens 128
"""
import argparse
import json
import os
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def load(path, device):
    if path.endswith(".gguf"):
        d, name = os.path.dirname(path) or ".", os.path.basename(path)
        tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.bfloat16)
    else:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    return tok, model.to(device).eval()


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_generate(model, ids, new_tokens, **kw):
    sync()
    t = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **kw)
    sync()
    return time.perf_counter() - t, out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()
    tok, model = load(a.model, a.device)
    g = torch.Generator().manual_seed(0)
    for b in [int(x) for x in a.batches.split(",")]:
        ids = torch.randint(10, model.config.vocab_size - 10, (b, a.prompt_tokens), generator=g).to(a.device)
        for mode, kw in [("dynamic", {}), ("static", {"cache_implementation": "static"})]:
            try:
                # warm-up of the same length: the static cache is compiled for its shape
                timed_generate(model, ids, a.new_tokens, **kw)
                secs, out = timed_generate(model, ids, a.new_tokens, **kw)
            except Exception as e:  # report, keep going
                print(json.dumps({"peer": "transformers", "batch": b, "cache": mode, "error": str(e)[:200]}), flush=True)
                continue
            new = out.shape[1] - ids.shape[1]
            print(json.dumps({
                "peer": "transformers " + __import__("transformers").__version__,
                "torch": torch.__version__, "device": torch.cuda.get_device_name(0) if a.device.startswith("cuda") else a.device, "model": os.path.basename(a.model),
                "batch": b, "cache": mode, "new_tokens": new, "seconds": round(secs, 4),
                "tokens_per_s": round(b * new / secs, 1), "ms_per_step": round(secs / new * 1e3, 3),
            }), flush=True)


if __name__ == "__main__":
    main()
