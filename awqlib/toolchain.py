"""Locating the CUDA toolchain and the kernel sources: standard library only, so that setup.py can
use it (``runpy``) without importing torch or awqlib."""

from __future__ import annotations

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


def cuda_sources(csrc: Path) -> list[Path]:
    """The translation units of the extension: every .cpp, then every .cu file of ``csrc``."""
    return sorted(csrc.glob("*.cpp")) + sorted(csrc.glob("*.cu"))


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
