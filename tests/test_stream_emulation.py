"""CPU emulation of csrc/awq_stream.cu's indexing: the persistent striped partition, the loader's
global -> shared-memory addresses (weights, XOR-swizzled activations, per-group scales and zeros,
tail predicates), the consumer's shared-memory reads (ldmatrix rows, the 16-byte B fragment, the
group slot of each atom and the FINE/coarse choice), the k-warp reduction and the deterministic
last-arriver slice reduction -- all in the kernel's own formulas, thread by thread, interpreted
with the PTX fragment layouts of ldmatrix and mma.m16n8k16.  It must reproduce x @ W^T.

No GPU: this is what can be checked of the kernel's addressing before a GPU window (the
arithmetic of the dequantization is checked bit for bit in test_packing.py).  The constants
mirror csrc/awq_stream.cu (StreamCfg, plan_stream, params_for); keep them in sync.
"""

from __future__ import annotations

import math

import pytest
import torch

from awqlib.packing import STREAM_NIBBLES
from conftest import stream_case

NA, KW, THREADS, SLICE_N = 2, 4, 256, 128
LANES = torch.arange(32)
GQ, Q = LANES // 4, LANES % 4


def mb_for(m):
    return 1 if m <= 16 else 2 if m <= 32 else 4


def cfg(m, compact=False):
    """StreamCfg<MB, CONFIG>: the large configuration, or the compact one (M <= 32).  The deep one
    is the large one with a fourth ring stage: the same partition and arithmetic, and the ring is
    not emulated here (the CPU twin runs it: tests/test_cpu_twin.py)."""
    mb = mb_for(m)
    assert not compact or mb <= 2, "no compact configuration for M > 32"
    ka = 4 if mb == 4 or compact else 8
    stage_k = 16 * ka * KW
    return dict(mb=mb, ka=ka, stage_k=stage_k, max_groups=stage_k // 32, rows=16 * mb,
                stages=2 if compact and mb == 2 else 3)


def log2_exact(v):
    r = int(math.log2(v)) if v > 0 else -1
    return r if r >= 0 and (1 << r) == v else -1


