"""Build and load the CUDA kernels (``csrc/``) that serve ``torch.ops.awqlib.*`` on CUDA tensors.

:func:`load` is called lazily (never at ``import awqlib``) the first time a CUDA device needs the
ops.  It tries, in order:

a. a prebuilt library ``awqlib/_C*.so`` (``AWQLIB_BUILD_CUDA=1 pip install --no-build-isolation .``,
   or ``awqlib build-kernels --arch 9.0a --prebuilt``), the one its build record (``_C.json`` beside
   it) names, when the record matches this process: the file's digest, torch and CUDA version, a
   build for every visible GPU, and the kernel sources of this installation (:func:`find_prebuilt`;
   else it warns why and goes on);
b. a JIT build with :func:`torch.utils.cpp_extension.load` into a cache directory
   (``$AWQLIB_CACHE`` or ``$TORCH_EXTENSIONS_DIR/awqlib`` or ``~/.cache/awqlib/kernels``, then
   ``<torch version>-cu<cuda version>-<archs>``), compiled only for the GPU at hand unless
   ``TORCH_CUDA_ARCH_LIST`` is set;
c. otherwise (no CUDA device, no nvcc, a pre-Ampere GPU, a failed build) it warns once and returns
   False, and the PyTorch reference implementation keeps serving the ops.

Set ``AWQLIB_NO_KERNELS=1`` to force the reference implementation.

:func:`build` compiles ahead of time (``awqlib build-kernels``, CI) and works without a GPU when
given an architecture list such as ``"8.0;9.0"``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import warnings
from pathlib import Path

import torch

from .toolchain import (ARCH_ENTRY, BUILD_RECORD, RECORD_KEYS, SOURCE_SUFFIXES, arch_entries, arch_list_for,
                        nvcc_flags)
from .toolchain import cuda_sources, file_digest, find_cuda_home, host_cflags, sources_digest, torch_release

log = logging.getLogger("awqlib")

EXTENSION_NAME = "awqlib_kernels"
PREBUILT_NAME = "_C.so"  # what `awqlib build-kernels --prebuilt` writes into the package (cli.install_prebuilt)
PACKAGE_DIR = Path(__file__).resolve().parent  # where prebuilt kernels and their build record live
MIN_CAPABILITY = (8, 0)  # cp.async, ldmatrix, bf16 mma: Ampere and newer

_state: bool | None = None
_backend: str = "reference"
_lock = threading.Lock()


# ----------------------------------------------------------------------------- locating things

def source_dir() -> Path:
    """Directory holding the CUDA sources: ``awqlib/csrc`` in a wheel, ``<repo>/csrc`` in a checkout."""
    here = Path(__file__).resolve().parent
    for cand in (here / "csrc", here.parent / "csrc"):
        if (cand / "awq_ops.cpp").is_file():
            return cand
    raise FileNotFoundError(f"awqlib CUDA sources not found (looked in {here / 'csrc'} and {here.parent / 'csrc'})")


def sources() -> list[str]:
    return [str(p) for p in cuda_sources(source_dir())]


def source_constant(name: str) -> int:
    """The value of the integer constant ``name`` defined in the CUDA sources (``constexpr <type>
    name = <int>;``), so that tests and tables about the kernels' dispatch follow the code instead
    of restating its numbers.  Raises KeyError where it is not defined exactly once."""
    pattern = re.compile(rf"\bconstexpr\s+[\w:]+\s+{re.escape(name)}\s*=\s*(\d+)\s*;")
    found = [(p.name, int(m.group(1))) for p in sorted(source_dir().iterdir())
             if p.suffix in SOURCE_SUFFIXES for m in pattern.finditer(p.read_text())]
    if len(found) != 1:
        raise KeyError(f"integer constant {name} defined {len(found)} times in csrc/ ({found}); expected once")
    return found[0][1]



def _arch_tag(arch_list: str | None) -> str:
    if arch_list:
        return "-".join("sm" + a.replace(".", "").replace("+PTX", "ptx") for a in arch_entries(arch_list))
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return f"sm{major}{minor}"
    return "smunknown"


def cache_dir(arch_list: str | None = None) -> Path:
    if os.environ.get("AWQLIB_CACHE"):
        base = Path(os.environ["AWQLIB_CACHE"])
    elif os.environ.get("TORCH_EXTENSIONS_DIR"):
        base = Path(os.environ["TORCH_EXTENSIONS_DIR"]) / "awqlib"
    else:
        base = Path.home() / ".cache" / "awqlib" / "kernels"
    tag = f"torch{torch_release(torch.__version__)}-cu{torch.version.cuda}-{_arch_tag(arch_list)}"
    return base / tag


# ----------------------------------------------------------------------------- building

def visible_capabilities() -> list[tuple[int, int]]:
    """The compute capabilities of the GPUs this process sees (none without CUDA)."""
    if not torch.cuda.is_available():
        return []
    return [tuple(torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count())]


def resolved_arch_list(arch_list: str | None = None) -> str:
    """The architectures :func:`build` compiles for, numbered: ``arch_list``, else
    ``$TORCH_CUDA_ARCH_LIST``, else the visible GPUs'."""
    return arch_list_for(arch_list or os.environ.get("TORCH_CUDA_ARCH_LIST") or None, visible_capabilities(),
                         torch.version.cuda)


