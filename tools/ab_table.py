#!/usr/bin/env python3
"""A/B table of `kairos bench decode` JSON files: graph-only ms per step, "run 1 / run 2" per variant.

Usage: tools/ab_table.py DIR PREFIX VARIANT... reads DIR/PREFIX_VARIANT_r{1,2}.json (the device scripts' naming)."""
import json,sys,glob,collections

d,prefix=sys.argv[1],sys.argv[2]; vs=sys.argv[3:]
cells=collections.OrderedDict()
for v in vs:
    for r in (1,2):
        f=f'{d}/{prefix}_{v}_r{r}.json'
        try: j=json.load(open(f))
        except FileNotFoundError: continue
        for row in j['rows']:
            k=(row['shape'],row['batch'],row['context'])
            cells.setdefault(k,{}).setdefault(v,[]).append(row['graph_step_ms'])
print('| shape | b | ctx | '+' | '.join(vs)+' |')
print('| --- | --- | --- | '+' | '.join('---' for _ in vs)+' |')
for k,c in cells.items():
    print(f'| {k[0]} | {k[1]} | {k[2]} | '+' | '.join(' / '.join('%.3f'%x for x in c.get(v,[])) or '-' for v in vs)+' |')
