"""Build and load the CUDA kernels (``csrc/``) that serve ``torch.ops.awqlib.*`` on CUDA tensors.

:func:`load` is called lazily (never at ``import awqlib``) the first time a CUDA device needs the
ops.  It tries, in order:

a. a prebuilt library ``awqlib/_C*.so`` (``AWQLIB_BUILD_CUDA=1 pip install --no-build-isolation .``,
   or ``awqlib build-kernels --arch 9.0 --prebuilt``), when its build record (``_C.json`` beside it)
   matches this process: the same file, torch and CUDA version, a build for this GPU, and the
   kernel sources of this installation (:func:`prebuilt_problem`; else it says why and goes on);
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

import importlib.util
import logging
import os
import re
import threading
import warnings
from pathlib import Path

import torch

from .safetensors_io import read_json_object, write_bytes_atomic, write_json_atomic
from .toolchain import BUILD_RECORD, NVCC_FLAGS, build_record, cuda_sources, file_digest, find_cuda_home, host_cflags
from .toolchain import arch_list_for, sources_digest

log = logging.getLogger("awqlib")

EXTENSION_NAME = "awqlib_kernels"
PREBUILT_NAME = "_C.so"  # what install_prebuilt writes into the package (any CPython finds it as awqlib._C)
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
             if p.suffix in (".h", ".cuh", ".cu", ".cpp") for m in pattern.finditer(p.read_text())]
    if len(found) != 1:
        raise KeyError(f"integer constant {name} defined {len(found)} times in csrc/ ({found}); expected once")
    return found[0][1]



def _arch_tag(arch_list: str | None) -> str:
    if arch_list:
        return "-".join("sm" + a.replace(".", "").replace("+PTX", "ptx") for a in re.split(r"[;\s,]+", arch_list) if a)
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
    tag = f"torch{torch.__version__.split('+')[0]}-cu{torch.version.cuda}-{_arch_tag(arch_list)}"
    return base / tag


# ----------------------------------------------------------------------------- building

def resolved_arch_list(arch_list: str | None = None) -> str:
    """The architectures :func:`build` compiles for: ``arch_list``, else ``$TORCH_CUDA_ARCH_LIST``,
    else the visible GPUs'."""
    caps = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []
    return arch_list_for(arch_list or os.environ.get("TORCH_CUDA_ARCH_LIST") or None, caps)


def build(arch_list: str | None = None, verbose: bool = False, build_dir: str | os.PathLike | None = None) -> str:
    """Compile (and load) the extension; return the path of the shared library.

    ``arch_list`` like ``"8.0;9.0"`` (TORCH_CUDA_ARCH_LIST syntax) compiles for those GPUs and is
    required when no GPU is visible; default: ``$TORCH_CUDA_ARCH_LIST`` or the current GPU.
    Raises on failure (unlike :func:`load`).
    """
    from . import ops  # noqa: F401  -- the schemas must exist before the library registers impls

    if torch.version.cuda is None:
        raise RuntimeError(f"torch {torch.__version__} is a CPU-only build; install a CUDA build of torch")
    cuda_home = find_cuda_home()
    if cuda_home is None:
        raise RuntimeError(_nvcc_hint())
    arch_list = arch_list or os.environ.get("TORCH_CUDA_ARCH_LIST") or None
    if arch_list is None and not torch.cuda.is_available():
        raise RuntimeError("no GPU visible: pass an architecture list, e.g. build('8.0;9.0')")

    import torch.utils.cpp_extension as cpp

    os.environ["CUDA_HOME"] = cuda_home
    cpp.CUDA_HOME = cuda_home  # the module caches its guess at import time
    out = Path(build_dir) if build_dir is not None else cache_dir(arch_list)
    out.mkdir(parents=True, exist_ok=True)

    saved = os.environ.get("TORCH_CUDA_ARCH_LIST")
    try:
        if arch_list is not None:
            os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
        cpp.load(name=EXTENSION_NAME, sources=sources(), extra_cflags=host_cflags(),
                 extra_cuda_cflags=NVCC_FLAGS, build_directory=str(out), verbose=verbose,
                 is_python_module=False)
    finally:
        if saved is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = saved
    lib = out / f"{EXTENSION_NAME}.so"
    log.info("awqlib: built CUDA kernels for %s in %s", arch_list or _arch_tag(None), lib)
    return str(lib)


