#!/usr/bin/env python3
"""Golden-fixture generator for kairos.

Regenerate everything (from the repo root):

    pip install -r tools/requirements-fixtures.txt
    python tools/make_fixtures.py            # all fixtures
    python tools/make_fixtures.py --only tiny    # tiny random models only
    python tools/make_fixtures.py --only smollm2 # SmolLM2 GGUF reference only

Everything is CPU float32, eager attention, fixed seeds, 1 torch thread.
See tools/FIXTURES.md for what is produced and the schema.
"""

import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np
import torch
import transformers
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer

transformers.utils.logging.disable_progress_bar()
torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

REPO = Path(__file__).resolve().parent.parent
FIX = REPO / "tests" / "fixtures"
TOK_DIR = FIX / "tokenizer"
GPL = Path("/usr/share/common-licenses/GPL-3")
SMOL_GGUF = REPO / "models" / "cache" / "SmolLM2-135M-Instruct.Q4_1.gguf"

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 (as in SmolLM2)
BOS_ID, EOS_ID, PAD_ID = 1, 2, 2

# SmolLM2-135M-Instruct's chat template (identical to tokenizer.chat_template in its GGUF).
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TINY_CASES = [
    {"prompt": "The quick brown fox jumps over the lazy dog because", "chat": False},
    {"prompt": "This program is free software: you can redistribute it", "chat": False},
    {"prompt": "Hello! Who are you?", "chat": True},
]

SMOL_CASES = [
    {"prompt": "The capital of France is", "chat": False},
    {"prompt": "def fibonacci(n):\n    ", "chat": False},
    {"prompt": "1, 2, 3, 4, 5, 6,", "chat": False},
    {"prompt": "What is 2+2?", "chat": True},
    {"prompt": "Write a haiku about the sea.", "chat": True},
    {
        "prompt": "You are a fraud analyst. Transaction: $4,999.99 wire transfer to a new overseas account at 3am, "
        "customer's first international transfer. Answer with exactly one word, FRAUD or LEGIT.",
        "chat": True,
    },
]

TOKENIZE_CASES = [
    "12345",
    "3.14159 and 1,000,000",
    "Hello world",
    " Hello world",
    "  leading and trailing spaces  ",
    "line one\nline two\n\nline four",
    "tabs\tand\r\nwindows newlines",
    "café naïve 日本",
    "emoji: 😀👍🏽 🚀",
    "def main():\n    print(\"hi\")  # comment\n",
    "fn add(a: i32, b: i32) -> i32 { a + b }",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>",
    "don't won't it's we're I'm",
    "HTTP/1.1 200 OK; x=y&z=%20",
    "ÀÉÎÕÜ ß ñ ø",
    "Привет, мир!",
    "a" * 40,
    "   ",
    "",
]


_NUM_ARRAY = re.compile(r"\[\s*(-?[0-9][^\[\]{}\"]*?)\s*\]", re.S)


