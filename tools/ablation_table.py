#!/usr/bin/env python3
"""Where a decode step's time goes inside the CUDA graph, from an ablation run
(scripts/ablate_decode.sh): for each kernel, the graph-only step time with that kernel
skipped (KAIROS_CUDA_SKIP), its marginal cost (base minus skipped) per step and per layer.

usage: tools/ablation_table.py DIR    (abl_<shape>_base.json, abl_<shape>_skip_<kernel>.json)
       tools/ablation_table.py FILE   (those runs merged by tools/merge_runs.py, as
                                       scripts/ablate_decode.sh writes them, or keyed
                                       {shape: {"base" | "skip_<kernel>": run}}, e.g.
                                       bench/results/cuda_ablation_h200_s12.json)
"""
import glob
import json
import os
import sys

LAYERS = {"qwen3-30b-a3b": 48, "gpt-oss-20b": 24, "smollm2-135m": 30}


def rows(run):
    return {(r["batch"], r["context"]): r["graph_step_ms"] for r in run["rows"]}


def split(stem):
    """abl_<shape>_base / abl_<shape>_skip_<kernel> -> (shape, "base" | "skip_<kernel>")"""
    name = stem[len("abl_"):]
    shape, sep, kernel = name.partition("_skip_")
    return (shape, "skip_" + kernel) if sep else (name[: -len("_base")], "base")


def load(path):
    """{shape: {label: run}} from a directory of runs, their merge (tools/merge_runs.py), or an
    older merge already keyed by shape."""
    if os.path.isfile(path):
        with open(path) as f:
            merged = json.load(f)
        if not all(k.startswith("abl_") for k in merged):
            return merged
    else:
        merged = {}
        for p in glob.glob(os.path.join(path, "abl_*.json")):
            with open(p) as f:
                merged[os.path.basename(p)[: -len(".json")]] = json.load(f)
    runs = {}
    for stem, run in merged.items():
        shape, label = split(stem)
        runs.setdefault(shape, {})[label] = run
    return runs


def main(path):
    for shape, runs in sorted(load(path).items()):
        if "base" not in runs:
            continue
        base = rows(runs["base"])
        keys = sorted(base)
        n_layers = LAYERS.get(shape)
        print(f"\n{shape} (graph-only ms; marginal = base - skipped; per layer = marginal / {n_layers} layers)\n")
        head = " | ".join(f"b{b} ctx {c}: ms, marginal ms, µs/layer" for b, c in keys)
        print(f"| kernel skipped | {head} |")
        print("| --- | " + " | ".join("---" for _ in keys) + " |")
        print("| (none) | " + " | ".join(f"{base[k]:.3f}" for k in keys) + " |")
        skips = []
        for label, run in runs.items():
            if label.startswith("skip_"):
                r = rows(run)
                skips.append((base[keys[0]] - r[keys[0]], label[len("skip_"):], r))
        for _, name, r in sorted(skips, reverse=True):
            cells = []
            for k in keys:
                m = base[k] - r[k]
                per = f", {m * 1e3 / n_layers:.1f}" if n_layers else ""
                cells.append(f"{r[k]:.3f}, {m:+.3f}{per}")
            print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".")
