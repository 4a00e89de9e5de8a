"""Build script.  Project metadata lives in pyproject.toml.

* Default: a pure-Python package (``pip install .`` never needs nvcc).  The CUDA sources from
  ``csrc/`` are shipped inside the package as ``awqlib/csrc`` so that ``awqlib.kernels`` can
  JIT-compile them on first use.
* ``AWQLIB_BUILD_CUDA=1 pip install --no-build-isolation .`` additionally compiles them ahead of
  time into ``awqlib/_C*.so`` (a plain TORCH_LIBRARY shared object, loaded with
  ``torch.ops.load_library``) for ``$TORCH_CUDA_ARCH_LIST`` (numbered, e.g. ``"8.0;9.0"``; needed
  where no GPU is visible) or the visible GPU, with its build record ``awqlib/_C.json``, which
  ``awqlib.kernels`` checks before it loads the library.
"""

from __future__ import annotations

import json
import os
import runpy
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent.resolve()
CSRC = ROOT / "csrc"
# awqlib/toolchain.py, run as a plain file: importing awqlib here would import torch before
# setuptools has set up the build
TOOLCHAIN = runpy.run_path(str(ROOT / "awqlib" / "toolchain.py"))


class BuildPyWithCudaSources(build_py):
    """Copy csrc/* into the built package as awqlib/csrc (found by awqlib.kernels.source_dir)."""

    def run(self):
        super().run()
        if not CSRC.is_dir():  # building from an sdist that already has awqlib/csrc
            return
        dst = Path(self.build_lib) / "awqlib" / "csrc"
        dst.mkdir(parents=True, exist_ok=True)
        suffixes = TOOLCHAIN["SOURCE_SUFFIXES"]
        # a kernel source an earlier build copied and csrc/ no longer has would be compiled (and
        # counted in the sources digest) by the installed package: this build's copies are csrc/'s
        for old in dst.iterdir():
            if old.suffix in suffixes and not (CSRC / old.name).is_file():
                old.unlink()
        for f in sorted(CSRC.iterdir()):
            if f.suffix in suffixes:
                shutil.copy2(f, dst / f.name)


def _cuda_extension():
    tool = TOOLCHAIN  # the toolchain discovery awqlib.kernels uses for JIT builds
    cuda_home = tool["find_cuda_home"]()
    if cuda_home and not os.environ.get("CUDA_HOME"):
        # torch guesses CUDA_HOME as dirname(dirname(which nvcc)), wrong for a wrapper script
        os.environ["CUDA_HOME"] = cuda_home
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    cxx = tool["host_cflags"]()
    sources = [str(p.relative_to(ROOT)) for p in tool["cuda_sources"](CSRC)]
    ext = CUDAExtension(
        name="awqlib._C",
        sources=sources,
        extra_compile_args={"cxx": cxx, "nvcc": tool["NVCC_FLAGS"]},
    )

    class BuildExtensionWithRecord(BuildExtension):
        """Write the library's build record beside it: awqlib.kernels loads a prebuilt library only
        where the record matches its torch, its GPU and its kernel sources."""

        def run(self):
            import torch

            # numbered architectures (the record is checked against them), asked for before compiling
            caps = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
            archs = tool["arch_list_for"](os.environ.get("TORCH_CUDA_ARCH_LIST"), caps, torch.version.cuda)
            # compiled for exactly those (9.0a for a visible H100, not torch's 9.0), with their flags
            os.environ["TORCH_CUDA_ARCH_LIST"] = archs
            ext.extra_compile_args["nvcc"] = tool["nvcc_flags"](archs)
            super().run()
            lib = Path(self.get_ext_fullpath(ext.name))
            record = tool["build_record"](lib.name, tool["file_digest"](lib), torch.__version__,
                                          torch.version.cuda or "", archs, CSRC)
            tmp = lib.parent / (tool["BUILD_RECORD"] + ".tmp")
            tmp.write_text(json.dumps(record, indent=2, sort_keys=True))
            os.replace(tmp, lib.parent / tool["BUILD_RECORD"])

    return [ext], {"build_ext": BuildExtensionWithRecord}


cmdclass = {"build_py": BuildPyWithCudaSources}
ext_modules = []
if os.environ.get("AWQLIB_BUILD_CUDA", "") not in ("", "0"):
    ext_modules, extra_cmds = _cuda_extension()
    cmdclass.update(extra_cmds)

setup(cmdclass=cmdclass, ext_modules=ext_modules)