def jdump(obj, path):
    """Pretty JSON, but arrays of plain numbers / [id, logit] pairs on one line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(obj, indent=1, ensure_ascii=False)
    text = _NUM_ARRAY.sub(lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text)
    json.loads(text)  # sanity
    with open(path, "w") as f:
        f.write(text + "\n")


def f32list(t):
    return [float(x) for x in t.detach().to(torch.float32).cpu().numpy().tolist()]


# --------------------------------------------------------------------------- tokenizer


def build_tokenizer():
    text = GPL.read_text(encoding="utf-8")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        min_frequency=2,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
    TOK_DIR.mkdir(parents=True, exist_ok=True)
    tok.save(str(TOK_DIR / "tokenizer.json"), pretty=True)
    added = {
        str(i): {
            "content": s,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, s in enumerate(SPECIALS)
    }
    cfg = {
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": "<|im_start|>",
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "model_max_length": 8192,
        "pad_token": "<|im_end|>",
        "tokenizer_class": "GPT2Tokenizer",
        "unk_token": "<|endoftext|>",
        "vocab_size": tok.get_vocab_size(),
    }
    jdump(cfg, TOK_DIR / "tokenizer_config.json")
    return tok.get_vocab_size()


def copy_tokenizer(dst):
    for n in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(TOK_DIR / n, dst / n)


# --------------------------------------------------------------------------- tiny models


def base_kwargs(vocab):
    return dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )


def family_configs(vocab):
    from transformers import (
        GptOssConfig,
        LlamaConfig,
        MixtralConfig,
        Qwen2Config,
        Qwen3Config,
        Qwen3MoeConfig,
    )

    b = base_kwargs(vocab)
    out = {}
    out["llama"] = LlamaConfig(
        **{**b, "num_hidden_layers": 3}, rope_theta=10000.0, tie_word_embeddings=False, attention_bias=False
    )
    out["qwen2"] = Qwen2Config(**b, rope_theta=1000000.0, tie_word_embeddings=True, use_sliding_window=False)
    out["qwen3"] = Qwen3Config(**b, rope_theta=1000000.0, tie_word_embeddings=True, attention_bias=False)
    out["qwen3_moe"] = Qwen3MoeConfig(
        **{**b, "num_hidden_layers": 3},
        rope_theta=1000000.0,
        tie_word_embeddings=False,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=64,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[1],
    )
    out["mixtral"] = MixtralConfig(
        **b, rope_theta=1000000.0, tie_word_embeddings=False, num_local_experts=4, num_experts_per_tok=2
    )
    out["gpt_oss"] = GptOssConfig(
        **{**b, "intermediate_size": 64, "num_hidden_layers": 3},
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 150000.0,
            "factor": 32.0,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "truncate": False,
            "original_max_position_embeddings": 4096,
        },
        attention_bias=True,
        tie_word_embeddings=False,
        swiglu_limit=7.0,
    )
    return out


@torch.no_grad()
def randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        shape = p.shape
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            v = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif name.endswith("sinks"):
            v = 0.5 * torch.randn(shape, generator=g)
        elif name.endswith("bias"):
            v = 0.1 * torch.randn(shape, generator=g)
        elif "embed_tokens" in name:
            v = 0.3 * torch.randn(shape, generator=g)
        else:
            v = 0.15 * torch.randn(shape, generator=g)
        p.copy_(v.to(p.dtype))


# ---- MXFP4 (OCP microscaling, E2M1 elements, E8M0 scale per 32 elements) ----

FP4_VALUES = torch.tensor(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=torch.float32
)


def mxfp4_quantize(w):
    """w: [..., K] float32 with K % 32 == 0, quantized along the last dim.
    Returns (blocks u8 [..., K/32, 16], scales u8 [..., K/32], dequantized float32 [..., K])."""
    *pre, K = w.shape
    x = w.reshape(*pre, K // 32, 32).to(torch.float32)
    amax = x.abs().amax(dim=-1, keepdim=True)
    # shared exponent: floor(log2(amax)) - 2  (E2M1 max = 6 = 1.5 * 2^2)
    e = torch.floor(torch.log2(torch.where(amax > 0, amax, torch.ones_like(amax)))) - 2
    e = e.clamp(-127, 127)
    y = x / torch.pow(2.0, e)
    mags = FP4_VALUES[:8]
    idx = (y.abs().unsqueeze(-1) - mags).abs().argmin(dim=-1)  # ties -> smaller magnitude (first)
    neg = (y < 0) & (idx > 0)
    codes = (idx + 8 * neg.to(idx.dtype)).to(torch.uint8)
    deq = torch.ldexp(FP4_VALUES[codes.long()], e.to(torch.int32))
    lo = codes[..., 0::2]
    hi = codes[..., 1::2]
    blocks = (lo | (hi << 4)).to(torch.uint8)  # low nibble = even element
    scales = (e.squeeze(-1) + 127).to(torch.uint8)
    return blocks.contiguous(), scales.contiguous(), deq.reshape(*pre, K)


def mxfp4_dequant_like_transformers(blocks, scales):
    """Mirror of transformers.integrations.mxfp4._convert_moe_packed_tensors (float32)."""
    lut = FP4_VALUES
    *prefix, G, B = blocks.shape
    b = blocks.reshape(-1, B)
    s = scales.to(torch.int32).reshape(-1, 1) - 127
    out = torch.empty(b.shape[0], B * 2)
    out[:, 0::2] = lut[(b & 0x0F).long()]
    out[:, 1::2] = lut[(b >> 4).long()]
    out = torch.ldexp(out, s)
    out = out.reshape(*prefix, G * B * 2)
    return out.transpose(1, 2).contiguous()


@torch.no_grad()
def make_gpt_oss_mxfp4_representable(model):
    """Replace expert weights by their MXFP4-dequantized values; return packed tensors per layer."""
    packed = {}
    for i, layer in enumerate(model.model.layers):
        ex = layer.mlp.experts
        # gate_up_proj: [E, H, 2I] (in, out); checkpoint blocks are [E, 2I, H/32, 16] -> quantize along H
        gu_t = ex.gate_up_proj.data.transpose(1, 2).contiguous()  # [E, 2I, H]
        gb, gs, gdq = mxfp4_quantize(gu_t)
        ex.gate_up_proj.data.copy_(gdq.transpose(1, 2))
        dn_t = ex.down_proj.data.transpose(1, 2).contiguous()  # down_proj [E, I, H] -> [E, H, I]
        db, ds, ddq = mxfp4_quantize(dn_t)
        ex.down_proj.data.copy_(ddq.transpose(1, 2))
        # self-check against transformers' own dequantizer semantics
        assert torch.equal(mxfp4_dequant_like_transformers(gb, gs), ex.gate_up_proj.data)
        assert torch.equal(mxfp4_dequant_like_transformers(db, ds), ex.down_proj.data)
        p = f"model.layers.{i}.mlp.experts."
        packed[p + "gate_up_proj_blocks"] = gb
        packed[p + "gate_up_proj_scales"] = gs
        packed[p + "down_proj_blocks"] = db
        packed[p + "down_proj_scales"] = ds
    return packed


def legacy_config(cfg_dict, family):
    """Rewrite a transformers-5 config.json into the key style of the real Hub checkpoints
    (rope_theta / rope_scaling at top level, qwen3_moe num_experts)."""
    d = dict(cfg_dict)
    rp = d.pop("rope_parameters", None)
    if rp is not None:
        rp = dict(rp)
        d["rope_theta"] = rp.pop("rope_theta")
        if rp.get("rope_type", "default") == "default":
            d["rope_scaling"] = None
        else:
            d["rope_scaling"] = rp
    if family == "qwen3_moe" and "num_local_experts" in d:
        d["num_experts"] = d.pop("num_local_experts")
    return dict(sorted(d.items()))


def encode_case(tok, case):
    if case["chat"]:
        rendered = tok.apply_chat_template(
            [{"role": "user", "content": case["prompt"]}], add_generation_prompt=True, tokenize=False
        )
        ids = tok(rendered, add_special_tokens=False)["input_ids"]
        return rendered, ids
    return case["prompt"], tok(case["prompt"])["input_ids"]


@torch.no_grad()
def run_cases(model, tok, cases, max_new, top_k_logits=None):
    out = []
    for case in cases:
        rendered, ids = encode_case(tok, case)
        inp = torch.tensor([ids], dtype=torch.long)
        logits = model(inp).logits[0, -1].to(torch.float32)
        gen = model.generate(
            inp,
            attention_mask=torch.ones_like(inp),
            do_sample=False,
            max_new_tokens=max_new,
            eos_token_id=model.generation_config.eos_token_id,
            pad_token_id=model.generation_config.pad_token_id,
            return_dict_in_generate=True,
            output_logits=True,
        )
        new = gen.sequences[0, len(ids):].tolist()
        margins = []
        for step_logits in gen.logits:
            t2 = torch.topk(step_logits[0].to(torch.float32), 2).values
            margins.append(float(t2[0] - t2[1]))
        # generate pads after eos in batched mode only; for batch 1 it stops at eos (inclusive)
        rec = {"prompt": case["prompt"], "chat": case["chat"]}
        if case["chat"]:
            rec["rendered"] = rendered
        rec["prompt_ids"] = ids
        rec["greedy_ids"] = new
        # top1 - top2 logit gap at each greedy step (small gap => fragile under float noise)
        rec["greedy_margins"] = [round(m, 6) for m in margins]
        if top_k_logits is None:
            rec["first_logits"] = f32list(logits)
        else:
            v, i = torch.topk(logits, top_k_logits)
            rec["first_top_logits"] = [[int(a), float(b)] for a, b in zip(i.tolist(), v.tolist())]
            rec["greedy_text"] = tok.decode(new, skip_special_tokens=False)
        out.append(rec)
    return out


def versions():
    return {"transformers_version": transformers.__version__, "torch_version": torch.__version__.split("+")[0]}


def write_reference(folder, tok, cases_out, extra=None):
    ref = {**versions(), "dtype": "float32", "attn_implementation": "eager"}
    if extra:
        ref.update(extra)
    ref["cases"] = cases_out
    jdump(ref, folder / "reference.json")


def load_folder(folder, **kw):
    m = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager", **kw
    )
    m.eval()
    return m


def generation_config_json():
    return {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}


@torch.no_grad()
def make_tiny(vocab):
    cfgs = family_configs(vocab)
    tok = AutoTokenizer.from_pretrained(TOK_DIR)
    assert len(tok) == vocab, (len(tok), vocab)
    seeds = {"llama": 1, "qwen2": 2, "qwen3": 3, "qwen3_moe": 4, "mixtral": 5, "gpt_oss": 6}
    for fam, cfg in cfgs.items():
        torch.manual_seed(seeds[fam])
        model = AutoModelForCausalLM.from_config(
            cfg, attn_implementation="eager", experts_implementation="eager", dtype=torch.float32
        )
        model.eval()
        randomize(model, seeds[fam])
        packed = None
        if fam == "gpt_oss":
            packed = make_gpt_oss_mxfp4_representable(model)
        folder = FIX / fam
        if folder.exists():
            shutil.rmtree(folder)
        model.save_pretrained(folder)
        # config.json: real-Hub key style for all but gpt_oss (keeps transformers-5 `rope_parameters` style)
        cfg_d = json.load(open(folder / "config.json"))
        cfg_d.pop("transformers_version", None)
        if fam != "gpt_oss":
            cfg_d = legacy_config(cfg_d, fam)
        jdump(cfg_d, folder / "config.json")
        jdump(generation_config_json(), folder / "generation_config.json")
        copy_tokenizer(folder)
        ref_model = load_folder(folder)
        # reloaded model must be bit-identical to the in-memory one
        probe = torch.tensor([[5, 17, 99, 3, 250, 7, 8, 9]])
        assert torch.equal(ref_model(probe).logits, model(probe).logits), fam
        if hasattr(ref_model.config, "_experts_implementation"):
            assert ref_model.config._experts_implementation in (None, "eager"), ref_model.config._experts_implementation
        cases = run_cases(ref_model, tok, TINY_CASES, 16)
        write_reference(folder, tok, cases)
        print(f"[tiny] {fam}: {[c['greedy_ids'][:4] for c in cases]}", flush=True)

        if fam == "llama":
            sh = FIX / "llama_sharded"
            if sh.exists():
                shutil.rmtree(sh)
            total = sum(p.numel() * p.element_size() for p in ref_model.state_dict().values())
            ref_model.save_pretrained(sh, max_shard_size=int(total * 0.6))
            cfg2 = json.load(open(sh / "config.json"))
            cfg2.pop("transformers_version", None)  # keeps transformers-5 rope_parameters style
            jdump(cfg2, sh / "config.json")
            jdump(generation_config_json(), sh / "generation_config.json")
            copy_tokenizer(sh)
            shards = sorted(p.name for p in sh.glob("model-*.safetensors"))
            assert shards == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"], shards
            m2 = load_folder(sh)
            assert torch.equal(m2(probe).logits, model(probe).logits)
            write_reference(sh, tok, run_cases(m2, tok, TINY_CASES, 16))

        if fam == "gpt_oss":
            make_gpt_oss_mxfp4(folder, packed, tok, probe, model)


def make_gpt_oss_mxfp4(float_folder, packed, tok, probe, model):
    dst = FIX / "gpt_oss_mxfp4"
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    sd = load_file(str(float_folder / "model.safetensors"))
    for k in list(sd):
        if k.endswith("mlp.experts.gate_up_proj") or k.endswith("mlp.experts.down_proj"):
            del sd[k]
    sd.update(packed)
    sd = {k: sd[k].contiguous() for k in sorted(sd)}
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.load(open(float_folder / "config.json"))
    cfg = legacy_config(cfg, "gpt_oss")
    cfg.pop("swiglu_alpha", None)  # real gpt-oss config has no swiglu_alpha (1.702 hard-coded)
    cfg.pop("dtype", None)
    cfg["experts_per_token"] = cfg["num_experts_per_tok"]
    cfg["initial_context_length"] = 4096
    cfg["quantization_config"] = {
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
        "quant_method": "mxfp4",
    }
    jdump(dict(sorted(cfg.items())), dst / "config.json")
    jdump(generation_config_json(), dst / "generation_config.json")
    copy_tokenizer(dst)
    shutil.copyfile(float_folder / "reference.json", dst / "reference.json")
    # Verify transformers' own MXFP4 loader (dequantize path on CPU) reproduces the float model exactly.
    try:
        from transformers import Mxfp4Config

        m = load_folder(dst, quantization_config=Mxfp4Config(dequantize=True))
        ok = torch.equal(m(probe).logits, model(probe).logits)
        print(f"[tiny] gpt_oss_mxfp4: transformers dequantized load bit-exact = {ok}", flush=True)
        assert ok
    except AssertionError:
        raise
    except Exception as e:  # pragma: no cover - informative only
        print(f"[tiny] gpt_oss_mxfp4: could not verify with transformers loader: {e!r}", flush=True)


# --------------------------------------------------------------------------- SmolLM2 (real GGUF)


@torch.no_grad()
def make_smollm2():
    if not SMOL_GGUF.exists():
        print(f"[smollm2] missing {SMOL_GGUF}; see tools/FIXTURES.md", file=sys.stderr)
        return
    d, name = str(SMOL_GGUF.parent), SMOL_GGUF.name
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(
        d, gguf_file=name, dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    cases = run_cases(model, tok, SMOL_CASES, 32, top_k_logits=20)
    gc = model.generation_config
    extra = {
        "source": "models/cache/SmolLM2-135M-Instruct.Q4_1.gguf (transformers GGUF loader, dequantized to float32)",
        "eos_token_id": gc.eos_token_id,
        "pad_token_id": gc.pad_token_id,
        "bos_token_id": gc.bos_token_id,
    }
    write_reference(FIX, tok, cases, extra)
    os.replace(FIX / "reference.json", FIX / "smollm2_reference.json")
    for c in cases:
        print(f"[smollm2] {c['prompt'][:30]!r} -> {c['greedy_text'][:60]!r}", flush=True)

    # --- tokenizer summary
    tj = json.loads(tok.backend_tokenizer.to_str())
    mdl = tj["model"]
    summary = {
        **versions(),
        "normalizer": tj.get("normalizer"),
        "pre_tokenizer": tj.get("pre_tokenizer"),
        "post_processor": tj.get("post_processor"),
        "decoder": tj.get("decoder"),
        "added_tokens": tj.get("added_tokens"),
        "model": {k: v for k, v in mdl.items() if k not in ("vocab", "merges")},
        "vocab_size": len(mdl["vocab"]),
        "num_merges": len(mdl["merges"]),
        "special_tokens": {
            "bos_token": tok.bos_token,
            "eos_token": tok.eos_token,
            "pad_token": tok.pad_token,
            "unk_token": tok.unk_token,
        },
        "tokenizer_class": type(tok).__name__,
        "chat_template": tok.chat_template,
        "tokenize_cases": [],
    }
    for s in TOKENIZE_CASES:
        with_sp = tok(s)["input_ids"]
        no_sp = tok(s, add_special_tokens=False)["input_ids"]
        summary["tokenize_cases"].append(
            {
                "text": s,
                "ids": with_sp,
                "ids_no_special": no_sp,
                "tokens": tok.convert_ids_to_tokens(no_sp),
                "decoded": tok.decode(no_sp),
            }
        )
    # --- checks on the GGUF -> float32 conversion (informative, recorded in the summary)
    summary["gguf_checks"] = gguf_checks(model)
    jdump(summary, FIX / "smollm2_tokenizer_summary.json")


def gguf_checks(model):
    import gguf

    r = gguf.GGUFReader(str(SMOL_GGUF))
    tensors = {t.name: t for t in r.tensors}
    res = {}
    sd = model.state_dict()
    n_head, n_kv = model.config.num_attention_heads, model.config.num_key_value_heads

    def deq(name):
        t = tensors[name]
        a = gguf.dequantize(t.data, t.tensor_type)
        return torch.from_numpy(np.array(a, dtype=np.float32, copy=True)), t.tensor_type.name

    def permute(w, nh):  # llama.cpp convert_hf_to_gguf permute (HF -> GGUF)
        return w.reshape(nh, 2, w.shape[0] // nh // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    q, qt = deq("blk.0.attn_q.weight")
    k, kt = deq("blk.0.attn_k.weight")
    v, vt = deq("blk.0.attn_v.weight")
    hq = sd["model.layers.0.self_attn.q_proj.weight"]
    hk = sd["model.layers.0.self_attn.k_proj.weight"]
    hv = sd["model.layers.0.self_attn.v_proj.weight"]
    res["blk.0.attn_q.weight_type"] = qt
    res["q_equal_without_unpermute"] = bool(torch.equal(q, hq))
    res["q_equal_after_hf_to_gguf_permute(hf_q)"] = bool(torch.equal(q, permute(hq, n_head)))
    res["k_equal_after_hf_to_gguf_permute(hf_k)"] = bool(torch.equal(k, permute(hk, n_kv)))
    res["v_equal_exact"] = bool(torch.equal(v, hv))
    e, et = deq("token_embd.weight")
    res["token_embd.weight_type"] = et
    res["embed_equal_exact"] = bool(torch.equal(e, sd["model.embed_tokens.weight"]))
    res["lm_head_tied"] = "output.weight" not in tensors
    res["tie_word_embeddings"] = bool(model.config.tie_word_embeddings)
    n, nt = deq("blk.0.attn_norm.weight")
    res["attn_norm_type"] = nt
    res["norm_equal_exact"] = bool(torch.equal(n, sd["model.layers.0.input_layernorm.weight"]))
    res["config"] = {
        k: getattr(model.config, k, None)
        for k in (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "rms_norm_eps",
            "max_position_embeddings",
            "rope_parameters",
            "vocab_size",
        )
    }
    res["note"] = (
        "Q4_1 dequant in gguf-py: f32(d)*q + f32(m) as two separate float32 ops (no FMA). "
        "transformers un-permutes attn_q/attn_k (reverse of llama.cpp permute) so HF uses rotate-half RoPE."
    )
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["tiny", "smollm2"], default=None)
    args = ap.parse_args()
    FIX.mkdir(parents=True, exist_ok=True)
    if args.only in (None, "tiny"):
        vocab = build_tokenizer()
        print(f"[tok] vocab={vocab}", flush=True)
        make_tiny(vocab)
    if args.only in (None, "smollm2"):
        make_smollm2()


if __name__ == "__main__":
    main()