def build(arch_list: str | None = None, verbose: bool = False, build_dir: str | os.PathLike | None = None) -> str:
    """Compile (and load) the extension; return the path of the shared library.

    ``arch_list`` like ``"8.0;9.0"`` (TORCH_CUDA_ARCH_LIST syntax) compiles for those GPUs and is
    required when no GPU is visible; default: ``$TORCH_CUDA_ARCH_LIST`` or the current GPU.
    Raises on failure (unlike :func:`load`).
    """
    from . import blockops, ops  # noqa: F401  -- the schemas must exist before the library registers impls

    if torch.version.cuda is None:
        raise RuntimeError(f"torch {torch.__version__} is a CPU-only build; install a CUDA build of torch")
    cuda_home = find_cuda_home()
    if cuda_home is None:
        raise RuntimeError(_nvcc_hint())
    requested = arch_list or os.environ.get("TORCH_CUDA_ARCH_LIST") or None
    if requested is None and not torch.cuda.is_available():
        raise RuntimeError("no GPU visible: pass an architecture list, e.g. build('8.0;9.0')")
    # numbered, so that the flags (nvcc_flags: the wgmma kernels for 9.0a) and the cache follow it;
    # a named list (Hopper, native) goes to torch as given, without the wgmma kernels
    named = requested is not None and not all(ARCH_ENTRY.fullmatch(e) for e in arch_entries(requested))
    arch_list = requested if named else resolved_arch_list(requested)

    import torch.utils.cpp_extension as cpp

    os.environ["CUDA_HOME"] = cuda_home
    cpp.CUDA_HOME = cuda_home  # the module caches its guess at import time
    out = Path(build_dir) if build_dir is not None else cache_dir(arch_list)
    out.mkdir(parents=True, exist_ok=True)

    saved = os.environ.get("TORCH_CUDA_ARCH_LIST")
    try:
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
        cpp.load(name=EXTENSION_NAME, sources=sources(), extra_cflags=host_cflags(),
                 extra_cuda_cflags=nvcc_flags(arch_list), build_directory=str(out), verbose=verbose,
                 is_python_module=False)
    finally:
        if saved is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = saved
    lib = out / f"{EXTENSION_NAME}.so"
    log.info("awqlib: built CUDA kernels for %s in %s", arch_list, lib)
    return str(lib)


