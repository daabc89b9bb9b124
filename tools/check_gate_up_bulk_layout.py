#!/usr/bin/env python3
"""Checks the bulk gate/up's copy layout (kernels/moe_q8.cu, gate_up_q8_bulk_impl) by address
arithmetic, without a GPU: every weight block and scale byte a warp reads from shared memory was
copied there from the global address the register kernel (gate_up_q8_body / row_dot) reads for
it; every bulk copy is 16-byte aligned and sized; the scale spans stay inside the scales buffer
and their slots; everything fits GU_BULK_SMEM. Mirrors the kernel's index arithmetic, so change
both together. Run: python3 tools/check_gate_up_bulk_layout.py"""
import itertools
def slot(nb, NW): return ((32 // NW) * nb + 15) // 16 * 16 + 16
def smem_size(nb, NW): return 64 * nb * 16 + NW * 2 * slot(nb, NW)
def check(E, I, cols, act, NW, e, bx):
    nb = cols // 32; PER = 32 // NW
    BL, SC = 0x10000000, 0x20000000  # blocks / scales bases (16-aligned)
    smem = {}
    def copy(dst, src, n):
        assert dst % 16 == 0 and src % 16 == 0 and n % 16 == 0 and n > 0, (dst, src, n)
        for i in range(n): smem[dst + i] = src + i
    def span(dst, p, n, issue=True):
        a = p & ~15; end = (p + n + 15) & ~15
        assert a >= SC and end <= SC + E * 2 * I * nb, "span outside the scales buffer"
        copy(dst, a, end - a); return dst + (p - a), end - a
    for warp in range(NW):
        jw = bx * 32 + warp * PER
        ws = warp * 2 * PER * nb * 16
        ss = 64 * nb * 16 + warp * 2 * slot(nb, NW)
        eb = BL + e * 2 * I * nb * 16; es = SC + e * 2 * I * nb
        wb, sb = PER * nb * 16, PER * nb
        sg = es + (2 * jw if act == 1 else jw) * nb; su = es + (I + jw) * nb
        sgl, n1 = span(ss, sg, 2 * sb if act == 1 else sb)
        if act == 1: sul, n2 = sgl, 0; assert n1 <= 2 * slot(nb, NW)
        else:
            assert n1 <= slot(nb, NW)
            sul, n2 = span(ss + slot(nb, NW), su, sb); assert n2 <= slot(nb, NW)
        if act == 1: copy(ws, eb + 2 * jw * nb * 16, 2 * wb)
        else: copy(ws, eb + jw * nb * 16, wb); copy(ws + wb, eb + (I + jw) * nb * 16, wb)
        for t in range(PER):
            j = jw + t
            for h in range(2):
                row = (2 * j + h) if act == 1 else (j if h == 0 else I + j)
                lr = 2 * t + h if act == 1 else h * PER + t
                sr = sgl + lr * nb if act == 1 else (sgl if h == 0 else sul) + t * nb
                for b in range(nb):
                    for i in range(16):
                        assert smem[ws + lr * nb * 16 + b * 16 + i] == eb + (row * nb + b) * 16 + i, ("w", warp, t, h, b)
                    assert smem[sr + b] == es + row * nb + b, ("s", warp, t, h, b)
    assert max(smem) < smem_size(nb, NW), (max(smem), smem_size(nb, NW))
n = 0
for (E, I, cols, act) in [(128, 768, 2048, 0), (32, 2880, 2880, 1), (32, 96, 2880, 1), (256, 64, 256, 0), (64, 1536, 512, 0), (8, 64, 96, 1), (8, 64, 160, 0)]:
    for NW in (8, 16, 32):
        if E > 32 * NW: continue
        for e in sorted({0, 1, E - 1}):
            for bx in sorted({0, I // 32 - 1}):
                check(E, I, cols, act, NW, e, bx); n += 1
print(f"layout checks passed: {n}")
