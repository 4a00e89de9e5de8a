"""Locating the CUDA toolchain and the kernel sources, and what a prebuilt library records about its
build (the sources' digest, its numbered architecture list: BUILD_RECORD): standard library only, so
that setup.py can use it (``runpy``) without importing torch or awqlib."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

NVCC_FLAGS = [
    "-O3",
    "-lineinfo",             # source lines in profilers, no runtime cost
    "-Xptxas=-warn-spills",  # surface register spills of the templated kernels at build time
]


SOURCE_SUFFIXES = (".cu", ".cuh", ".h", ".cpp")  # what csrc/ holds of the kernels' code

# Beside a prebuilt library (``awqlib/_C*.so``): what it was compiled from and for (build_record).
BUILD_RECORD = "_C.json"


def cuda_sources(csrc: Path) -> list[Path]:
    """The translation units of the extension: every .cpp, then every .cu file of ``csrc``."""
    return sorted(csrc.glob("*.cpp")) + sorted(csrc.glob("*.cu"))


def sources_digest(csrc: Path) -> str:
    """sha256 of the kernels' code: every source file of ``csrc`` (name and bytes, in name order) and
    the nvcc flags.  A prebuilt library whose digest differs was compiled from other code."""
    h = hashlib.sha256(repr(NVCC_FLAGS).encode())
    for f in sorted(p for p in csrc.iterdir() if p.suffix in SOURCE_SUFFIXES):
        data = f.read_bytes()
        h.update(f"\0{f.name}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


ARCH_ENTRY = re.compile(r"(\d+)\.(\d+)([af]?)(\+PTX)?")  # "9.0", "8.6+PTX", "9.0a": TORCH_CUDA_ARCH_LIST's entries
RECORD_KEYS = ("library", "library_sha256", "torch", "cuda", "archs", "sources")  # a build record's fields


def arch_entries(arch_list: str) -> list[str]:
    """The entries of a TORCH_CUDA_ARCH_LIST value (separated by ';' or spaces, as torch splits it)."""
    return [e for e in re.split(r"[;\s]+", arch_list.strip()) if e]


def torch_release(version: str) -> str:
    """'2.11.0' of '2.11.0+cu130': what a C++ extension's ABI follows (the CUDA version is recorded apart)."""
    return version.split("+")[0]


def arch_list_for(requested: str | None, capabilities: list[tuple[int, int]], cuda: str | None = None) -> str:
    """The architectures a build targets, as numbered entries a build record can be checked against:
    ``requested`` (TORCH_CUDA_ARCH_LIST syntax) if given, else those of the visible GPUs
    (``capabilities``; an H100/H200, 9.0, as 9.0a -- the code for it alone, with warpgroup mma --
    where the toolkit, CUDA ``cuda`` (torch.version.cuda, which nvcc must match), compiles it: 12.0
    and later).  Named entries (``Hopper``, ``native``) are refused: name the numbers."""
    if requested:
        entries = arch_entries(requested)
        bad = [e for e in entries if not ARCH_ENTRY.fullmatch(e)]
        if bad or not entries:
            raise ValueError(f"architecture list {requested!r}: {', '.join(bad) or 'empty'} is not of the form "
                             "MAJOR.MINOR[a|f][+PTX], e.g. '8.0;9.0' or '9.0a'")
        return ";".join(entries)
    if not capabilities:
        raise RuntimeError("no GPU visible: name the architectures, e.g. TORCH_CUDA_ARCH_LIST='8.0;9.0'")
    specific = cuda is not None and int(cuda.split(".")[0]) >= ARCH_SPECIFIC_MIN_CUDA
    return ";".join(sorted({f"{major}.{minor}" + ("a" if specific and (major, minor) in ARCH_SPECIFIC else "")
                            for major, minor in capabilities}))


