#!/usr/bin/env python3
"""Checks kernels/moe_q8.cu's E2M1_PN dot (dot_word_pn) against the shipped conversion
(e2m1x8_to_i8) by emulating PTX prmt.b32 (generic mode: 3 bits pick one of 8 bytes, bit 3
replicates the picked byte's sign) and dp4a: for every 32-bit word of codes whose nibbles run
through all 16 codes at every position, and random activations, both give the same integer.
Run: python3 tools/check_e2m1_pn.py"""
import random


def prmt(a, b, sel):
    src = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
    out = 0
    for n in range(4):
        s = (sel >> (4 * n)) & 0xF
        byte = src[s & 7]
        if s & 8:
            byte = 0xFF if byte & 0x80 else 0x00
        out |= byte << (8 * n)
    return out


def sbytes(w):
    return [((w >> (8 * i)) & 0xFF) - 256 * (((w >> (8 * i)) & 0x80) != 0) for i in range(4)]


def dp4a(a, b, c):
    return c + sum(x * y for x, y in zip(sbytes(a), sbytes(b)))


M32 = 0xFFFFFFFF
T0, T1, T2, T3 = 0x03020100, 0x0C080604, 0xFDFEFF00, 0xF4F8FAFC


def shipped(q, xlo, xhi):  # e2m1x8_to_i8 + 2 dp4a
    sel = 0x32103210 | ((q & 0x88888888) >> 1)
    a, b = q & 0x7777, (q >> 16) & 0x7777
    lo = prmt(prmt(T0, T1, a), prmt(T2, T3, a), sel)
    hi = prmt(prmt(T0, T1, b), prmt(T2, T3, b), sel >> 16)
    return dp4a(hi, xhi, dp4a(lo, xlo, 0))


def pn(q, xlo, xhi):  # dot_word_pn, then d - n
    qn = q ^ 0x88888888
    d = dp4a(prmt(T0, T1, q), xlo, 0)
    n = dp4a(prmt(T0, T1, qn), xlo, 0)
    d = dp4a(prmt(T0, T1, q >> 16), xhi, d)
    n = dp4a(prmt(T0, T1, qn >> 16), xhi, n)
    return d - n


def value(c):  # a code's doubled E2M1 value
    m = [0, 1, 2, 3, 4, 6, 8, 12][c & 7]
    return -m if c & 8 else m


rng = random.Random(7)
n = 0
for c in range(16):
    for shift in range(8):  # code c at every position, random codes elsewhere
        for _ in range(40):
            q = (rng.getrandbits(32) & ~(0xF << (4 * shift)) | (c << (4 * shift))) & M32
            xlo, xhi = rng.getrandbits(32), rng.getrandbits(32)
            want = sum(value((q >> (4 * i)) & 0xF) * x for i, x in enumerate(sbytes(xlo) + sbytes(xhi)))
            assert shipped(q, xlo, xhi) == want, (hex(q), "shipped")
            assert pn(q, xlo, xhi) == want, (hex(q), "pn")
            n += 1
print(f"E2M1_PN checks passed: {n}")
