#!/usr/bin/env python3
"""Checks the bulk gate/up's copy layout (bench/micro/gate_up_bulk.cuh: gate_up_slot and
gate_up_q8_bulk_impl; gate_up_q8_ranges_impl as S = 0) by address arithmetic, without a GPU:
every weight block and scale byte a warp reads from shared memory was copied there (into the
output's slot, through the ring when there are fewer slots than outputs) from the global address
the register kernel (gate_up_q8_body / row_dot) reads for it; every bulk copy is 16-byte aligned
and sized; the scale spans stay inside the scales buffer and their pieces; everything fits
GU_BULK_SMEM (GU_RANGES_SMEM). Mirrors the kernel's index arithmetic, so change both together.
Run: python3 tools/check_gate_up_bulk_layout.py"""


def span_piece(nb):  # GU_BULK_SPAN
    return (nb + 15) // 16 * 16 + 16


def slot_bytes(nb):  # GU_BULK_SLOT
    return 2 * nb * 16 + 2 * span_piece(nb)


def check(E, I, cols, act, NW, S, e, bx):
    nb, PER = cols // 32, 32 // NW
    BL, SC = 0x10000000, 0x20000000  # the blocks' and scales' bases (16-byte aligned)
    smem = {}  # shared-memory byte -> the global byte copied there

    def copy(dst, src, n):
        assert dst % 16 == 0 and src % 16 == 0 and n % 16 == 0 and n > 0, (dst, src, n)
        for i in range(n):
            smem[dst + i] = src + i

    def span(dst, p, n, room):
        a, end = p & ~15, (p + n + 15) & ~15
        assert a >= SC and end <= SC + E * 2 * I * nb, "span outside the scales buffer"
        assert end - a <= room, "span larger than its piece"
        copy(dst, a, end - a)
        return dst + (p - a)

    eb, es = BL + e * 2 * I * nb * 16, SC + e * 2 * I * nb
    rb = nb * 16

    def slot(sl, j):  # gate_up_slot: returns where the gate and up rows' scales landed
        gr, ur = (2 * j, 2 * j + 1) if act == 1 else (j, I + j)
        ss = sl + 2 * rb
        if act == 1:
            copy(sl, eb + gr * rb, 2 * rb)
            sg = span(ss, es + gr * nb, 2 * nb, 2 * span_piece(nb))
            return sg, sg + nb
        copy(sl, eb + gr * rb, rb)
        copy(sl + rb, eb + ur * rb, rb)
        return span(ss, es + gr * nb, nb, span_piece(nb)), span(ss + span_piece(nb), es + ur * nb, nb, span_piece(nb))

    if S == 0:  # the ranges form: a warp's rows in one or two copies, then its scales
        warp_bytes = 2 * PER * rb + 2 * span_piece(PER * nb)  # GU_RANGES_WARP
        for warp in range(NW):
            jw = bx * 32 + warp * PER
            rows = warp * warp_bytes
            ss = rows + 2 * PER * rb
            g0, u0 = (2 * jw, 2 * jw + 1) if act == 1 else (jw, I + jw)
            if act == 1:
                copy(rows, eb + g0 * rb, 2 * PER * rb)
                sg = span(ss, es + g0 * nb, 2 * PER * nb, 2 * span_piece(PER * nb))
                su = sg + nb
            else:
                copy(rows, eb + g0 * rb, PER * rb)
                copy(rows + PER * rb, eb + u0 * rb, PER * rb)
                sg = span(ss, es + g0 * nb, PER * nb, span_piece(PER * nb))
                su = span(ss + span_piece(PER * nb), es + u0 * nb, PER * nb, span_piece(PER * nb))
            rstep, uoff = (2, 1) if act == 1 else (1, PER)
            for t in range(PER):
                j = jw + t
                for h in range(2):
                    row = (2 * j + h) if act == 1 else (j if h == 0 else I + j)
                    wr = rows + (t * rstep + h * uoff) * rb
                    sr = (su if h else sg) + t * rstep * nb
                    for b in range(nb):
                        for i in range(16):
                            assert smem[wr + b * 16 + i] == eb + (row * nb + b) * 16 + i, ("w", warp, t, h, b)
                        assert smem[sr + b] == es + row * nb + b, ("s", warp, t, h, b)
        assert max(smem) < NW * warp_bytes, (max(smem), NW * warp_bytes)
        return
    for warp in range(NW):
        jw = bx * 32 + warp * PER
        slots = warp * S * slot_bytes(nb)
        sc = [slot(slots + t * slot_bytes(nb), jw + t) for t in range(S)]
        for t in range(PER):
            q, j = t % S, jw + t
            sl = slots + q * slot_bytes(nb)
            for h in range(2):
                row = (2 * j + h) if act == 1 else (j if h == 0 else I + j)
                sr = sc[q][h]
                for b in range(nb):
                    for i in range(16):
                        assert smem[sl + h * rb + b * 16 + i] == eb + (row * nb + b) * 16 + i, ("w", warp, t, h, b)
                    assert smem[sr + b] == es + row * nb + b, ("s", warp, t, h, b)
            if t + S < PER:
                sc[q] = slot(sl, jw + t + S)
    assert max(smem) < NW * S * slot_bytes(nb), (max(smem), NW * S * slot_bytes(nb))


n = 0
for (E, I, cols, act) in [(128, 768, 2048, 0), (32, 2880, 2880, 1), (32, 96, 2880, 1), (256, 64, 256, 0),
                          (64, 1536, 512, 0), (8, 64, 96, 1), (8, 64, 160, 0)]:
    for NW, S in [(8, 4), (8, 2), (16, 2), (32, 1), (8, 1), (8, 0), (16, 0), (32, 0)]:
        if E > 32 * NW:
            continue
        for e in sorted({0, 1, E - 1}):
            for bx in sorted({0, I // 32 - 1}):
                check(E, I, cols, act, NW, S, e, bx)
                n += 1
print(f"layout checks passed: {n}")