# GPUs a build for the visible ones targets with their arch-specific code: 9.0a has wgmma, which
# csrc/awq_stream.cu's kConfigWgmma needs (its kernels compile to nothing for other targets).
ARCH_SPECIFIC = {(9, 0)}
ARCH_SPECIFIC_MIN_CUDA = 12  # the first toolkit that compiles sm_90a
WGMMA_DEFINE = "-DAWQ_WGMMA_BUILT"  # tells the host code that the build has the wgmma kernels


def has_wgmma(arch_list: str) -> bool:
    """Whether a build for ``arch_list`` runs the wgmma kernels on an H100/H200: it holds sm_90a code
    and no plain 9.0 code (machine code or PTX) the driver might pick instead, whose wgmma kernels
    are compiled out.  Named lists (``Hopper``) never: only numbers say what is built."""
    entries = [ARCH_ENTRY.fullmatch(e) for e in arch_entries(arch_list)]
    at_90 = {m.group(3) for m in entries if m and (m.group(1), m.group(2)) == ("9", "0")}
    return all(entries) and at_90 == {"a"}


def nvcc_flags(arch_list: str | None) -> list[str]:
    """NVCC_FLAGS for a build targeting ``arch_list`` (None: torch's default for the visible GPU)."""
    return NVCC_FLAGS + ([WGMMA_DEFINE] if arch_list and has_wgmma(arch_list) else [])


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def build_record(library: str, library_sha256: str, torch_version: str, cuda_version: str, arch_list: str,
                 csrc: Path) -> dict:
    """What a prebuilt library records about itself (BUILD_RECORD, written beside it): a process
    loads the file it names only when that file's digest, the torch, the GPUs and the kernel
    sources all match (awqlib.kernels.find_prebuilt)."""
    record = dict(zip(RECORD_KEYS, (library, library_sha256, torch_release(torch_version), cuda_version, arch_list,
                                    sources_digest(csrc))))
    return record


def _has_cuda_headers(root: str | os.PathLike) -> bool:
    return (Path(root) / "include" / "cuda_runtime.h").is_file() and (Path(root) / "bin" / "nvcc").exists()


def find_cuda_home() -> str | None:
    """A CUDA toolkit root with ``bin/nvcc`` and ``include/cuda_runtime.h``, or None.

    ``nvcc`` on PATH may be a wrapper script (e.g. ``/usr/local/bin/nvcc`` exec'ing the real one),
    in which case ``dirname(dirname(nvcc))`` -- torch's guess -- has no headers; ask nvcc itself.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root and _has_cuda_headers(root):
            return root
    nvcc = shutil.which("nvcc")
    candidates = []
    if nvcc:
        candidates.append(Path(nvcc).resolve().parent.parent)
    candidates.append(Path("/usr/local/cuda"))
    for cand in candidates:
        if _has_cuda_headers(cand):
            return str(cand)
    if nvcc:
        try:  # "#$ TOP=/usr/local/cuda-13.0/bin/.." in nvcc's dry-run output
            out = subprocess.run([nvcc, "-dryrun", "--version"], capture_output=True, text=True, timeout=30)
            m = re.search(r"TOP=(\S+)", out.stdout + out.stderr)
            if m and _has_cuda_headers(Path(m.group(1)).resolve()):
                return str(Path(m.group(1)).resolve())
        except (OSError, subprocess.SubprocessError):
            pass
    return None


def host_cflags() -> list[str]:
    """Host-compiler flags: torch's CUDAContext.h includes cuBLAS/cuSPARSE headers, which CUDA
    wheels ship under ``nvidia/cu13/include`` (or ``nvidia/<lib>/include`` for CUDA 12).  They go
    last in the search order (``-idirafter``) so the toolkit's own headers always win."""
    flags = ["-O3"]  # the C++ standard is torch's choice (C++20 for recent versions)
    try:
        import nvidia  # namespace package from the nvidia-* wheels torch depends on
    except ImportError:
        return flags
    for base in getattr(nvidia, "__path__", []):
        for inc in sorted(Path(base).glob("*/include")):
            if any(inc.glob("cublas*.h")) or any(inc.glob("cusparse*.h")):
                flags += ["-idirafter", str(inc)]
    return flags
