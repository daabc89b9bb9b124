#!/usr/bin/env python3
"""Merges JSON files into one, keyed by file name without ".json": {"<stem>": contents}.
The device scripts write their runs to /tmp and send back only the merge (a device call returns
at most 8 files); tools/ab_table.py and tools/ablation_table.py read such merges.

usage: tools/merge_runs.py DIR PATTERN OUT.json   (e.g. /tmp/ab/x '*_r*.json' $OUT/x_h100.json)"""
import glob
import json
import os
import sys


def main(d, pattern, out):
    runs = {}
    for p in sorted(glob.glob(os.path.join(d, pattern))):
        with open(p) as f:
            runs[os.path.basename(p)[: -len(".json")]] = json.load(f)
    with open(out, "w") as f:
        json.dump(runs, f)


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(*sys.argv[1:])
