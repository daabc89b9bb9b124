#!/usr/bin/env python3
"""A/B table of `kairos bench decode` JSON files: graph-only ms per step, "run 1 / run 2 / ..." per variant.

Usage: tools/ab_table.py DIR PREFIX VARIANT...   reads DIR/PREFIX_VARIANT_r<N>.json (older device scripts' naming)
       tools/ab_table.py FILE.json VARIANT...    reads the runs merged as {"VARIANT_r<N>": run} (scripts/device_ab.sh)"""
import collections
import glob
import json
import os
import re
import sys


def runs_of(args):
    """(variants, {variant: [run, ...] in run order})"""
    if args[0].endswith(".json") and os.path.isfile(args[0]):
        with open(args[0]) as f:
            merged = json.load(f)
        vs = args[1:]
        keyed = {v: sorted((k for k in merged if re.fullmatch(re.escape(v) + r"_r\d+", k)), key=lambda k: int(k.rsplit("_r", 1)[1])) for v in vs}
        return vs, {v: [merged[k] for k in keyed[v]] for v in vs}
    d, prefix, vs = args[0], args[1], args[2:]
    out = {}
    for v in vs:
        files = sorted(glob.glob(f"{d}/{prefix}_{v}_r*.json"), key=lambda p: int(p.rsplit("_r", 1)[1][:-5]))
        out[v] = []
        for p in files:
            with open(p) as f:
                out[v].append(json.load(f))
    return vs, out


def main(args):
    vs, runs = runs_of(args)
    cells = collections.OrderedDict()
    for v in vs:
        for j in runs[v]:
            for row in j["rows"]:
                k = (row["shape"], row["batch"], row["context"])
                cells.setdefault(k, {}).setdefault(v, []).append(row["graph_step_ms"])
    print("| shape | b | ctx | " + " | ".join(vs) + " |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in vs) + " |")
    for k, c in cells.items():
        print(f"| {k[0]} | {k[1]} | {k[2]} | " + " | ".join(" / ".join("%.3f" % x for x in c.get(v, [])) or "-" for v in vs) + " |")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1:])
