"""Kernel bugs the CPU twin must catch: each mutation below is a realistic mistake in
csrc/awq_stream.cu (or awq_common.cuh) that a GPU would show -- a missing barrier or wait, a ring
slot refilled too early, a non-atomic reduction, a lost barrier in arrive_last, one workspace slot
too few, inputs read before the PDL wait, a truncating output conversion, a ring that starts on the
slot it reads, the narrow kernels' operand order, activation rows and fold, the residual's rounding
and its place in each write path, a split slice's part left out of the last arriver's sum, or
outputs it skips, the wgmma kernels' waits, swizzle, words, alignment, group starts and flush
from the registers, and the wide configuration's pair reduction, loader runs and zeros.  For each, a copy of the repository
gets the mutation and tests/test_cpu_twin.py (or the file CAUGHT_BY names) runs on it; every one
must fail.  Not part of the suite (about 2 minutes a mutation on 2 cores; -k narrows the tests):

    python tests/cpu_twin/mutations.py [-k PYTEST_K] [NAME ...]

Exit status 1 when a mutation survives (or no longer applies: the kernel changed; update it here).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# name -> [(old text, new text[, file in csrc/ (default awq_stream.cu)])]
MUTS = {
 'no_loop_barrier': [("    __syncthreads();\n    if (t + kAhead < n_units) {", "    if (t + kAhead < n_units) {")],
 'wait_one_too_few': [("cp_async_wait<kAhead - 1>();", "cp_async_wait<kAhead>();")],
 'racy_reduction': [("""    for (int w = 0; w < kKW; ++w) {
      if (wk == w) {""", """    for (int i = tid; i < rows_out * kSliceN; i += kStThreads) red[i] = 0.f;
    __syncthreads();
    for (int w = 0; w < 1; ++w) {
      if (true) {"""), ("r = (w == 0 ? 0.f : r) + acc[mb][t][e];", "r += acc[mb][t][e];")],
 'no_flush_barrier': [("    __syncthreads();  // every warp is done reading the slot `red` overwrites", "")],
 'refill_too_early': [("""    __syncthreads();
    if (t + kAhead < n_units) {
      load_weights(wr, ld);
      load_inputs(wr, ld);
      loader_next(ld);
    }""", """    if (t + kAhead < n_units) {
      load_weights(wr, ld);
      load_inputs(wr, ld);
      loader_next(ld);
    }
    __syncthreads();""")],
 'arrive_last_race': [("""  if (threadIdx.x == 0) is_last = (atomicAdd(counter, 1) == splits - 1);
  __syncthreads();""", """  if (threadIdx.x == 0) is_last = (atomicAdd(counter, 1) == splits - 1);""", 'awq_common.cuh')],
 'slot_too_few': [("p.max_parts = std::min(grid, ceil_div(p.KT, p.per) + 1);", "p.max_parts = std::min(grid, ceil_div(p.KT, p.per));")],
 'ring_on_read': [("int rd = 0, wr = kAhead;", "int rd = 0, wr = 0;")],
 # narrow kernels: the B fragments passed as the A fragment unreordered; the pair's ldmatrix rows
 # from the first atom only; a fold by the other column's scale
 'narrow_a_order': [("const uint32_t w16[4] = {b[0], b[2], b[1], b[3]};", "const uint32_t w16[4] = {b[0], b[1], b[2], b[3]};")],
 'narrow_one_atom': [("2 * (wk * kKA + 2 * i) + (lane >> 3)", "2 * (wk * kKA + 2 * i) + ((lane >> 3) & 1)")],
 'narrow_fold': [("e >> 1 ? f.y : f.x", "e & 1 ? f.y : f.x")],
 'pdl_read_early': [("""      if (s < n_units) {
        load_weights(s, ld);
        loader_next(ld);
      }
    }
    grid_dependency_wait();""", """      if (s < n_units) {
        load_weights(s, ld);
        load_inputs(s, ld);
        loader_next(ld);
      }
    }
    grid_dependency_wait();"""), ("""      if (s < n_units) load_inputs(s, pro[s]);
      cp_async_commit();""", """      cp_async_commit();""")],
 'rz_output': [("  T o = Traits<T>::from_float(v);\n  if (residual != nullptr)", "  T o = trunc_from_float<T>(v);\n  if (residual != nullptr)"),
               ("template <typename T>\n__device__ __forceinline__ void store_out(", """template <typename T> __device__ __forceinline__ T trunc_from_float(float v) {
  if constexpr (std::is_same_v<T, __half>) { return __float2half_rz(v); }
  else { uint32_t u; memcpy(&u, &v, 4); __nv_bfloat16_raw r; r.x = (unsigned short)(u >> 16); return __nv_bfloat16(r); }
}
template <typename T>
__device__ __forceinline__ void store_out(""")],
 # the last arriver: a part left out of the sum, or outputs of a batch left unwritten
 'part_left_out': [("for (int s = 0; s < parts; ++s) {", "for (int s = 1; s < parts; ++s) {")],
 'batch_too_far': [("i0 += kOutputsInFlight * kStThreads) {", "i0 += (kOutputsInFlight + 1) * kStThreads) {")],
 'store_past_slot': [("if (i < n && n0 + col < N) store_out(", "if (n0 + col < N) store_out(")],
 # the wgmma kernels: a stage's last wgmma group left in flight past the barrier that lets the loader
 # refill its slot; none waited for; activations stored unswizzled; every warp dequantizing word 0's
 # zeros; the 1024-byte boundary not sought; a 32-row group's start missed; and their flush from
 # the registers: an accumulator's column (output) taken for another's, every part of a split
 # slice written into the first part's slot, the last arriver's sum left out
 'wgmma_wait_late': [("if constexpr (Cfg::kWgmmaInFlight == 0) {\n        wgmma_wait<0>();",
                      "if constexpr (Cfg::kWgmmaInFlight == 0) {\n        wgmma_wait<1>();")],
 'wgmma_no_wait': [("if constexpr (Cfg::kWgmmaInFlight == 0) {\n        wgmma_wait<0>();",
                    "if constexpr (Cfg::kWgmmaInFlight == 0) {")],
 'wgmma_unswizzled': [("m * kSwizzleRowBytes + (((ch & 7) ^ (m & 7)) * 16);", "m * kSwizzleRowBytes + ((ch & 7) * 16);")],
 'wgmma_zero_word': [("DQ::load_group_word(gp, zw >> (4 * wq), s2);", "DQ::load_group_word(gp, zw, s2);")],
 'wgmma_unaligned': [("base += (kSwizzleBlockBytes - smem_address(base) % kSwizzleBlockBytes) % kSwizzleBlockBytes;",
                      "base += 0;")],
 'wgmma_group_32': [("{p.gshift <= 1, p.gshift <= 2,", "{p.gshift <= 0, p.gshift <= 2,")],
 'wgmma_owner_column': [("wg * 64 + 16 * wq + g + 8 * (e >> 1)};", "wg * 64 + 16 * wq + g + 8 * (e & 1)};")],
 'wgmma_one_slot': [("ws + ((size_t)c_slice * p.max_parts + blockIdx.x - sp.first) * rows_out * kSliceN;",
                     "ws + ((size_t)c_slice * p.max_parts) * rows_out * kSliceN;")],
 # ... and at eight m-tiles, a stage's last group left in flight while the loader refills the slot
 # consumed one stage back, not two; two groups left in flight after each block (the next block's
 # dequantization then rewrites the A registers of a wgmma in flight: the twin takes A at issue, so
 # ptxas's serialization note, which tests/test_sass_budget.py reads, is what catches it)
 'wgmma_block_wait_late': [("          wgmma_wait<Cfg::kWgmmaInFlight>();", "          wgmma_wait<Cfg::kWgmmaInFlight + 1>();")],
 'wgmma_refill_one_back': [("return stages_for(MB, config) - 1 - wgmma_groups_in_flight(MB, config); }",
                            "return stages_for(MB, config) - 1; }")],
 # the residual of awq_gemm_add: added to the unrounded sum (one rounding where torch rounds twice), or left
 # out where the last arriver of a split slice, or a wgmma owner, writes the output
 'residual_rounded_once': [("o = Traits<T>::from_float(__fadd_rn(Traits<T>::to_float(o), Traits<T>::to_float(residual[at])));",
                            "o = Traits<T>::from_float(__fadd_rn(v, Traits<T>::to_float(residual[at])));")],
 'residual_left_out_of_parts': [("store_out(out, residual, (size_t)r * N + n0 + col, v[u]);",
                                 "store_out(out, static_cast<const T*>(nullptr), (size_t)r * N + n0 + col, v[u]);")],
 'residual_left_out_of_wgmma_flush': [("store_out(out, residual, (size_t)row * p.N + n0 + col, acc[mb][t][e]);",
                                       "store_out(out, static_cast<const T*>(nullptr), (size_t)row * p.N + n0 + col, acc[mb][t][e]);")],
 'wgmma_no_sum': [("    if (slot != nullptr) sum_parts<T, kSliceN>(out, residual, ws, counters, p.N, p.max_parts, c_slice, rows_out, sp.parts);",
                   "")],
 # the wide configuration: k-warp 1's sums never added; each round's rows placed as if it were the
 # first (past the round's room in the slot); the loader's third and fourth n-atom runs read the
 # second's; the zeros' chunks placed as a 128-column slice's; the pair's first barrier gone (k-warp 1
 # overwrites the slot the stage reads)
 'wide_pair_not_added': [("      if (wk == 0) each_output([](float& a, const float& r) { a += r; });", "")],
 'wide_round_unshifted': [("if (row < rows_out) f(acc[mb][t][e], red[(row - r0) * kSliceN + col]);",
                           "if (row < rows_out) f(acc[mb][t][e], red[row * kSliceN + col]);")],
 'wide_runs_collapse': [("return na == 0 ? l.w : l.w + na * nstride;", "return na == 0 ? l.w : l.w + nstride;")],
 'wide_zero_chunks': [(": Cfg::kOffZ + sz_gi[r] * (kSliceN / 8) * 4 + (ch - kSChunks) * 16;",
                       ": Cfg::kOffZ + sz_gi[r] * (kSliceN / 8) * 4 + (ch - kSChunks) % 4 * 16;")],
 'wide_pair_no_barrier': [("      __syncthreads();  // the slot's last readers (the stage, or the round before) are done\n", "")],
}


# mutations another test file catches (instead of tests/test_cpu_twin.py)
CAUGHT_BY = {'wgmma_block_wait_late': "tests/test_sass_budget.py"}


def run(name: str, work: Path, select: str | None = None) -> str:
    """Apply mutation `name` to a copy of the repository under `work`; the suite's last line (of the
    tests `select` picks, pytest's -k, else all of tests/test_cpu_twin.py or CAUGHT_BY's file)."""
    d = work / name
    for sub in ("awqlib", "csrc", "tests", "scripts"):
        shutil.copytree(ROOT / sub, d / sub, ignore=shutil.ignore_patterns("__pycache__"))
    for old, new, *where in MUTS[name]:
        p = d / "csrc" / (where[0] if where else "awq_stream.cu")
        text = p.read_text()
        if text.count(old) != 1:
            return f"does not apply ({p.name} changed)"
        p.write_text(text.replace(old, new))
    env = dict(os.environ, PYTHONPATH=str(d))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", CAUGHT_BY.get(name, "tests/test_cpu_twin.py"),
                        *(["-k", select] if select else [])], cwd=d, env=env, capture_output=True, text=True)
    lines = r.stdout.strip().splitlines()
    return ("caught: " if r.returncode != 0 else "SURVIVED: ") + (lines[-1] if lines else r.stderr[-200:])


def main(argv: list[str]) -> int:
    select = None
    if len(argv) >= 2 and argv[0] == "-k":  # only the tests pytest -k picks (a quicker look at a few)
        select, argv = argv[1], argv[2:]
    names = argv or list(MUTS)
    survived = 0
    with tempfile.TemporaryDirectory(prefix="awqlib-mutations-") as work:
        for name in names:
            result = run(name, Path(work), select)
            survived += not result.startswith("caught")
            print(f"{name:17s} {result}", flush=True)
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