def _covers(arch_list: str, capability: tuple[int, int]) -> bool:
    """Whether a build for ``arch_list`` runs on a GPU of ``capability``.  Machine code runs on its
    own major version at the same or a later minor one, arch-specific code (9.0a) on its own GPU
    alone; PTX (+PTX) is compiled by the driver for the same or any later GPU, except arch-specific
    PTX, which only its own GPU accepts."""
    for entry in arch_entries(arch_list):
        m = ARCH_ENTRY.fullmatch(entry)
        if not m:
            continue
        built, suffix, ptx = (int(m[1]), int(m[2])), m[3], bool(m[4])
        if suffix == "a":
            ok = built == capability
        else:
            ok = (built[0] == capability[0] and built[1] <= capability[1]) or (ptx and not suffix and built <= capability)
        if ok:
            return True
    return False


def _read_record(package_dir: Path) -> dict:
    try:
        rec = json.loads((package_dir / BUILD_RECORD).read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:
        raise ValueError(f"its build record {package_dir / BUILD_RECORD} is unreadable ({e})") from None
    if not isinstance(rec, dict) or any(not isinstance(rec.get(k), str) for k in RECORD_KEYS):
        raise ValueError(f"its build record {package_dir / BUILD_RECORD} lacks one of {', '.join(RECORD_KEYS)}")
    return rec


def find_prebuilt(capabilities: list[tuple[int, int]],
                  package_dir: str | os.PathLike | None = None) -> tuple[Path | None, str | None]:
    """The prebuilt library that may serve this process on GPUs of ``capabilities``: (its path,
    None); (None, why not) where the package holds one that must not; (None, None) where it holds
    none.  The build record names the library, and every fact in it must match: loading a library
    built against another torch can crash rather than fail, one built for other GPUs fails at its
    first launch, and one compiled from other kernel sources would silently run other code than
    this installation's."""
    pkg = Path(package_dir) if package_dir is not None else PACKAGE_DIR
    found = sorted(p.name for p in pkg.glob("_C*.so"))
    try:
        rec = _read_record(pkg)
    except FileNotFoundError:
        return None, (f"{', '.join(found)} has no build record ({BUILD_RECORD} beside it)" if found else None)
    except ValueError as e:
        return None, str(e)
    name = rec["library"]
    if not re.fullmatch(r"_C[\w.-]*\.so", name) or not (pkg / name).is_file():
        return None, f"its build record names {name!r}, which is not a library in {pkg}"
    lib = pkg / name
    if file_digest(lib) != rec["library_sha256"]:
        return None, f"{name} is not the file its build record describes (replaced after it was written)"
    here = (torch_release(torch.__version__), torch.version.cuda or "")
    if (rec["torch"], rec["cuda"]) != here:
        return None, (f"{name} was built for torch {rec['torch']} with CUDA {rec['cuda']}, not torch {here[0]} with "
                      f"CUDA {here[1]}")
    missed = [f"{c[0]}.{c[1]}" for c in capabilities if not _covers(rec["archs"], c)]
    if missed:
        return None, f"{name} was built for {rec['archs']}, not for this machine's GPU ({', '.join(missed)})"
    if rec["sources"] != sources_digest(source_dir()):
        return None, f"{name} was compiled from other kernel sources than {source_dir()}"
    return lib, None


def _nvcc_hint() -> str:
    cu = torch.version.cuda or "?"
    major = cu.split(".")[0]
    return (f"awqlib: nvcc (the CUDA compiler) was not found, so the int4 CUDA kernels cannot be built and the "
            f"slower PyTorch reference implementation is used. Install the CUDA toolkit {cu} (matching "
            f"torch.version.cuda) and put its bin/ on PATH or set CUDA_HOME, or `pip install "
            f"nvidia-cuda-nvcc-cu{major}` / `pip install nvidia-cuda-nvcc` for CUDA {cu}.")


# ----------------------------------------------------------------------------- loading

def backend() -> str:
    """'prebuilt', 'jit' or 'reference' (after :func:`load`)."""
    return _backend


def wgmma_available() -> bool:
    """Whether the stream kernel's warpgroup-mma configuration (csrc/awq_stream.cu: kConfigWgmma,
    AWQLIB_STREAM_WGMMA=1) runs on the current GPU: the loaded kernels answer (built for 9.0a, on an
    sm_90 GPU: csrc/awq_ops.cpp, stream_wgmma_runs_on)."""
    return load() and bool(torch.ops.awqlib.stream_wgmma_runs_on(*torch.cuda.get_device_capability()))


def load() -> bool:
    """Make the CUDA kernels serve the ops; True on success.  Never raises; warns about what it could
    not use (a prebuilt library refused, a failed build), once per process."""
    global _state
    if _state is None:
        with _lock:
            if _state is None:
                _state = _load()
    return _state


def _load() -> bool:
    global _backend
    if os.environ.get("AWQLIB_NO_KERNELS", "") not in ("", "0"):
        log.info("awqlib: AWQLIB_NO_KERNELS set, using the PyTorch reference implementation")
        return False
    if torch.version.cuda is None or not torch.cuda.is_available():
        log.info("awqlib: no CUDA device, using the PyTorch reference implementation")
        return False
    cap = torch.cuda.get_device_capability()
    if cap < MIN_CAPABILITY:
        warnings.warn(f"awqlib: the int4 CUDA kernels need compute capability >= 8.0 (this GPU is "
                      f"{cap[0]}.{cap[1]}); using the PyTorch reference implementation", stacklevel=3)
        return False
    from . import blockops, ops  # noqa: F401  -- define the schemas first

    if torch._C._dispatch_has_kernel_for_dispatch_key("awqlib::awq_gemm", "CUDA"):
        _backend = "already loaded"  # e.g. by an explicit build() in this process
        log.info("awqlib: CUDA kernels already registered in this process")
        return True

    try:
        lib, problem = find_prebuilt(visible_capabilities())
    except Exception as e:  # noqa: BLE001 -- e.g. the kernel sources missing: never break loading
        lib, problem = None, f"checking it failed ({type(e).__name__}: {e})"
    if problem:
        warnings.warn(f"awqlib: not using the prebuilt CUDA kernels in {PACKAGE_DIR}: {problem}; the kernels are "
                      f"compiled instead where nvcc is found (rebuild the prebuilt ones, or delete them, to skip "
                      f"this warning)", stacklevel=3)
    if lib is not None:
        try:
            torch.ops.load_library(str(lib))
            _backend = "prebuilt"
            log.info("awqlib: using the prebuilt CUDA kernels %s", lib)
            return True
        except Exception as e:  # noqa: BLE001 -- e.g. a system library missing: fall through to JIT
            warnings.warn(f"awqlib: could not load the prebuilt CUDA kernels {lib} ({e}); the kernels are compiled "
                          "instead where nvcc is found", stacklevel=3)

    if find_cuda_home() is None:
        warnings.warn(_nvcc_hint(), stacklevel=3)
        return False
    try:
        path = build()
    except Exception as e:  # noqa: BLE001 -- must never break inference: fall back to the reference
        warnings.warn(f"awqlib: building the CUDA kernels failed ({type(e).__name__}: {str(e)[-2000:]}); using the "
                      f"PyTorch reference implementation", stacklevel=3)
        return False
    _backend = "jit"
    log.info("awqlib: using JIT-compiled CUDA kernels %s", path)
    return True


# ----------------------------------------------------------------------------- backend selection

_announced: set[str] = set()


def backend_for(device: torch.device) -> str:
    """Which implementation serves tensors on ``device`` (and build/load the kernels if it is CUDA)."""
    if device.type == "cuda":
        if load():
            return "cuda-kernels"
        return "reference (CUDA kernels unavailable)"
    return "reference"


def announce(device: torch.device) -> None:
    """Log once per device type which implementation runs."""
    if device.type in _announced:
        return
    _announced.add(device.type)
    log.info("awqlib: quantized linears on %s use the %s implementation", device.type, backend_for(device))
