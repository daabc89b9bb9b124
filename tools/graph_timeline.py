#!/usr/bin/env python3
"""Where a decode step's time goes inside the CUDA graph, from an Nsight Systems trace taken
with graph nodes traced (`nsys profile --trace=cuda --cuda-graph-trace=node kairos bench
decode ...`, then `nsys stats --report cuda_gpu_trace --format csv`).

A step is the kernels from one `argmax_final` to the next. Unlike an ablation, nothing is
removed: every kernel keeps its PDL overlap. For each kernel of a step:
  share = its end - the previous kernel's end   (what it adds to the step; shares sum to it)
  early = the previous kernel's end - its start (how long it ran beside the kernel before,
          i.e. its blocks' work before the PDL wait; <= 0: it started after)
The table sums these per kernel name over a step (per layer where the kernel runs once per
layer), over the steps of the fastest kind (the graph replays, not the eager warm-up).

usage: tools/graph_timeline.py TRACE.csv[.xz] [LAYERS]
"""
import csv
import io
import lzma
import statistics
import sys
from collections import defaultdict


def rows(path):
    opener = lzma.open if path.endswith(".xz") else open
    with opener(path, "rt") as f:
        text = f.read()
    # nsys stats prints a title line before the header on some versions
    start = text.find('"Start')
    if start < 0:
        start = text.find("Start")
    for r in csv.DictReader(io.StringIO(text[start:])):
        name = r.get("Name", "")
        if name.startswith("[CUDA"):
            continue
        yield int(float(r["Start (ns)"])), int(float(r["Duration (ns)"])), name


def steps(kernels):
    """Runs of kernels, each ending with argmax_final."""
    cur = []
    for k in kernels:
        cur.append(k)
        if k[2].startswith("argmax_final"):
            yield cur
            cur = []


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    layers = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    ks = sorted(rows(sys.argv[1]))
    all_steps = [s for s in steps(ks) if len(s) > 2]
    if not all_steps:
        sys.exit("no step (no argmax_final kernel) in the trace")
    # steps with the most common kernel sequence, then the faster half of them
    seqs = defaultdict(list)
    for s in all_steps:
        seqs[tuple(k[2] for k in s)].append(s)
    common = max(seqs.values(), key=len)
    walls = sorted((s[-1][0] + s[-1][1] - (s[0][0] + s[0][1]), i) for i, s in enumerate(common))
    chosen = [common[i] for _, i in walls[: max(1, len(walls) // 2)]]
    share, early, dur, count = defaultdict(float), defaultdict(float), defaultdict(float), defaultdict(int)
    for s in chosen:
        for prev, k in zip(s, s[1:]):
            name = k[2].split("(")[0]
            prev_end = prev[0] + prev[1]
            share[name] += (k[0] + k[1] - prev_end) / 1e3
            early[name] += (prev_end - k[0]) / 1e3
            dur[name] += k[1] / 1e3
            count[name] += 1
    n = len(chosen)
    wall = statistics.median(w for w, _ in walls[: len(chosen)]) / 1e3
    print(f"{n} steps of {len(common[0])} kernels (of {len(all_steps)} traced), step {wall:.1f} us "
          f"(first kernel's end to argmax_final's end); per step, and per layer over {layers} layers")
    print("| kernel | launches / step | share us / step | share us / layer | duration us / launch | early us / launch |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in sorted(share, key=lambda x: -share[x]):
        c = count[name] / n
        print(f"| {name} | {c:g} | {share[name] / n:.1f} | {share[name] / n / layers:.2f} | "
              f"{dur[name] / count[name]:.2f} | {early[name] / count[name]:.2f} |")


if __name__ == "__main__":
    main()
