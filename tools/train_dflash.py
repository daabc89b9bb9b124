#!/usr/bin/env python3
"""Train a DFlash block drafter for a frozen target model (arXiv 2602.06036).

Two steps, each fitting in one time-boxed call (no internet needed):

  gen    the target's OWN generations on a prompt file (JSONL, one object per
         line: {"kind": "verdict"|"chat", "text": <prompt as the engine feeds
         it, chat template applied>, "prefix": <optional assistant prefix, e.g.
         '{"decision":"' which kairos' verdict grammar forces>}); `kairos bench
         dflash --export-prompts FILE` writes such a file from the pipelines'
         event generators plus general instructions (tools/dflash_prompts.jsonl
         is that file for SmolLM2). Sequences are appended to OUT/data.pt, so
         several calls accumulate data.
  train  trains the drafter with the target frozen: random anchor positions
         in the generations, each starting a block [token, mask, ..., mask];
         a block-sparse attention mask lets a block see the target's hidden
         states strictly before its anchor plus its own block (non-causal);
         cross-entropy on block positions k=1..B-1 weighted exp(-(k-1)/gamma).
         `--resume` continues from OUT/train_state.pt. Exports the drafter in
         z-lab's layout (config.json with dflash_config + model.safetensors),
         which `kairos generate --draft DIR` loads.

Architecture (the same in kairos, src/engine/speculative/dflash.rs): the
target's hidden states after layers `target_layer_ids` are concatenated,
projected N*H -> H (fc), RMS-normed (hidden_norm) and used as extra keys and
values in every draft layer (each layer's own k_proj/v_proj + k_norm + RoPE at
their positions); queries come from the block only; the drafter's final norm
feeds the target's lm_head; block embeddings are the target's.

MoE targets: a dense model upcycled to MoE (every expert a copy of the dense
MLP, any router) computes exactly the dense hidden states, so a drafter trained
on SmolLM2 applies unchanged to its upcycled MoE (tests/moe_upcycle.rs shows
the logits are the dense ones). `--target-moe E,K` upcycles the loaded target
before use to demonstrate this (slower; same result).

But kairos' CUDA backend stores MoE experts in MXFP4 (an upcycled target's too),
which changes SmolLM2's outputs (top-1 agreement 0.72 with the unquantized model,
bench/results/fp4_quality_smollm2.md), so a drafter trained on the dense target
accepts far less on that MoE target. `--target-quant mxfp4` (gen and train) runs the
target with every MLP weight rounded through MXFP4 exactly as kairos quantizes
experts at upload (OCP spec scale floor(log2 amax) - 2 per 32 inputs, E2M1
round-to-nearest-even): its generations and hidden states are the MoE target's
(up to the GPU's int8 expert activations). `--init-drafter DIR` starts training
from an exported drafter (e.g. the dense one) instead of from the target.

Target loading: an HF folder, or a .gguf file through transformers' GGUF loader
(needs the `gguf` package), e.g. models/cache/SmolLM2-135M-Instruct.Q4_1.gguf.
"""

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


# --------------------------------------------------------------------------- target

def load_target(path, device, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    if p.suffix == ".gguf":
        tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
        model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=dtype)
    else:
        tok = AutoTokenizer.from_pretrained(str(p))
        model = AutoModelForCausalLM.from_pretrained(str(p), dtype=dtype)
    model.to(device).eval().requires_grad_(False)
    return model, tok


