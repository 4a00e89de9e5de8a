#!/usr/bin/env python
"""SASS instruction budget of the CUDA kernels: a GPU-free proxy for decode speed.

The M <= 64 kernels are limited by instruction issue, not by DRAM (shared/design/kernels-v2.md
§2.3): an SM issues at most 4 warp-instructions per cycle, so a kernel that spends I
warp-instructions per KB of weights cannot stream faster than 4 * clock / I KB per SM.  This script
compiles every kernel in csrc/ with nvcc (to a cubin: no GPU; torch's headers only for a file that
includes them), disassembles it with cuobjdump (it ships in the triton wheel that CUDA torch
installs), finds each kernel's hot loop and reports, per kernel instantiation:

* ``instr/KB``: static SASS instructions of the hot loop times the warps of a CTA, divided by the
  KB of int4 weights the CTA streams per loop iteration (warp-instructions per KB of weights);
* ``issue TB/s``: the chip-wide bandwidth ceiling that rate implies at 100 % issue on an H200
  (132 SMs x 4 schedulers x 1.98 GHz);
* registers, spill bytes (ptxas), static shared memory, and resident CTAs per SM from the
  registers / shared memory / threads limits of the architecture.

Hot loop: every backward branch ``BRA target`` at address a (target <= a) closes a loop
[target, a]; the hot loop is the one holding the most HMMA, then the most other math instructions
(HFMA2, HMUL2, HADD2, FFMA, ...; a CUDA-core kernel has no HMMA), the innermost on a tie.  Its static instruction count (NOPs excluded) is the
cost of one iteration; forward branches inside (conditional prefetch) are counted as taken, so
this is an upper bound of the issued count, except that code skipped by a forward branch and
holding global stores or a call (an epilogue such as a slice-end flush, run once per output tile) is
reported separately as ``cold`` and not counted per iteration.  How many weight bytes one iteration streams is
kernel knowledge: ``SPECS`` below derives it from the template arguments in the mangled name, and
cross-checks it against the HMMA count where the kernel uses tensor cores.

    python scripts/sass_budget.py                    # all kernels, sm_90 and sm_80
    python scripts/sass_budget.py --arch 90 --files awq_stream.cu --json out.json

Exit status 0 unless a compile fails.  Budgets are enforced by tests/test_sass_budget.py.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import runpy
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"

# Per-SM limits (CUDA programming guide, "Compute capabilities"): registers, resident threads,
# resident CTAs, shared memory per SM and per CTA (bytes), and the 1 KB the runtime reserves per CTA.
ARCH_LIMITS = {
    "80": dict(regs=65536, threads=2048, ctas=32, smem_sm=167936, smem_cta=166912, smem_reserved=1024),
    "90": dict(regs=65536, threads=2048, ctas=32, smem_sm=233472, smem_cta=232448, smem_reserved=1024),
    # ~100 KB per block: A10/RTX 30 (sm_86), L4/L40S/RTX 40 (sm_89)
    "86": dict(regs=65536, threads=1536, ctas=16, smem_sm=102400, smem_cta=101376, smem_reserved=1024),
    "89": dict(regs=65536, threads=1536, ctas=24, smem_sm=102400, smem_cta=101376, smem_reserved=1024),
}
H200_ISSUE = 132 * 4 * 1.98e9  # warp-instructions per second, all SMs, at 100 % issue

MATH_OPS = ("HMMA", "HGMMA", "HFMA2", "HMUL2", "HADD2", "FFMA", "FMUL", "FADD", "IMMA")
TENSOR_OPS = ("HMMA", "HGMMA")  # mma.sync, and wgmma (sm_90a)
NOT_COUNTED = ("NOP",)


# ----------------------------------------------------------------------------- tools

def find_nvcc() -> str | None:
    return shutil.which("nvcc")


def nvcc_major(nvcc: str) -> int:
    """The CUDA release of `nvcc` (its major version; 0 where it does not say)."""
    r = subprocess.run([nvcc, "--version"], capture_output=True, text=True)
    m = re.search(r"release (\d+)\.", r.stdout)
    return int(m.group(1)) if m else 0


# the first nvcc that compiles sm_90a (the toolchain module is standard library only: no torch import)
WGMMA_MIN_CUDA = runpy.run_path(str(ROOT / "awqlib" / "toolchain.py"))["ARCH_SPECIFIC_MIN_CUDA"]


def find_cuobjdump() -> str | None:
    """cuobjdump on PATH, else the one in the triton wheel (triton/backends/nvidia/bin)."""
    exe = shutil.which("cuobjdump")
    if exe:
        return exe
    try:
        import importlib.util
        spec = importlib.util.find_spec("triton")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return None
    for base in spec.submodule_search_locations:
        cand = Path(base) / "backends" / "nvidia" / "bin" / "cuobjdump"
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    return None


# ----------------------------------------------------------------------------- mangled names

def _parse_template_args(s: str, i: int) -> tuple[list, int]:
    """Itanium template-argument list starting after 'I' at s[i]; returns (args, index after 'E').
    Handles what our kernels use: literals (Li1E, Lb0E), plain type names (6__half) and float (f)."""
    args = []
    while s[i] != "E":
        if s[i] == "f":
            args.append("float")
            i += 1
        elif s[i] == "L":
            j = s.index("E", i)
            lit = s[i + 1:j]
            m = re.fullmatch(r"([a-z])(n?\d+)", lit)
            if not m:
                raise ValueError(f"unsupported literal {lit!r}")
            v = int(m.group(2).replace("n", "-"))
            args.append(bool(v) if m.group(1) == "b" else v)
            i = j + 1
        elif s[i].isdigit():
            m = re.match(r"\d+", s[i:])
            n = int(m.group(0))
            start = i + len(m.group(0))
            args.append(s[start:start + n])
            i = start + n
        else:
            raise ValueError(f"unsupported template argument at {s[i:i + 20]!r}")
    return args, i + 1


def kernel_name(mangled: str) -> tuple[str, list]:
    """('awq_skinny_kernel', ['__half', 1, 2, True]) from a mangled entry name."""
    for m in re.finditer(r"(?=(\d+)(awq_\w+))", mangled):  # lookahead: overlapping candidates
        n = int(m.group(1))
        name = m.group(2)[:n]
        rest = m.start(2) + n
        if len(name) == n and name.endswith("kernel"):
            if rest < len(mangled) and mangled[rest] == "I":
                args, _ = _parse_template_args(mangled, rest + 1)
                return name, args
            return name, []
    return mangled, []


def pretty(name: str, args: list) -> str:
    if name == "awq_stream_kernel" and len(args) == 7:  # CONFIG by its name (STREAM_CONFIGS)
        args = [*args[:5], STREAM_CONFIG_NAMES.get(args[5], args[5]), args[6]]

    def fmt(a):
        return {"__half": "half", "__nv_bfloat16": "bf16"}.get(a, str(a).lower() if isinstance(a, bool) else str(a))
    return f"{name}<{', '.join(fmt(a) for a in args)}>" if args else name


# ----------------------------------------------------------------------------- kernel knowledge

@dataclass
class Spec:
    threads: int            # threads per CTA
    dyn_smem: int           # dynamic shared memory per CTA (bytes)
    bytes_per_iter: int     # int4 weight bytes the whole CTA streams per hot-loop iteration
    hmma_per_iter: int | None = None  # expected tensor instructions per warp per iteration (cross-check), if any
    note: str = ""
    tensor_op: str = "HMMA"  # which: mma.sync's HMMA, or wgmma's HGMMA


def _skinny_spec(args) -> Spec:
    _, mt, depth, _tiled = args
    # 4 warps, each a 32-row x 64-column chunk (1 KB) per ring slot, depth slots per iteration.
    return Spec(128, 0, 4 * depth * 1024, 16 * depth * mt)


STREAM_CONFIGS = {"large": 0, "compact": 1, "deep": 2, "wgmma": 3, "wide": 4}  # csrc/awq_kernels.h: StreamConfig
STREAM_CONFIG_NAMES = {v: k for k, v in STREAM_CONFIGS.items()}


def _stream_spec(args) -> Spec:
    # awq_stream_kernel<T, MB, EXACT, FINE, SUMS, CONFIG, NARROW>: mirror of StreamCfg in
    # csrc/awq_stream.cu (8 warps = NA n-atoms x 8 / NA k-slices of KA atoms: NA = 2, or 4 wide; a
    # stage is 16 KA x 8 / NA rows x 64 NA columns; compact: KA = 4, and 2 stages at MB = 2; deep: 4
    # stages; wide: 3 stages at MB = 2, 4 at MB = 4).  Per atom a warp runs 8 mma per m16 tile, or
    # narrow 4 (16 columns each).  wgmma: 2 warpgroups x all 4 KA atoms of the stage, one wgmma per
    # atom; 4 stages (3 at MB = 2, 5 of KA = 2 at MB = 8) on 1024-byte boundaries, plus 1 KB to find one.
    _, mb, _exact, _fine, _sums, config, narrow = args
    compact = config == STREAM_CONFIGS["compact"]
    wgmma = config == STREAM_CONFIGS["wgmma"]
    wide = config == STREAM_CONFIGS["wide"]
    na = 4 if wide else 2
    slice_n = 64 * na
    ka = 2 if mb == 8 else 4 if mb == 4 or compact else 8
    stages = (2 if compact and mb == 2 else 4 if config == STREAM_CONFIGS["deep"]
              else (3 if mb == 2 else 5 if mb == 8 else 4) if wgmma else (4 if mb == 4 else 3) if wide else 3)
    stage_k = 16 * ka * (8 // na)
    b_bytes = stage_k * slice_n // 2
    groups = stage_k // 32
    stage = b_bytes + 16 * mb * stage_k * 2 + groups * slice_n * 2 + groups * slice_n // 8 * 4
    if wgmma:
        stage = -(-stage // 1024) * 1024
        return Spec(256, stages * stage + 1024, b_bytes, ka * 4, tensor_op="HGMMA")
    return Spec(256, stages * stage, b_bytes, ka * 4 if narrow else ka * 8 * mb)


SPECS = {
    "awq_stream_kernel": _stream_spec,
    "awq_skinny_kernel": _skinny_spec,
}


# ----------------------------------------------------------------------------- SASS analysis

INSN_RE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?);")


@dataclass
class Insn:
    addr: int
    pred: str
    op: str
    text: str


def parse_sass(text: str) -> dict[str, list[Insn]]:
    """cuobjdump -sass output -> {mangled function: instructions}."""
    funcs: dict[str, list[Insn]] = {}
    cur = None
    for line in text.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            cur = funcs.setdefault(m.group(1), [])
            continue
        m = INSN_RE.match(line)
        if m and cur is not None:
            body = m.group(2).strip()
            pred = ""
            if body.startswith("@"):
                pred, body = body.split(None, 1)
            op = body.split()[0] if body else ""
            cur.append(Insn(int(m.group(1), 16), pred, op, body))
    return funcs


# (not wgmma's gdesc[URk]: the A and B matrix descriptors in URk..URk+3, of which an A from
# registers leaves the first pair unwritten)
DESC_RE = re.compile(r"(?<!g)desc\[(UR\d+)\]")
UR_DEST_RE = re.compile(r"^(?:U\w*|S2UR|R2UR|LDCU)(?:\.\S+)*\s+(UR\d+)")


def unwritten_descriptors(insns: list[Insn]) -> list[str]:
    """Memory instructions whose cache-policy descriptor (``desc[URk]``) is read from a uniform
    register no instruction of the function writes.  ptxas 13.0 emitted such copies for a hinted
    ``cp.async ... L2::cache_hint`` with an immediate offset, and an H200 faults on them
    ("illegal instruction"): a compiler bug this check keeps out of the kernels."""
    written = {m.group(1) for i in insns if (m := UR_DEST_RE.match(i.text))}
    return [f"{i.addr:04x}: {i.text}" for i in insns
            if (m := DESC_RE.search(i.text)) and m.group(1) not in written]


def loops(insns: list[Insn]) -> list[tuple[int, int]]:
    """(start, end) address ranges closed by backward branches."""
    out = []
    for ins in insns:
        if ins.op.startswith("BRA"):
            m = re.search(r"0x([0-9a-f]+)", ins.text)
            if m and int(m.group(1), 16) <= ins.addr:
                out.append((int(m.group(1), 16), ins.addr))
    return out


def opclass(op: str) -> str:
    return op.split(".")[0]


@dataclass
class LoopStats:
    start: int
    end: int
    instructions: int
    math: int
    by_op: dict = field(default_factory=dict)
    nested_loops: int = 0
    cold_instructions: int = 0
    # in order, the in-flight wgmma groups each WARPGROUP.DEPBAR.LE of the loop leaves (its immediate):
    # what the source asked for, unless ptxas changed it -- checked directly, as ptxas does not always
    # say when it lets registers be rewritten under a wgmma in flight
    wgmma_waits: list = field(default_factory=list)


def cold_ranges(insns: list[Insn], s: int, e: int) -> list[tuple[int, int]]:
    """Inside loop [s, e]: address ranges skipped by a forward conditional branch whose skipped
    code stores to global memory (STG/ATOMG/RED) or calls a function: an epilogue (e.g. a
    slice-end flush) that runs once per output tile, not once per iteration."""
    out = []
    for ins in insns:
        if s <= ins.addr <= e and ins.op.startswith("BRA") and ins.pred:
            m = re.search(r"0x([0-9a-f]+)", ins.text)
            tgt = int(m.group(1), 16) if m else -1
            if ins.addr < tgt <= e + 16:
                body = [i for i in insns if ins.addr < i.addr < tgt]
                if any(opclass(i.op) in ("STG", "ATOMG", "RED", "CALL") for i in body):
                    out.append((ins.addr + 1, tgt - 1))
    return out


def hot_loop(insns: list[Insn]) -> LoopStats | None:
    best = None
    all_loops = loops(insns)
    for (s, e) in all_loops:
        cold = cold_ranges(insns, s, e)
        body = [i for i in insns if s <= i.addr <= e and opclass(i.op) not in NOT_COUNTED
                and not any(a <= i.addr <= b for a, b in cold)]
        by_op: dict[str, int] = {}
        for i in body:
            by_op[opclass(i.op)] = by_op.get(opclass(i.op), 0) + 1
        math = sum(by_op.get(o, 0) for o in MATH_OPS)
        nested = sum(1 for (s2, e2) in all_loops if (s2, e2) != (s, e) and s <= s2 and e2 <= e)
        n_cold = sum(1 for i in insns if any(a <= i.addr <= b for a, b in cold) and opclass(i.op) not in NOT_COUNTED)
        waits = [int(m.group(1), 16) for i in body if i.op.startswith("WARPGROUP.DEPBAR")
                 for m in [re.search(r"gsb0,\s*0x([0-9a-f]+)", i.text)] if m]
        st = LoopStats(s, e, len(body), math, dict(sorted(by_op.items(), key=lambda kv: -kv[1])), nested, n_cold,
                       waits)
        def tensor(x):
            return sum(x.by_op.get(o, 0) for o in TENSOR_OPS)
        key = (tensor(st), st.math, -st.instructions)
        if best is None or key > (tensor(best), best.math, -best.instructions):
            best = st
    return best if best is not None and best.math > 0 else None


# ----------------------------------------------------------------------------- compile + report

@dataclass
class KernelReport:
    arch: str
    file: str
    kernel: str
    mangled: str
    registers: int
    spill_stores: int
    spill_loads: int
    stack: int
    static_smem: int
    dyn_smem: int | None
    threads: int | None
    ctas_per_sm: int | None
    ctas_limited_by: str | None
    loop: dict | None
    bytes_per_iter: int | None
    instr_per_kb: float | None
    issue_tbps_h200: float | None
    check: str = ""
    unwritten_desc: list[str] = field(default_factory=list)  # unwritten_descriptors(): must stay empty
    wgmma_serialized: bool = False  # ptxas serialized its wgmma (each waits for the last): must stay False
    wgmma_wait_injected: bool = False  # ptxas added a wgmma wait the source did not ask for: must stay False
    early_launch: bool = False  # holds PREEXIT (griddepcontrol.launch_dependents): the next kernel may launch early


def ctas_per_sm(arch: str, regs: int, threads: int, smem: int) -> tuple[int, str]:
    lim = ARCH_LIMITS[arch]
    warps = -(-threads // 32)
    per_warp = -(-max(regs, 1) * 32 // 256) * 256            # allocation unit: 256 registers per warp
    by_regs = (lim["regs"] // per_warp) // warps
    by_threads = lim["threads"] // threads
    if smem > lim["smem_cta"]:  # more than a block may opt in to: it cannot launch at all
        by_smem = 0
    else:
        by_smem = lim["smem_sm"] // (smem + lim["smem_reserved"]) if smem > 0 else lim["ctas"]
    cands = {"registers": by_regs, "threads": by_threads, "smem": by_smem, "ctas": lim["ctas"]}
    which = min(cands, key=lambda k: cands[k])
    return cands[which], which


PTXAS_FUNC = re.compile(r"Function properties for (\S+)\s*\n\s*(\d+) bytes stack frame, (\d+) bytes spill stores, "
                        r"(\d+) bytes spill loads", re.M)
PTXAS_USED = re.compile(r"Compiling entry function '(\S+)' for 'sm_\d+a?'.*?Used (\d+) registers[^\n]*?(?:, (\d+) bytes smem)?",
                        re.S)


def compile_cubin(src: Path, arch: str, out_dir: Path, nvcc: str) -> tuple[Path, str]:
    cubin = out_dir / f"{src.stem}.sm{arch}.cubin"
    # Hopper builds target sm_90a (toolchain.arch_list_for) where nvcc compiles it: the wgmma kernels
    # exist only there, and the others compile to the same instructions as for sm_90.
    target = "sm_90a" if arch == "90" and nvcc_major(nvcc) >= WGMMA_MIN_CUDA else f"sm_{arch}"
    cmd = [nvcc, "-cubin", f"-arch={target}", "-O3", "-std=c++17", "-Xptxas=-v,-warn-spills", "-I", str(CSRC),
           "-diag-suppress", "177", "-o", str(cubin), str(src)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"nvcc failed for {src.name} sm_{arch}:\n{r.stderr[-4000:]}")
    return cubin, r.stderr


# ptxas's note where it could not keep a function's wgmma asynchronous ("Potential Performance Loss:
# wgmma.mma_async instructions are serialized due to ... in the function '<name>'")
WGMMA_SERIALIZED = re.compile(r"wgmma\.mma_async instructions are serialized[^\n]*?function '(\S+?)'")
# ... and where it made one wait for in-flight wgmma that the source leaves in flight ("(C7517)
# warpgroup.wait is injected in around line N by compiler to allow use of registers defined by GMMA
# in function '<name>'"): e.g. at a loop's back edge, for wgmma that might reach the exit unwaited
WGMMA_WAIT_INJECTED = re.compile(r"warpgroup\.wait is injected[^\n]*?function '(\S+?)'")


def analyse(src: Path, arch: str, cubin: Path, ptxas_log: str, cuobjdump: str) -> list[KernelReport]:
    spills = {m.group(1): tuple(int(m.group(i)) for i in (2, 3, 4)) for m in PTXAS_FUNC.finditer(ptxas_log)}
    serialized = {m.group(1) for m in WGMMA_SERIALIZED.finditer(ptxas_log)}
    injected = {m.group(1) for m in WGMMA_WAIT_INJECTED.finditer(ptxas_log)}
    res = subprocess.run([cuobjdump, "-res-usage", str(cubin)], capture_output=True, text=True, check=True).stdout
    usage = {}
    for m in re.finditer(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res):
        usage[m.group(1)] = tuple(int(m.group(i)) for i in (2, 3, 4, 5))
    sass = parse_sass(subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True,
                                     check=True).stdout)
    reports = []
    for mangled, insns in sorted(sass.items()):
        name, args = kernel_name(mangled)
        regs, stack, shared, _local = usage.get(mangled, (0, 0, 0, 0))
        stack_b, st, ld = spills.get(mangled, (stack, 0, 0))
        spec_fn = SPECS.get(name)
        spec = spec_fn(args) if spec_fn else None
        lp = hot_loop(insns) if spec else None
        threads = spec.threads if spec else None
        dyn = spec.dyn_smem if spec else None
        cta = lim_by = None
        if threads:
            cta, lim_by = ctas_per_sm(arch, regs, threads, shared + (dyn or 0))
        ipk = tbps = None
        check = ""
        if spec and lp:
            warps = threads // 32
            ipk = lp.instructions * warps / (spec.bytes_per_iter / 1024)
            tbps = H200_ISSUE / ipk * 1024 / 1e12
            if spec.hmma_per_iter is not None:
                got = lp.by_op.get(spec.tensor_op, 0)
                check = "ok" if got == spec.hmma_per_iter else f"{spec.tensor_op} {got} != expected {spec.hmma_per_iter}"
        reports.append(KernelReport(arch, src.name, pretty(name, args), mangled, regs, st, ld, stack_b, shared, dyn,
                                    threads, cta, lim_by, asdict(lp) if lp else None,
                                    spec.bytes_per_iter if spec else None,
                                    round(ipk, 1) if ipk else None, round(tbps, 2) if tbps else None, check,
                                    unwritten_descriptors(insns), mangled in serialized, mangled in injected,
                                    any(i.op == "PREEXIT" for i in insns)))
    return reports


def run(files: list[str] | None, archs: list[str], jobs: int = 2) -> list[KernelReport]:
    nvcc, cuobjdump = find_nvcc(), find_cuobjdump()
    if nvcc is None or cuobjdump is None:
        raise RuntimeError(f"need nvcc and cuobjdump (found nvcc={nvcc}, cuobjdump={cuobjdump})")
    srcs = sorted(CSRC.glob("*.cu")) if not files else [CSRC / f for f in files]
    with tempfile.TemporaryDirectory(prefix="sass_budget_") as tmp:
        tasks = [(s, a) for s in srcs for a in archs]
        with ThreadPoolExecutor(max_workers=jobs) as ex:
            built = list(ex.map(lambda t: (t, compile_cubin(t[0], t[1], Path(tmp), nvcc)), tasks))
        out = []
        for (src, arch), (cubin, log) in built:
            out += analyse(src, arch, cubin, log, cuobjdump)
    return out


def print_table(reports: list[KernelReport]) -> None:
    hdr = f"{'arch':4s} {'kernel':44s} {'regs':>4s} {'spill':>5s} {'smem':>6s} {'thr':>4s} {'CTA/SM':>10s} " \
          f"{'loop instr':>10s} {'B/iter':>6s} {'instr/KB':>8s} {'issue TB/s':>10s}"
    print(hdr)
    print("-" * len(hdr))
    for r in reports:
        smem = r.static_smem + (r.dyn_smem or 0)
        cta = f"{r.ctas_per_sm} ({r.ctas_limited_by[:4]})" if r.ctas_per_sm is not None else "-"
        loop = str(r.loop["instructions"]) if r.loop else "-"
        print(f"sm{r.arch:2s} {r.kernel:44s} {r.registers:4d} {r.spill_stores + r.spill_loads:5d} {smem:6d} "
              f"{(r.threads or 0):4d} {cta:>10s} {loop:>10s} {(r.bytes_per_iter or 0):6d} "
              f"{(r.instr_per_kb if r.instr_per_kb is not None else float('nan')):8.1f} "
              f"{(r.issue_tbps_h200 if r.issue_tbps_h200 is not None else float('nan')):10.2f}"
              + (f"  [{r.check}]" if r.check and r.check != "ok" else ""))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", nargs="+", default=["90", "80"], choices=sorted(ARCH_LIMITS))
    ap.add_argument("--files", nargs="+", default=None, help="csrc/*.cu files to compile (default: all)")
    ap.add_argument("--json", default=None, help="write the reports here")
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args(argv)
    reports = run(args.files, args.arch, args.jobs)
    print_table(reports)
    if args.json:
        # one kernel per line: readable diffs when the file is committed (benchmarks/sass_budget.json)
        Path(args.json).write_text("[\n" + ",\n".join(json.dumps(asdict(r)) for r in reports) + "\n]\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