def plan(M, N, K, g, num_sms, compact=False):
    """plan_stream + params_for."""
    c = cfg(M, compact)
    sk = c["stage_k"]
    assert K % 16 == 0 and N % 64 == 0 and g % 32 == 0 and K % g == 0
    assert (sk % g == 0 and log2_exact(g // 16) >= 0) if g < sk else (g % sk == 0 or g == K)
    slices = -(-N // SLICE_N)
    KT = -(-K // sk)
    units = slices * KT
    grid0 = max(1, min(units, num_sms))
    per = -(-units // grid0)
    grid = -(-units // per)
    p = dict(M=M, N=N, K=K, KT=KT, KT16=K // 16, NT=N // 64, groups=K // g, per=per, units=units, grid=grid)
    if g < sk:
        p.update(spg=1, grp_step=sk // g, gps=sk // g, gshift=log2_exact(g // 16))
    else:
        p.update(spg=KT if g >= K else g // sk, grp_step=1, gps=1, gshift=31)
    p["max_parts"] = min(grid, -(-KT // per) + 1)
    return p, c


def emulate(x, qs, zs, ss, g, num_sms, sums=False, compact=False):
    """The kernel's output [M, N] (fp64), computed CTA by CTA, thread by thread.  ``sums``: the
    group-sums instantiation (GroupSums: unscaled sums per group, folded with the scales each
    lane reads for its accumulator columns).  ``compact``: the compact configuration."""
    M, K = x.shape
    N = qs.shape[0] * 64
    p, c = plan(M, N, K, g, num_sms, compact)
    ka, sk, rows_pad = c["ka"], c["stage_k"], c["rows"]
    ap = ka * KW                    # atoms per n-atom and stage
    wr = ap // 8
    cpr = sk // 8                   # activation chunks per row
    a_step = THREADS // cpr
    sz_rounds = -(-c["max_groups"] * 20 // THREADS)
    fine = p["gshift"] < 31 and (16 << p["gshift"]) < 16 * ka
    assert not sums or (32 * c["mb"] < 16 * ka and not fine), "group sums are instantiated where they pay only"
    q4 = qs.view(-1, 4)             # global weight chunks (uint4)
    out = torch.full((M, N), float("nan"), dtype=torch.float64)
    ws, counters, written = {}, [0] * -(-N // SLICE_N), set()
    tid = list(range(THREADS))

    for cta in range(p["grid"]):
        u0 = cta * p["per"]
        n_units = min(u0 + p["per"], p["units"]) - u0
        assert n_units > 0, "no empty CTAs"
        slice_, kt = divmod(u0, p["KT"])
        sub, grp = kt % p["spg"], (kt // p["spg"]) * p["grp_step"]
        # the kernel's incremental loader pointers (chunk 0 of warp 0 lane 0; scale/zero row offsets)
        nstride = p["KT16"] * 32
        w_ptr = slice_ * NA * nstride + kt * ap * 32
        grp_last = ((p["KT"] - 1) // p["spg"]) * p["grp_step"]
        row_bytes = {"s": N * 2, "z": N // 2}
        slice_bytes = {"s": SLICE_N * 2, "z": SLICE_N // 2}
        sz_ptr = {h: grp * row_bytes[h] + slice_ * slice_bytes[h] for h in "sz"}
        c_slice, c_kt = slice_, kt
        acc = torch.zeros(8, rows_pad, 64, dtype=torch.float64)   # per warp: rows x its 64 columns
        part = torch.zeros_like(acc)                                # GroupSums::part
        for t in range(n_units):
            # ---- load_stage (the loader's cursor: slice_, kt, sub, grp)
            B = torch.zeros(NA * ap * 32, 4, dtype=torch.int64)
            A = torch.zeros(rows_pad, cpr, 8, dtype=torch.float64)
            S = torch.zeros(c["max_groups"], SLICE_N, dtype=torch.float64)
            Z = torch.zeros(c["max_groups"], SLICE_N // 8, dtype=torch.int64)
            for th in tid:
                warp, lane = divmod(th, 32)
                for r in range(NA * wr):
                    na, sb = divmod(r, wr)
                    atom, nt = kt * ap + warp + 8 * sb, slice_ * NA + na
                    if atom < p["KT16"] and nt < p["NT"]:
                        B[th + r * THREADS] = q4[(nt * p["KT16"] + atom) * 32 + lane].to(torch.int64) & 0xFFFFFFFF
                a_ch, a_row = th % cpr, th // cpr
                for r in range(rows_pad // a_step):
                    m = a_row + a_step * r
                    k = kt * sk + 8 * a_ch
                    if m < M and k < K:
                        A[m, a_ch ^ (m & 7)] = x[m, k:k + 8]
                for r in range(sz_rounds):
                    idx = th + r * THREADS
                    gi, ch = divmod(idx, 20)
                    if gi >= p["gps"] or grp + gi >= p["groups"]:
                        continue
                    if ch < 16:
                        col = slice_ * SLICE_N + 8 * ch
                        if col < N:
                            S[gi, 8 * ch:8 * ch + 8] = ss[grp + gi, col:col + 8]
                    else:
                        w = slice_ * 16 + 4 * (ch - 16)
                        if w < N // 8:
                            Z[gi, 4 * (ch - 16):4 * (ch - 16) + 4] = zs[grp + gi, w:w + 4].to(torch.int64) & 0xFFFFFFFF
            # loader_next, with the kernel's pointer increments checked against the direct formulas
            assert w_ptr == (slice_ * NA * p["KT16"] + kt * ap) * 32
            assert all(sz_ptr[h] == grp * row_bytes[h] + slice_ * slice_bytes[h] for h in "sz")
            if kt + 1 == p["KT"]:
                slice_, kt, sub, grp = slice_ + 1, 0, 0, 0
                w_ptr += NA * nstride - (p["KT"] - 1) * ap * 32
                for h in "sz":
                    sz_ptr[h] += slice_bytes[h] - grp_last * row_bytes[h]
            else:
                kt += 1
                w_ptr += ap * 32
                sub += 1
                if sub == p["spg"]:
                    sub, grp = 0, grp + p["grp_step"]
                    for h in "sz":
                        sz_ptr[h] += row_bytes[h] * p["grp_step"]

            # ---- consume: every warp, every atom, the PTX fragment layouts
            for warp in range(8):
                wn, wk = warp % NA, warp // NA
                slot0 = 0 if p["gshift"] == 31 else (wk * ka) >> p["gshift"]
                for i in range(ka):
                    a = wk * ka + i
                    slot = 0 if p["gshift"] == 31 else a >> p["gshift"]
                    if not fine:
                        assert slot == slot0, "coarse instantiation but the group changes inside the warp"
                    Atile = torch.full((rows_pad, 16), float("nan"), dtype=torch.float64)
                    Bt = torch.full((8, 16, 8), float("nan"), dtype=torch.float64)   # n8-tile, k, column
                    # all 32 lanes at once: lane = 4 gq + q
                    for mb in range(c["mb"]):
                        for mi in range(4):  # ldmatrix.x4: lane 8 mi + gq gave row gq of matrix mi
                            L = 8 * mi + GQ
                            # a_off[i % 4] (the swizzled chunk of atom i % 4) + 128 bytes per 4 atoms
                            row, chk = L & 15, 2 * (wk * ka + i % 4) + (L >> 4)
                            v = A[16 * mb + row, (chk ^ (row & 7)) + 8 * (i // 4)]     # [32, 8]
                            for e in range(2):
                                Atile[16 * mb + GQ + 8 * (mi % 2), 8 * (mi // 2) + 2 * Q + e] = v[LANES, 2 * Q + e]
                    words = B[wn * ap * 32 + a * 32 + LANES]                           # [32, 4]
                    svec = S[slot, wn * 64 + 8 * GQ.unsqueeze(1) + torch.arange(8)]    # [32, 8]
                    zw = Z[slot, wn * 8 + GQ]                                          # [32]
                    for j in range(4):
                        for nib, (ri, hi) in enumerate(STREAM_NIBBLES):
                            code = (words[:, j] >> (4 * nib)) & 0xF
                            z = (zw >> (4 * (j + 4 * hi))) & 0xF
                            d = (code - z).double()
                            if not sums:
                                d = (d * svec[:, 2 * j + hi]).to(ss.dtype).double()  # one rounding
                            krow = 2 * Q + (ri % 2) + 8 * (ri // 2)                    # rows 2q, 2q+1, 2q+8, 2q+9
                            Bt[2 * j + hi, krow, GQ] = d
                    assert not Bt.isnan().any() and not Atile.isnan().any()
                    for tt in range(8):
                        (part if sums else acc)[warp, :, 8 * tt:8 * tt + 8] += Atile @ Bt[tt]
                if sums:  # GroupSums::fold at the stage's end: lane (GQ, Q) element (mb, t, e)
                    for e in range(4):
                        for tt in range(8):
                            col = 8 * tt + 2 * Q + (e & 1)
                            sc = S[slot0, wn * 64 + 16 * Q + 8 * (e & 1) + tt].float().double()
                            for mb in range(c["mb"]):
                                row = 16 * mb + GQ + 8 * (e >> 1)
                                acc[warp, row, col] += part[warp, row, col] * sc
                    part[warp] = 0
            # ---- flush at the end of a slice or of the CTA's run
            if c_kt == p["KT"] - 1 or t == n_units - 1:
                rows = min(M, rows_pad)
                # only rows < M go through red; the others hold what the ring slot held (NaN here)
                red = torch.full((rows_pad, SLICE_N), float("nan"), dtype=torch.float64)
                red[:rows] = 0
                for w_k in range(KW):   # k-warps in order
                    for wn in range(NA):
                        red[:rows, wn * 64:(wn + 1) * 64] += acc[w_k * NA + wn, :rows]
                acc.zero_()
                first = (c_slice * p["KT"]) // p["per"]
                last = ((c_slice + 1) * p["KT"] - 1) // p["per"]
                parts, n0 = last - first + 1, c_slice * SLICE_N
                ncol = min(SLICE_N, N - n0)
                if parts == 1:
                    out[:, n0:n0 + ncol] = red[:rows, :ncol]
                    written.add(c_slice)
                else:
                    pidx = cta - first
                    assert 0 <= pidx < p["max_parts"] and (c_slice, pidx) not in ws
                    ws[(c_slice, pidx)] = red[:rows].clone()
                    counters[c_slice] += 1
                    if counters[c_slice] == parts:   # arrive_last
                        v = sum(ws[(c_slice, s)] for s in range(parts))   # in part order
                        out[:, n0:n0 + ncol] = v[:, :ncol]
                        written.add(c_slice)
                        counters[c_slice] = 0
            c_kt += 1
            if c_kt == p["KT"]:
                c_kt, c_slice = 0, c_slice + 1
    assert all(v == 0 for v in counters), "every counter is reset for the next launch"
    assert written == set(range(len(counters)))
    return out, p


CASES = [  # (M, N, K, group, SMs): tails (K % stage, N % 128), every group regime, split slices
    (1, 192, 576, 64, 3),      # not EXACT, FINE groups, slices split over CTAs
    (5, 256, 1024, 128, 3),    # EXACT, coarse groups, 4 units on 3 CTAs
    (2, 128, 1536, 256, 2),    # group 256 < stage 512: two groups per k-tile, coarse per warp
    (3, 128, 1024, 512, 3),    # group == stage: one group per k-tile
    (1, 128, 2048, 1024, 3),   # group > stage: a group spans k-tiles (spg = 2)
    (1, 64, 768, 768, 2),      # group == K, K not a multiple of the stage
    (17, 128, 1024, 32, 3),    # MB = 2, group 32: four groups per warp slice
    (40, 128, 512, 64, 2),     # MB = 4 (k-tile 256)
]
COMPACT_CASES = [  # the compact configuration (k-tile 256 at MB 1 and 2)
    (1, 192, 576, 32, 3),      # not EXACT, FINE (group 32 < 64-row warp slice), N and K tails
    (3, 256, 1024, 64, 3),     # EXACT, group == warp slice: coarse
    (1, 128, 1536, 128, 2),    # group 128 < k-tile 256: two groups per k-tile, coarse per warp
    (2, 128, 1024, 512, 3),    # group > k-tile (spg = 2)
    (1, 64, 768, 768, 2),      # group == K, K a multiple of the k-tile
    (24, 128, 1024, 64, 3),    # MB = 2
    (32, 192, 640, 128, 2),    # MB = 2, N and K tails
    (20, 128, 1024, 32, 3),    # MB = 2, FINE (group 32): the group changes inside a warp slice
    (17, 256, 768, 32, 2),     # MB = 2, FINE, K a multiple of the k-tile, slices split over CTAs
]


@pytest.mark.parametrize("M,N,K,g,sms", CASES, ids=[f"M{m}-N{n}-K{k}-g{g}-sm{s}" for m, n, k, g, s in CASES])
def test_stream_kernel_indexing_emulated(M, N, K, g, sms):
    x, q, stream = stream_case(M, N, K, g, seed=M * 7 + N + K + g)
    x, w = x.double(), q.half().double()
    out, p = emulate(x, *stream.values(), g, sms)
    torch.testing.assert_close(out, x @ w, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("M,N,K,g,sms", COMPACT_CASES, ids=[f"M{m}-N{n}-K{k}-g{g}-sm{s}" for m, n, k, g, s in COMPACT_CASES])
def test_stream_kernel_compact_emulated(M, N, K, g, sms):
    x, q, stream = stream_case(M, N, K, g, seed=M * 3 + N + K + g)
    x, w = x.double(), q.half().double()
    out, p = emulate(x, *stream.values(), g, sms, compact=True)
    assert p["KT"] == -(-K // 256)
    torch.testing.assert_close(out, x @ w, rtol=1e-9, atol=1e-9)


SUMS_CASES = [  # the group-sums instantiation: coarse groups, MB 1 and 2
    (5, 256, 1024, 128, 3),    # EXACT, one group per warp slice
    (2, 128, 1536, 256, 2),    # two groups per k-tile
    (1, 128, 2048, 1024, 3),   # a group spans k-tiles
    (1, 64, 768, 768, 2),      # not EXACT, group == K
    (20, 192, 1024, 128, 3),   # MB = 2, N tail
    (1, 256, 1536, 128, 4),    # a CTA flushes a split slice mid-run, then goes on with cleared sums
    (3, 128, 1024, 512, 3),    # group == stage
    (1, 128, 640, 128, 2),     # K tail: zero-filled rows and out-of-range groups
    (2, 128, 768, 256, 3),     # K tail with two groups per k-tile
]
COMPACT_SUMS_CASES = [  # compact: sums at MB = 1 only, groups of >= 64 rows
    (1, 128, 1024, 64, 3),     # group == warp slice
    (7, 192, 640, 128, 2),     # tails, two groups per k-tile
    (1, 256, 1536, 512, 4),    # group spans k-tiles, slices split over CTAs
]


@pytest.mark.parametrize("M,N,K,g,sms,compact", [(*c, False) for c in SUMS_CASES] + [(*c, True) for c in COMPACT_SUMS_CASES],
                         ids=[f"M{m}-N{n}-K{k}-g{g}-sm{s}" for m, n, k, g, s in SUMS_CASES]
                         + [f"compact-M{m}-N{n}-K{k}-g{g}-sm{s}" for m, n, k, g, s in COMPACT_SUMS_CASES])
def test_stream_group_sums_emulated(M, N, K, g, sms, compact):
    """Group sums compute x @ ((q - z) s) with no weight rounded to the activations' dtype: the
    fold must pick, for every lane's accumulator column, that column's scale."""
    x, w, stream = stream_case(M, N, K, g, seed=M * 5 + N + K + g)
    x = x.double()
    out, _ = emulate(x, *stream.values(), g, sms, sums=True, compact=compact)
    torch.testing.assert_close(out, x @ w, rtol=1e-9, atol=1e-9)
    # and the scaled path's rounding of every weight to fp16 is what it avoids:
    assert not torch.allclose(out, x @ w.half().double(), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("stages", [2, 3, 4])
@pytest.mark.parametrize("n_units", list(range(1, 12)))
def test_stream_ring_order(stages, n_units):
    """The cp.async ring of awq_stream.cu as an event simulation: the prologue issues stages - 1
    units, every iteration waits with wait_group<stages - 2>, barriers, refills slot `wr` and
    consumes slot `rd` (commit groups possibly empty).  A unit is read only once its copies have
    completed, a slot is refilled only after its unit was consumed, and the slice-end flush, which
    reuses the consumed slot as its reduction buffer, never races a copy into that slot."""
    content, pending, groups = [None] * stages, {}, []   # pending: slot -> group id

    def issue(slot, unit):
        assert slot not in pending, "refilling a slot whose copies are still in flight"
        content[slot] = unit
        pending[slot] = len(groups)

    def commit():
        groups.append(True)

    def wait_group(n):  # all but the newest n groups complete
        done = len(groups) - n
        for slot in [s for s, gid in pending.items() if gid < done]:
            del pending[slot]

    for s in range(stages - 1):
        if s < n_units:
            issue(s, s)
        commit()
    rd, wr, consumed = 0, stages - 1, set()
    for t in range(n_units):
        wait_group(stages - 2)
        # barrier: every warp consumed unit t - 1 (slot wr) before it is refilled below
        assert t == 0 or content[wr] == t - 1 or content[wr] is None
        if t + stages - 1 < n_units:
            issue(wr, t + stages - 1)
        commit()
        wr = 0 if wr + 1 == stages else wr + 1
        slot = rd
        rd = 0 if rd + 1 == stages else rd + 1
        assert content[slot] == t and slot not in pending, f"unit {t} read before its copies landed"
        consumed.add(t)
        assert slot not in pending  # flush(st) may overwrite this slot
    assert consumed == set(range(n_units))