class UpcycledMlp(nn.Module):
    """E copies of a dense MLP behind a random router (top-k, renormalised):
    the output equals the dense MLP's for any routing."""

    def __init__(self, mlp, experts, top_k, hidden, gen):
        super().__init__()
        self.experts = nn.ModuleList([mlp] * experts)  # shared weights: identical copies
        self.router = nn.Parameter(torch.randn(experts, hidden, generator=gen) * 0.02, requires_grad=False)
        self.top_k = top_k

    def forward(self, x):
        logits = x.float() @ self.router.float().t()
        w, idx = torch.topk(torch.softmax(logits, -1), self.top_k, dim=-1)
        w = (w / w.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        for j in range(self.top_k):
            for e in idx[..., j].unique().tolist():
                sel = idx[..., j] == e
                out[sel] += w[..., j][sel, None] * self.experts[e](x[sel])
        return out


# E2M1 magnitudes and the midpoints between them; a value on a midpoint goes to the
# even code: down at 0.25, 1.25, 2.5, 5 (bucketize's default), up at 0.75, 1.75, 3.5.
E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_MIDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def mxfp4_roundtrip(w):
    """w [rows, cols] (cols % 32 == 0) through MXFP4 and back, as kairos'
    Mxfp4Matrix::quantize(ScaleRule::Spec) and its dequantization."""
    rows, cols = w.shape
    x = w.float().reshape(rows, cols // 32, 32)
    amax = x.abs().amax(-1, keepdim=True)
    _, ex = torch.frexp(amax)  # amax = m * 2^ex, m in [0.5, 1): floor(log2 amax) = ex - 1
    e = (ex - 1 - 2).clamp(-127, 127).float()
    d = torch.where(amax > 0, torch.exp2(e), torch.ones_like(amax))
    a = (x / d).abs()
    mids = torch.tensor(E2M1_MIDS, device=w.device)
    idx = torch.bucketize(a, mids)
    idx = idx + ((a == 0.75) | (a == 1.75) | (a == 3.5)).long()
    q = torch.tensor(E2M1_GRID, device=w.device)[idx] * torch.sign(x) * d
    return q.reshape(rows, cols).to(w.dtype)


def quantize_mlps(model, fmt):
    """Every MLP projection's weight rounded through `fmt` (the MoE target kairos runs)."""
    if fmt != "mxfp4":
        raise SystemExit(f"--target-quant {fmt}: only mxfp4 is supported")
    for layer in model.model.layers:
        for name in ("gate_proj", "up_proj", "down_proj"):
            lin = getattr(layer.mlp, name)
            lin.weight.data = mxfp4_roundtrip(lin.weight.data)
    return model


def upcycle_target(model, experts, top_k):
    gen = torch.Generator().manual_seed(1234)
    h = model.config.hidden_size
    for layer in model.model.layers:
        layer.mlp = UpcycledMlp(layer.mlp, experts, top_k, h, gen).to(next(model.parameters()).device)
    return model


def default_target_layers(num_target_layers, num_draft_layers):
    if num_draft_layers <= 1:
        return [num_target_layers // 2]
    start, end = 1, max(num_target_layers - 3, 1)
    return [int(round(start + i * (end - start) / (num_draft_layers - 1))) for i in range(num_draft_layers)]


def pick_mask_token(tok, vocab_size):
    """A special token that never occurs in prompts or answers."""
    used = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}
    for name in ("<|MASK|>", "<mask>", "<|mask|>"):
        tid = tok.convert_tokens_to_ids(name)
        if isinstance(tid, int) and tid != tok.unk_token_id and 0 <= tid < vocab_size:
            return tid
    special = sorted(i for i in tok.all_special_ids if i not in used and i < vocab_size)
    chat = {tok.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>")}
    special = [i for i in special if i not in chat]
    return special[-1] if special else vocab_size - 1


# --------------------------------------------------------------------------- drafter

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * y).to(x.dtype)


def rope(x, cos, sin):
    """Rotate-half RoPE; x [b, heads, len, hd], cos/sin [b, 1, len, hd]."""
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rot * sin


class Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        h, hd = c["hidden_size"], c["head_dim"]
        self.nh, self.nkv, self.hd = c["num_attention_heads"], c["num_key_value_heads"], hd
        self.q_proj = nn.Linear(h, self.nh * hd, bias=False)
        self.k_proj = nn.Linear(h, self.nkv * hd, bias=False)
        self.v_proj = nn.Linear(h, self.nkv * hd, bias=False)
        self.o_proj = nn.Linear(self.nh * hd, h, bias=False)
        self.q_norm = RMSNorm(hd, c["rms_norm_eps"])
        self.k_norm = RMSNorm(hd, c["rms_norm_eps"])

    def forward(self, x, ctx, rq, rk, mask):
        b, q_len, _ = x.shape
        kv_in = torch.cat([ctx, x], dim=1)
        kv_len = kv_in.shape[1]
        q = self.q_norm(self.q_proj(x).view(b, q_len, self.nh, self.hd)).transpose(1, 2)
        k = self.k_norm(self.k_proj(kv_in).view(b, kv_len, self.nkv, self.hd)).transpose(1, 2)
        v = self.v_proj(kv_in).view(b, kv_len, self.nkv, self.hd).transpose(1, 2)
        q, k = rope(q, *rq), rope(k, *rk)
        rep = self.nh // self.nkv
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(o.transpose(1, 2).reshape(b, q_len, self.nh * self.hd))


class Mlp(nn.Module):
    def __init__(self, c):
        super().__init__()
        h, i = c["hidden_size"], c["intermediate_size"]
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DraftLayer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.input_layernorm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.mlp = Mlp(c)

    def forward(self, x, ctx, rq, rk, mask):
        x = x + self.self_attn(self.input_layernorm(x), ctx, rq, rk, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Drafter(nn.Module):
    """State-dict names are exactly the exported tensor names."""

    def __init__(self, c):
        super().__init__()
        self.c = c
        n_ctx = len(c["dflash_config"]["target_layer_ids"])
        self.fc = nn.Linear(n_ctx * c["hidden_size"], c["hidden_size"], bias=False)
        self.hidden_norm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.layers = nn.ModuleList([DraftLayer(c) for _ in range(c["num_hidden_layers"])])
        self.norm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        hd = c["head_dim"]
        inv = 1.0 / (c["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
        self.register_buffer("inv_freq", inv.float(), persistent=False)

    def rot(self, pos):
        f = pos.float()[..., None] * self.inv_freq  # [b, len, hd/2]
        emb = torch.cat([f, f], dim=-1)[:, None]
        return emb.cos(), emb.sin()

    def forward(self, block_emb, block_pos, feats, feat_pos, mask):
        ctx = self.hidden_norm(self.fc(feats))
        rq = self.rot(block_pos)
        rk = self.rot(torch.cat([feat_pos, block_pos], dim=1))
        x = block_emb
        for layer in self.layers:
            x = layer(x, ctx, rq, rk, mask)
        return self.norm(x)


def init_from_target(drafter, target):
    """Start each draft layer from one of the target's last layers (same shapes
    when the drafter uses the target's shape); q/k norms start at 1."""
    tl = target.model.layers
    for i, layer in enumerate(drafter.layers):
        src = tl[len(tl) - len(drafter.layers) + i]
        with torch.no_grad():
            for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
                getattr(layer.self_attn, n).weight.copy_(getattr(src.self_attn, n).weight.float())
            for n in ("gate_proj", "up_proj", "down_proj"):
                getattr(layer.mlp, n).weight.copy_(getattr(src.mlp, n).weight.float())
            layer.input_layernorm.weight.copy_(src.input_layernorm.weight.float())
            layer.post_attention_layernorm.weight.copy_(src.post_attention_layernorm.weight.float())
        drafter.norm.weight.data.copy_(target.model.norm.weight.float())


def drafter_config(target, args, mask_token_id):
    tc = target.config
    n_layers = tc.num_hidden_layers
    layer_ids = (
        [int(x) for x in args.target_layers.split(",")]
        if args.target_layers
        else default_target_layers(n_layers, args.draft_layers)
    )
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    rope_theta = getattr(tc, "rope_theta", None)
    if rope_theta is None:
        rope_theta = (getattr(tc, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    return {
        "architectures": ["DFlashDraftModel"],
        "model_type": "qwen3",
        "hidden_size": tc.hidden_size,
        "intermediate_size": tc.intermediate_size,
        "num_hidden_layers": args.draft_layers,
        "num_attention_heads": tc.num_attention_heads,
        "num_key_value_heads": tc.num_key_value_heads,
        "head_dim": head_dim,
        "rms_norm_eps": tc.rms_norm_eps,
        "rope_theta": float(rope_theta),
        "max_position_embeddings": tc.max_position_embeddings,
        "vocab_size": tc.vocab_size,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "num_target_layers": n_layers,
        "block_size": args.block_size,
        "dflash_config": {
            "target_layer_ids": layer_ids,
            "block_size": args.block_size,
            "mask_token_id": int(mask_token_id),
        },
    }


def export(drafter, out_dir, dtype):
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to(dtype).contiguous().cpu() for k, v in drafter.state_dict().items()}
    save_file(sd, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    cfg = dict(drafter.c)
    cfg["dtype"] = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=1) + "\n")


# --------------------------------------------------------------------------- data

def read_prompts(path):
    rows = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            rows.append(json.loads(line))
    return rows


def encode_prompt(tok, row):
    if "text" in row:
        text = row["text"]
    else:  # {"user": ...}: the tokenizer's chat template
        text = tok.apply_chat_template([{"role": "user", "content": row["user"]}], tokenize=False, add_generation_prompt=True)
    return tok(text + row.get("prefix", ""), add_special_tokens=False)["input_ids"]


def generate_texts(target, tok, texts, max_new, temp, device):
    """Continuations (token ids) of a batch of texts, left-padded."""
    enc = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    width = max(len(e) for e in enc)
    ids = torch.full((len(enc), width), pad, dtype=torch.long)
    att = torch.zeros((len(enc), width), dtype=torch.long)
    for j, e in enumerate(enc):
        ids[j, width - len(e) :] = torch.tensor(e)
        att[j, width - len(e) :] = 1
    kw = dict(max_new_tokens=max_new, pad_token_id=pad, eos_token_id=eos)
    kw.update(dict(do_sample=True, temperature=temp, top_p=1.0, top_k=0) if temp > 0 else dict(do_sample=False))
    res = target.generate(input_ids=ids.to(device), attention_mask=att.to(device), **kw).cpu()
    outs = []
    for j in range(len(enc)):
        new = res[j, width:].tolist()
        if eos in new:
            new = new[: new.index(eos) + 1]
        outs.append(new)
    return enc, outs


def verdict_texts(target, tok, rows, temp, device):
    """Verdict JSON the way kairos' grammar decodes it (fields in schema order,
    canonical JSON): each field's value is the target's own continuation,
    generated field by field and clipped to the schema."""
    import re

    texts = [r["text"] for r in rows]
    fields = rows[0]["fields"]
    for i, f in enumerate(fields):
        head = ("{" if i == 0 else ",") + json.dumps(f["name"]) + ":"
        kind = f["kind"]
        texts = [t + head + ('"' if kind in ("enum", "string") else "") for t in texts]
        budget = {"enum": 6, "number": 6, "integer": 6}.get(kind, min(48, max(4, f.get("max_chars", 120) // 3)))
        _, outs = generate_texts(target, tok, texts, budget, temp, device)
        for j, o in enumerate(outs):
            g = tok.decode(o, skip_special_tokens=True)
            if kind == "enum":
                vals = f["values"]
                got = g.split('"')[0]
                v = next((x for x in vals if got.startswith(x) or (got and x.startswith(got))), vals[0])
                texts[j] += v + '"'
            elif kind in ("number", "integer"):
                m = re.match(r"-?\d+(\.\d+)?", g.strip())
                x = float(m.group(0)) if m else (f["min"] + f["max"]) / 2
                x = min(max(x, f["min"]), f["max"])
                if kind == "integer":
                    texts[j] += str(int(round(x)))
                else:
                    d = f.get("decimals", 2)
                    v = f"{x:.{d}f}".rstrip("0").rstrip(".") if "." in f"{x:.{d}f}" else f"{x:.{d}f}"
                    texts[j] += v if v not in ("", "-0") else "0"
            else:
                v = g.split('"')[0].replace("\\", "")
                v = "".join(c for c in v if c >= " ")[: f.get("max_chars", 120)]
                texts[j] += v + '"'
    return [t + "}" for t in texts]


@torch.no_grad()
def cmd_gen(args):
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    device = args.device
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    target, tok = load_target(args.target, device, dtype)
    if args.target_quant:
        quantize_mlps(target, args.target_quant)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data_path = out / "data.pt"
    data = torch.load(data_path) if data_path.exists() else {"sequences": [], "prompt_lens": [], "kinds": []}
    prompts = read_prompts(args.prompts)
    temps = [float(t) for t in args.temperatures.split(",")]
    rng = random.Random(args.seed + len(data["sequences"]))
    batches = []  # one temperature per generate call
    groups = {}  # one verdict schema (or chat) per batch
    for r in prompts:
        groups.setdefault((r.get("kind", "chat"), r.get("source", "")), []).append(r)
    for temp in temps:
        for group in groups.values():
            rows = [r for _ in range(args.repeat) for r in group]
            rng.shuffle(rows)
            batches += [(rows[i : i + args.batch], temp) for i in range(0, len(rows), args.batch)]
    rng.shuffle(batches)
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    t0 = time.time()
    done = calls = 0
    for rows, temp in batches:
        if time.time() - t0 > args.minutes * 60:
            break
        if rows[0].get("fields"):  # verdicts: follow the schema as the grammar would
            full = verdict_texts(target, tok, rows, temp, device)
            for r, t in zip(rows, full):
                # Prompt and answer tokenized apart, as the engine appends decoded tokens to the prompt.
                p = tok(r["text"], add_special_tokens=False)["input_ids"][-args.max_prompt :]
                answer = tok(t[len(r["text"]) :], add_special_tokens=False)["input_ids"]
                data["sequences"].append(p + answer + [eos])
                data["prompt_lens"].append(len(p))
                data["kinds"].append("verdict")
            enc = rows
        else:
            texts = [r["text"] + r.get("prefix", "") if "text" in r else None for r in rows]
            texts = [t if t is not None else tok.apply_chat_template(
                [{"role": "user", "content": r["user"]}], tokenize=False, add_generation_prompt=True) for t, r in zip(texts, rows)]
            enc, outs = generate_texts(target, tok, texts, args.max_new_tokens, temp, device)
            for e, new in zip(enc, outs):
                e = e[-args.max_prompt :]
                data["sequences"].append(e + new)
                data["prompt_lens"].append(len(e))
                data["kinds"].append("chat")
        done += len(enc)
        calls += 1
        print(f"gen: {done} sequences in {time.time() - t0:.0f}s", flush=True)
        if calls % 10 == 0:  # keep what exists if the call is cut off
            torch.save(data, data_path)
    torch.save(data, data_path)
    print(f"gen: {len(data['sequences'])} sequences total in {data_path}")


# --------------------------------------------------------------------------- training

def make_batch(data, idx, args, mask_id, gen, device):
    """Token batch, anchors, block tokens/positions, labels and the block-sparse mask."""
    seqs = [data["sequences"][i][: args.max_len] for i in idx]
    plens = [min(data["prompt_lens"][i], len(s) - 2) for i, s in zip(idx, seqs)]
    b, L, B, K = len(seqs), max(len(s) for s in seqs), args.block_size, args.anchors
    ids = torch.zeros((b, L), dtype=torch.long)
    att = torch.zeros((b, L), dtype=torch.long)
    anchors = torch.zeros((b, K), dtype=torch.long)
    keep = torch.zeros((b, K), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        att[i, : len(s)] = 1
        lo, hi = max(plens[i] - 1, 0), len(s) - 2  # anchor a needs a label at a+1
        if hi >= lo:
            n = hi - lo + 1
            pick = torch.randperm(n, generator=gen)[:K] + lo if n >= K else torch.randint(lo, hi + 1, (K,), generator=gen)
            anchors[i] = pick
            keep[i] = True
    k = torch.arange(B)
    pos = anchors[:, :, None] + k  # [b, K, B]
    lab_pos = pos.clamp(max=L - 1)
    labels = torch.gather(ids, 1, lab_pos.view(b, -1)).view(b, K, B)
    valid = (pos < att.sum(1)[:, None, None]) & keep[:, :, None] & (k > 0)
    block = torch.full((b, K, B), mask_id, dtype=torch.long)
    block[:, :, 0] = torch.gather(ids, 1, anchors)
    # Mask [b, 1, K*B, L + K*B]: context strictly before the anchor, plus the own block.
    ctx_vis = torch.arange(L)[None, None, :] < anchors[:, :, None]  # [b, K, L]
    ctx_vis = ctx_vis[:, :, None, :].expand(b, K, B, L).reshape(b, K * B, L)
    blk = torch.arange(K)
    own = (blk[:, None, None, None] == blk[None, None, :, None]).expand(K, B, K, B).reshape(K * B, K * B)
    mask = torch.cat([ctx_vis, own[None].expand(b, -1, -1)], dim=2)[:, None]
    return {
        "ids": ids.to(device),
        "att": att.to(device),
        "block": block.view(b, K * B).to(device),
        "pos": pos.view(b, K * B).to(device),
        "labels": labels.view(b, K * B).to(device),
        "valid": valid.view(b, K * B).to(device),
        "mask": mask.to(device),
    }


def cmd_train(args):
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    device = args.device
    cuda = device.startswith("cuda")
    tdtype = torch.bfloat16 if cuda else torch.float32
    target, tok = load_target(args.target, device, tdtype)
    if args.target_quant:
        quantize_mlps(target, args.target_quant)
    if args.target_moe:
        e, k = (int(x) for x in args.target_moe.split(","))
        upcycle_target(target, e, k)
    data = torch.load(Path(args.data))
    out = Path(args.out)
    state_path = out / "train_state.pt"
    state = torch.load(state_path) if args.resume and state_path.exists() else None
    init = Path(args.init_drafter) if args.init_drafter and not state else None
    if state:
        cfg = state["config"]
    elif init:
        cfg = json.loads((init / "config.json").read_text())
        cfg.pop("dtype", None)
    else:
        mask_id = args.mask_token_id if args.mask_token_id >= 0 else pick_mask_token(tok, target.config.vocab_size)
        cfg = drafter_config(target, args, mask_id)
    B = cfg["dflash_config"]["block_size"]
    args.block_size = B
    mask_id = cfg["dflash_config"]["mask_token_id"]
    layer_ids = cfg["dflash_config"]["target_layer_ids"]
    drafter = Drafter(cfg).to(device)
    if state:
        drafter.load_state_dict(state["model"])
    elif init:
        from safetensors.torch import load_file

        drafter.load_state_dict({k: v.float() for k, v in load_file(str(init / "model.safetensors")).items()})
    elif args.init_from_target:
        init_from_target(drafter, target)
    opt = torch.optim.AdamW(drafter.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    if state:
        opt.load_state_dict(state["opt"])
    step0 = state["step"] if state else 0
    gamma = args.gamma if args.gamma > 0 else (7.0 if B >= 16 else 4.0)
    weights = torch.exp(-(torch.arange(B, device=device) - 1).clamp(min=0) / gamma)
    embed, head = target.get_input_embeddings(), target.get_output_embeddings()
    n = len(data["sequences"])
    gen = torch.Generator().manual_seed(args.seed + step0)
    print(f"train: {n} sequences, drafter {sum(p.numel() for p in drafter.parameters()) / 1e6:.2f}M params, "
          f"layers {layer_ids}, B={B}, gamma={gamma}, mask id {mask_id}", flush=True)
    t0, step = time.time(), step0
    budget = args.minutes * 60 - args.save_reserve_s
    hist = []
    while (args.max_steps <= 0 or step - step0 < args.max_steps) and time.time() - t0 < budget:
        frac = min((time.time() - t0) / max(budget, 1e-9), 1.0)
        warm = min(1.0, (step - step0 + 1) / args.warmup)
        lr = args.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, n, (args.batch,), generator=gen).tolist()
        bt = make_batch(data, idx, args, mask_id, gen, device)
        with torch.no_grad():
            o = target(input_ids=bt["ids"], attention_mask=bt["att"], output_hidden_states=True)
            feats = torch.cat([o.hidden_states[l + 1] for l in layer_ids], dim=-1).float()
            emb = embed(bt["block"]).float()
        feat_pos = torch.arange(feats.shape[1], device=device)[None].expand(feats.shape[0], -1)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            hid = drafter(emb, bt["pos"], feats, feat_pos, bt["mask"])
            logits = head(hid.to(head.weight.dtype)).float()
        w = weights.repeat(args.anchors)[None].expand_as(bt["valid"]) * bt["valid"]
        ce = F.cross_entropy(logits.view(-1, logits.shape[-1]), bt["labels"].view(-1), reduction="none").view_as(w)
        loss = (ce * w).sum() / w.sum().clamp(min=1e-6)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(drafter.parameters(), 1.0)
        opt.step()
        step += 1
        with torch.no_grad():
            hit = (logits.argmax(-1) == bt["labels"]) & bt["valid"]
            hit = hit.view(args.batch, args.anchors, B)[:, :, 1:]
            has = bt["valid"].view(args.batch, args.anchors, B)[:, :, 1]
            run = hit.int().cumprod(-1).sum(-1).float()  # accepted drafts per block
            tau = (1 + run[has]).mean().item() if has.any() else 0.0
            hist.append((loss.item(), tau))
        if step % args.log_every == 0:
            l_avg = sum(h[0] for h in hist) / len(hist)
            t_avg = sum(h[1] for h in hist) / len(hist)
            hist = []
            print(f"step {step} loss {l_avg:.3f} tau~{t_avg:.2f} lr {lr:.2e} {time.time() - t0:.0f}s", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"config": cfg, "model": drafter.state_dict(), "opt": opt.state_dict(), "step": step}, state_path)
    export(drafter, out / "drafter", torch.float32 if args.export_f32 else torch.bfloat16)
    print(f"train: {step} steps; drafter exported to {out / 'drafter'}")


@torch.no_grad()
def cmd_reference(args):
    """Drafter logits for one block, for kairos' cross-check test: the target
    reads prompt[:-1] (context), the block is [prompt[-1], mask...] at the
    next position."""
    from safetensors.torch import load_file

    target, tok = load_target(args.target, "cpu", torch.float32)
    if args.target_quant:
        quantize_mlps(target, args.target_quant)
    d = Path(args.drafter)
    cfg = json.loads((d / "config.json").read_text())
    drafter = Drafter(cfg)
    drafter.load_state_dict({k: v.float() for k, v in load_file(str(d / "model.safetensors")).items()})
    drafter.eval()
    ids = tok(args.prompt, add_special_tokens=False)["input_ids"]
    ctx_ids, first = ids[:-1], ids[-1]
    dc = cfg["dflash_config"]
    B = dc["block_size"]
    o = target(input_ids=torch.tensor([ctx_ids]), output_hidden_states=True)
    feats = torch.cat([o.hidden_states[l + 1] for l in dc["target_layer_ids"]], dim=-1)
    block = torch.tensor([[first] + [dc["mask_token_id"]] * (B - 1)])
    pos = torch.arange(len(ctx_ids), len(ctx_ids) + B)[None]
    mask = torch.ones((1, 1, B, len(ctx_ids) + B), dtype=torch.bool)
    hid = drafter(target.get_input_embeddings()(block), pos, feats, torch.arange(len(ctx_ids))[None], mask)
    logits = target.get_output_embeddings()(hid)[0, 1:]
    ref = {
        "prompt": args.prompt,
        "prompt_ids": ids,
        "argmax": logits.argmax(-1).tolist(),
        "logits": [[round(x, 6) for x in row] for row in logits.tolist()],
    }
    Path(args.out).write_text(json.dumps(ref) + "\n")
    print(f"reference: argmax {ref['argmax']} -> {args.out}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("gen", "train"):
        p = sub.add_parser(name)
        p.add_argument("--target", required=True, help="HF folder or .gguf file of the frozen target")
        p.add_argument("--out", required=True, help="output directory (data.pt, train_state.pt, drafter/)")
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--minutes", type=float, default=8.0, help="time budget of this call")
        p.add_argument("--target-quant", default="", help="mxfp4: MLP weights through MXFP4 (kairos' MoE experts)")
    g = sub.choices["gen"]
    g.add_argument("--prompts", required=True, help="JSONL prompt file")
    g.add_argument("--max-new-tokens", type=int, default=160)
    g.add_argument("--max-prompt", type=int, default=768)
    g.add_argument("--batch", type=int, default=64)
    g.add_argument("--repeat", type=int, default=1, help="passes over the prompt file")
    g.add_argument("--temperatures", default="0,0.8", help="comma list; each prompt is generated at each")
    t = sub.choices["train"]
    t.add_argument("--data", required=True, help="data.pt written by gen")
    t.add_argument("--draft-layers", type=int, default=3)
    t.add_argument("--target-layers", default="", help="comma list (default: evenly spaced 1..L-3)")
    t.add_argument("--block-size", type=int, default=16)
    t.add_argument("--gamma", type=float, default=0.0, help="loss decay (default 7 for B>=16, else 4)")
    t.add_argument("--mask-token-id", type=int, default=-1)
    t.add_argument("--batch", type=int, default=16)
    t.add_argument("--anchors", type=int, default=16, help="blocks per sequence per step")
    t.add_argument("--max-len", type=int, default=640)
    t.add_argument("--lr", type=float, default=6e-4)
    t.add_argument("--warmup", type=int, default=50)
    t.add_argument("--max-steps", type=int, default=0, help="0 = until the time budget")
    t.add_argument("--log-every", type=int, default=25)
    t.add_argument("--save-reserve-s", type=float, default=30.0)
    t.add_argument("--resume", action="store_true", help="continue from OUT/train_state.pt")
    t.add_argument("--no-init-from-target", dest="init_from_target", action="store_false")
    t.add_argument("--export-f32", action="store_true", help="export float32 instead of bfloat16")
    t.add_argument("--init-drafter", default="", help="exported drafter folder to start from")
    t.add_argument("--target-moe", default="", help="E,K: upcycle the target to MoE first (same hidden states)")
    r = sub.add_parser("reference", help="drafter logits of one block (kairos cross-check fixture)")
    r.add_argument("--target", required=True)
    r.add_argument("--drafter", required=True, help="exported drafter folder")
    r.add_argument("--prompt", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--target-quant", default="", help="mxfp4: the target's MLP weights through MXFP4")
    args = ap.parse_args()
    {"gen": cmd_gen, "train": cmd_train, "reference": cmd_reference}[args.cmd](args)


if __name__ == "__main__":
    main()