def install_prebuilt(lib: str | os.PathLike, arch_list: str, package_dir: str | os.PathLike | None = None) -> Path:
    """Make the library ``lib`` (built by :func:`build` for ``arch_list``, by this torch) the prebuilt
    kernels of the package (``awqlib/_C.so`` and its build record), which every later process with
    this torch loads instead of compiling -- e.g. a library built on one machine for a GPU machine
    that has the same torch.  Returns the installed library's path."""
    dest = Path(package_dir) if package_dir is not None else Path(__file__).resolve().parent
    record = dest / BUILD_RECORD
    record.unlink(missing_ok=True)  # never a record beside a library it does not describe
    so = dest / PREBUILT_NAME
    write_bytes_atomic(so, Path(lib).read_bytes())
    write_json_atomic(record, build_record(so, torch.__version__, torch.version.cuda or "", arch_list, source_dir()))
    log.info("awqlib: installed prebuilt CUDA kernels for %s as %s", arch_list, so)
    return so


def _covers(arch_list: str, capability: tuple[int, int]) -> bool:
    """Whether a build for ``arch_list`` (TORCH_CUDA_ARCH_LIST syntax) runs on a GPU of ``capability``:
    machine code runs on its own major version at the same or a later minor one (arch-specific
    code such as 9.0a on its own GPU alone), and +PTX code on any later GPU (the driver compiles it)."""
    for entry in re.split(r"[;\s,]+", arch_list.strip()):
        m = re.fullmatch(r"(\d+)\.(\d+)([af]?)(\+PTX)?", entry)
        if not m:
            continue
        built = (int(m[1]), int(m[2]))
        if m[4] and built <= capability:
            return True
        if built == capability or (not m[3] and built[0] == capability[0] and built[1] <= capability[1]):
            return True
    return False


def prebuilt_problem(library: Path, capability: tuple[int, int]) -> str | None:
    """Why the prebuilt ``library`` must not serve this process (None: it may).  Loading a library
    built against another torch can crash rather than fail, and one built from other kernel
    sources would silently run other code than this installation's, so each must match its
    build record."""
    try:
        rec = read_json_object(library.parent, BUILD_RECORD)
    except FileNotFoundError:
        return f"it has no build record ({BUILD_RECORD} beside it)"
    except ValueError as e:
        return f"its build record is unreadable ({e})"
    keys = ("library", "library_sha256", "torch", "cuda", "archs", "sources")
    if any(not isinstance(rec.get(k), str) for k in keys):
        return f"its build record {library.parent / BUILD_RECORD} lacks one of {', '.join(keys)}"
    if rec["library"] != library.name or rec["library_sha256"] != file_digest(library):
        return f"its build record describes another file ({rec['library']})"
    here = (torch.__version__.split("+")[0], torch.version.cuda or "")
    if (rec["torch"], rec["cuda"]) != here:
        return f"it was built for torch {rec['torch']} with CUDA {rec['cuda']}, not torch {here[0]} with CUDA {here[1]}"
    if not _covers(rec["archs"], capability):
        return f"it was built for {rec['archs']}, not for this GPU ({capability[0]}.{capability[1]})"
    if rec["sources"] != sources_digest(source_dir()):
        return f"it was compiled from other kernel sources than {source_dir()}"
    return None


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


def load() -> bool:
    """Make the CUDA kernels serve the ops; True on success.  Never raises; warns at most once."""
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
    from . import ops  # noqa: F401  -- define the schemas first

    if torch._C._dispatch_has_kernel_for_dispatch_key("awqlib::awq_gemm", "CUDA"):
        _backend = "already loaded"  # e.g. by an explicit build() in this process
        log.info("awqlib: CUDA kernels already registered in this process")
        return True

    spec = importlib.util.find_spec("awqlib._C")
    if spec is not None and spec.origin and os.path.isfile(spec.origin):
        problem = prebuilt_problem(Path(spec.origin), cap)
        if problem:
            log.warning("awqlib: not using the prebuilt kernels %s: %s; trying a JIT build", spec.origin, problem)
        else:
            try:
                torch.ops.load_library(spec.origin)
                _backend = "prebuilt"
                log.info("awqlib: using the prebuilt CUDA kernels %s", spec.origin)
                return True
            except Exception as e:  # noqa: BLE001 -- e.g. a system library missing: fall through to JIT
                log.warning("awqlib: could not load the prebuilt kernels %s (%s); trying a JIT build", spec.origin, e)

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
