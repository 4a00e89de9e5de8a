"""The "a kernel that does not compile never lands" gate: compile csrc/ for sm_80 and sm_90 with
nvcc on a CPU-only machine (no GPU needed), plus CPU-only checks of the loader's behaviour.

About 1-2 minutes on 2 cores.  Skipped, with the reason, when nvcc or a CUDA build of torch is
missing; CI has both.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import types
import warnings
from pathlib import Path

import pytest
import torch

from awqlib import cli, kernels, safetensors_io, toolchain

# Ampere (A100) and Hopper (H100/H200: with wgmma where the toolkit compiles sm_90a); sm_89 runs the sm_80 cubin
ARCHS = "8.0;" + toolchain.arch_list_for(None, [(9, 0)], torch.version.cuda)
HOPPER_CODE = b"sm_90a" if toolchain.has_wgmma(ARCHS) else b"sm_90"


def keep_load_state(monkeypatch):
    """A test that simulates kernels._load() must not leave what it remembers (the backend) to the
    tests after it, which run on the process's real kernels."""
    monkeypatch.setattr(kernels, "_backend", kernels._backend)


def _skip_reason() -> str | None:
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build (need a CUDA build of torch to compile the kernels)"
    if kernels.find_cuda_home() is None:
        return "nvcc / CUDA toolkit not found (install the CUDA toolkit matching torch.version.cuda)"
    return None


@pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")
def test_kernels_compile_for_sm80_sm90(tmp_path):
    lib = kernels.build(ARCHS, build_dir=tmp_path)
    assert Path(lib).is_file() and Path(lib).stat().st_size > 0
    # The library registered CUDA kernels for every op, the block ops' included (their own
    # TORCH_LIBRARY_IMPL in awq_block_ops.cu); loading works without a GPU.
    for op in ("awq_gemm", "awq_gemm_add", "awq_dequantize", "awq_gemm_variant", "awq_gemm_kernel_name", "rms_norm",
               "add_rms_norm", "rotary", "gated_act"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"awqlib::{op}", "CUDA"), op
    # It answers whether its wgmma kernels run on a GPU (kernels.wgmma_available asks): on an
    # H100/H200 exactly when it was built for 9.0a without plain 9.0 code, never on anything else.
    runs_on = torch.ops.awqlib.stream_wgmma_runs_on
    assert runs_on(9, 0) is toolchain.has_wgmma(ARCHS) and not runs_on(8, 0) and not runs_on(10, 0)
    # A second copy loaded into the same process (another build, a prebuilt library beside a JIT one)
    # only registers the implementations again: it defines no schema, which would abort the load.
    again = tmp_path / "again" / Path(lib).name
    again.parent.mkdir()
    shutil.copyfile(lib, again)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.ops.load_library(str(again))
    assert runs_on(9, 0) is toolchain.has_wgmma(ARCHS)
    # The compiled code really contains both architectures.
    for obj in ("awq_stream.cuda.o", "awq_block_ops.cuda.o"):
        code = (tmp_path / obj).read_bytes()
        assert b"sm_80" in code and HOPPER_CODE in code, obj
    # Installed as prebuilt kernels, it serves both GPUs (and an sm_89 one by the sm_80 code), not older.
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    so = cli.install_prebuilt(lib, ARCHS, package_dir=pkg)
    assert so.read_bytes() == Path(lib).read_bytes()
    assert kernels.find_prebuilt([(8, 0), (8, 9), (9, 0)], pkg) == (so, None)
    assert "not for this machine's GPU (7.5)" in kernels.find_prebuilt([(9, 0), (7, 5)], pkg)[1]


def test_sources_found():
    """The build compiles every translation unit in csrc/ (a new .cu file cannot be left out), the
    host side (the ops' registration, ATen) first, then the kernels, which include no ATen."""
    names = [Path(s).name for s in kernels.sources()]
    on_disk = {p.name for p in kernels.source_dir().iterdir() if p.suffix in (".cu", ".cpp")}
    assert set(names) == on_disk and len(names) == len(on_disk)
    assert {"awq_ops.cpp", "awq_block_ops.cpp", "awq_stream.cu", "awq_dequant.cu", "awq_skinny.cu",
            "awq_block_ops.cu"} <= on_disk
    suffixes = [Path(n).suffix for n in names]
    assert suffixes == sorted(suffixes, key=lambda s: s != ".cpp")
    for n in names:
        if n.endswith(".cu"):
            text = (kernels.source_dir() / n).read_text()
            assert "<ATen/" not in text and "<torch/" not in text, n


def test_cache_dir_respects_env(monkeypatch, tmp_path):
    monkeypatch.setenv("AWQLIB_CACHE", str(tmp_path))
    d = kernels.cache_dir("8.0;9.0")
    assert d.parent == tmp_path and d.name.endswith("sm80-sm90")
    monkeypatch.delenv("AWQLIB_CACHE")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert kernels.cache_dir("8.0").parent == tmp_path / "awqlib"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only fallback")
def test_load_without_gpu_is_quiet_and_false():
    mod = importlib.reload(kernels)  # fresh state
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning, no exception on a CPU-only machine
        assert mod.load() is False
        assert mod.load() is False
    assert mod.backend() == "reference"


def test_build_without_gpu_needs_arch_list(monkeypatch):
    if torch.cuda.is_available() or _skip_reason() is not None:
        pytest.skip("only meaningful on a CPU-only machine with nvcc")
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    with pytest.raises(RuntimeError, match="arch"):
        kernels.build()


def test_skinny_fragment_mapping_emulation():
    """CPU emulation of one warp's k16 step on the GEMM layout (csrc/awq_common.cuh: mma_k16, the
    skinny kernel's step; awq_skinny.cu explains the column permutation), one m16 tile: which packed
    word / rows / nibbles each lane dequantizes for its B fragments, and where the epilogue stores
    its accumulators -- interpreted with the PTX-defined m16n8k16 fragment layouts -- must
    reproduce x @ W^T exactly."""
    from awqlib.packing import pack_columns

    K, N, BM = 16, 64, 16
    x = torch.randn(BM, K, dtype=torch.float64)
    codes = torch.randint(0, 16, (K, N))
    zero = 8
    qw = pack_columns(codes, 4).to(torch.int64) & 0xFFFFFFFF  # [K, 8] words, as unsigned

    def pair(word: int, p: int) -> tuple[int, int]:  # lop3 on (word >> 4p) & 0x000f000f
        w = word >> (4 * p)
        return w & 0xF, (w >> 16) & 0xF

    A = torch.full((16, 16), float("nan"), dtype=torch.float64)
    B = torch.full((8, 16, 8), float("nan"), dtype=torch.float64)  # [n8-tile t][k][slot]
    for lane in range(32):
        g, q = lane >> 2, lane & 3
        # PTX A fragment: R0 (row g, k 2q..), R1 (row g+8), R2 (row g, k 2q+8..), R3 (row g+8, k+8)
        for prow, pk in ((g, 2 * q), (g + 8, 2 * q), (g, 2 * q + 8), (g + 8, 2 * q + 8)):
            for e in range(2):
                A[prow, pk + e] = x[prow, pk + e]
        # B: word g of rows 2q, 2q+1, 2q+8, 2q+9; pair_lo -> tile 2p, pair_hi -> tile 2p+1.
        rows = (2 * q, 2 * q + 1, 2 * q + 8, 2 * q + 9)
        for p in range(4):
            d = {r: [c - zero for c in pair(int(qw[r, g]), p)] for r in rows}
            for t, h in ((2 * p, 0), (2 * p + 1, 1)):
                regs = ((d[rows[0]][h], d[rows[1]][h]), (d[rows[2]][h], d[rows[3]][h]))
                # PTX B fragment: R0 = (k 2q, 2q+1), R1 = (k 2q+8, 2q+9), column = groupID
                for r_i, kk in ((0, 2 * q), (1, 2 * q + 8)):
                    for e in range(2):
                        B[t, kk + e, g] = regs[r_i][e]
    assert not A.isnan().any() and not B.isnan().any()
    out = torch.full((BM, N), float("nan"), dtype=torch.float64)
    for t in range(8):
        D = A @ B[t]  # [16, 8]
        for lane in range(32):
            g, q = lane >> 2, lane & 3
            c = (D[g, 2 * q], D[g, 2 * q + 1], D[g + 8, 2 * q], D[g + 8, 2 * q + 1])
            for h in range(2):  # epilogue (awq_skinny.cu): c[2h] -> column 16q + t, c[2h+1] -> 16q + 8 + t
                out[g + 8 * h, 16 * q + t] = c[2 * h]
                out[g + 8 * h, 16 * q + 8 + t] = c[2 * h + 1]
    ref = x @ (codes - zero).to(torch.float64)
    torch.testing.assert_close(out, ref)


def test_source_constant_reads_the_kernels_limits(tmp_path, monkeypatch):
    """Tests and tables take the kernels' M limits from csrc/; a missing or twice-defined name is
    an error, never a guess."""
    assert kernels.source_constant("kSkinnyMaxM") >= 1
    assert kernels.source_constant("kSkinnyMaxMAuto") <= kernels.source_constant("kSkinnyMaxM")
    (tmp_path / "awq_ops.cpp").write_text("constexpr int64_t kA = 16;\nconstexpr int kB = 3;\n")
    (tmp_path / "awq_x.cuh").write_text("constexpr int kB = 4;\n")
    monkeypatch.setattr(kernels, "source_dir", lambda: tmp_path)
    assert kernels.source_constant("kA") == 16
    with pytest.raises(KeyError, match="kB defined 2 times"):
        kernels.source_constant("kB")
    with pytest.raises(KeyError, match="kMissing defined 0 times"):
        kernels.source_constant("kMissing")


# ----------------------------------------------------------------------------- prebuilt kernels
# A library built on one machine (e.g. this one, for a GPU machine with the same torch) is loaded
# only where its build record matches: the same file, torch, CUDA, a build for the GPUs, the same
# kernel sources.  Loading a library built against another torch can crash rather than fail, and
# one built from older sources would run other code than the checkout's, silently.

@pytest.fixture
def pkg(tmp_path):
    """A package folder holding prebuilt 'kernels' (any bytes: nothing here loads them) for 8.0 and 9.0."""
    (tmp_path / "built.so").write_bytes(b"\x7fELF not really a library")
    d = tmp_path / "pkg"
    d.mkdir()
    cli.install_prebuilt(tmp_path / "built.so", "8.0;9.0", package_dir=d)
    return d


def _edit_record(pkg: Path, **changes) -> None:
    rec = json.loads((pkg / "_C.json").read_text())
    rec.update(changes)
    (pkg / "_C.json").write_text(json.dumps(rec))


def test_prebuilt_record_matches_its_build(pkg):
    rec = json.loads((pkg / "_C.json").read_text())
    assert rec["library"] == "_C.so" and rec["torch"] == torch.__version__.split("+")[0] and rec["archs"] == "8.0;9.0"
    assert kernels.find_prebuilt([(9, 0)], pkg) == (pkg / "_C.so", None)
    assert kernels.find_prebuilt([(8, 6), (9, 0)], pkg) == (pkg / "_C.so", None)  # sm_80 code runs on any 8.x
    assert kernels.find_prebuilt([(9, 0)], pkg.parent / "nothing") == (None, None)


@pytest.mark.parametrize("archs, cap, ok", [
    ("9.0", (9, 0), True), ("9.0", (10, 0), False), ("9.0", (8, 0), False), ("8.0 9.0", (9, 0), True),
    ("8.6", (8, 0), False), ("8.0", (8, 6), True),
    ("9.0a", (9, 0), True), ("8.0a", (8, 6), False), ("8.0;9.0a", (9, 0), True),  # arch-specific: its GPU alone
    ("8.0+PTX", (12, 0), True), ("9.0+PTX", (8, 0), False),  # PTX: the driver compiles it for later GPUs only
    ("9.0a+PTX", (10, 0), False), ("9.0a+PTX", (9, 0), True),  # ... and arch-specific PTX for its own
    ("10.0f", (10, 3), True), ("10.0f", (9, 0), False),
])
def test_prebuilt_arch_coverage(pkg, archs, cap, ok):
    _edit_record(pkg, archs=archs)
    assert (kernels.find_prebuilt([cap], pkg)[1] is None) == ok


def test_prebuilt_refused_when_anything_differs(pkg):
    rec = pkg / "_C.json"
    saved = rec.read_text()

    def problem_after(**changes):
        rec.write_text(saved)
        _edit_record(pkg, **changes)
        lib, why = kernels.find_prebuilt([(9, 0)], pkg)
        assert lib is None
        return why

    assert "built for torch 2.0.0" in problem_after(torch="2.0.0")
    assert "with CUDA 11.8" in problem_after(cuda="11.8")
    assert "not for this machine's GPU (9.0)" in problem_after(archs="8.0")
    (pkg.parent / "_C.so").write_bytes((pkg / "_C.so").read_bytes())  # a library outside the package folder
    assert "names '../_C.so'" in problem_after(library="../_C.so")
    assert "names 'built.so'" in problem_after(library="built.so")  # not a _C*.so
    assert "names '_C.cpython-311-x86_64-linux-gnu.so'" in problem_after(library="_C.cpython-311-x86_64-linux-gnu.so")
    assert "lacks one of" in problem_after(sources=None)
    rec.write_text(saved)
    (pkg / "_C.so").write_bytes((pkg / "_C.so").read_bytes() + b"\0")  # the library replaced, the record not
    assert "not the file its build record describes" in kernels.find_prebuilt([(9, 0)], pkg)[1]
    rec.write_text("[1, 2]")
    assert "lacks one of" in kernels.find_prebuilt([(9, 0)], pkg)[1]
    rec.write_text("{")
    assert "unreadable" in kernels.find_prebuilt([(9, 0)], pkg)[1]
    rec.unlink()
    assert "_C.so has no build record" in kernels.find_prebuilt([(9, 0)], pkg)[1]


def test_the_record_names_which_library_loads(pkg):
    """Beside another build's library (e.g. a pip-built _C.cpython-*.so), the recorded one is the
    one checked and loaded, whichever an import would find first."""
    (pkg / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(b"another build")
    assert kernels.find_prebuilt([(9, 0)], pkg) == (pkg / "_C.so", None)


def test_prebuilt_refused_after_a_source_change(pkg, monkeypatch, tmp_path):
    """One changed byte of any kernel source (a header too), a renamed source, or other nvcc flags,
    and the prebuilt library is stale."""
    assert kernels.find_prebuilt([(9, 0)], pkg)[1] is None
    csrc = tmp_path / "csrc"
    shutil.copytree(kernels.source_dir(), csrc)
    monkeypatch.setattr(kernels, "source_dir", lambda: csrc)
    assert kernels.find_prebuilt([(9, 0)], pkg)[1] is None  # a copy of the same sources
    digest = kernels.sources_digest(csrc)
    monkeypatch.setattr(toolchain, "NVCC_FLAGS", toolchain.NVCC_FLAGS + ["-G"])
    assert kernels.sources_digest(csrc) != digest
    monkeypatch.undo()
    monkeypatch.setattr(kernels, "source_dir", lambda: csrc)
    (csrc / "awq_dequant.cu").rename(csrc / "awq_dequant2.cu")
    assert kernels.sources_digest(csrc) != digest
    (csrc / "awq_dequant2.cu").rename(csrc / "awq_dequant.cu")
    common = csrc / "awq_common.cuh"
    common.write_text(common.read_text() + "\n")
    assert "other kernel sources" in kernels.find_prebuilt([(9, 0)], pkg)[1]


def test_the_record_describes_the_bytes_this_install_wrote(pkg, monkeypatch, tmp_path):
    """Two installs at once: the library on disk may be the other one's by the time the record is
    written, and the record must then not vouch for it."""
    (tmp_path / "mine.so").write_bytes(b"this install's build")
    write = safetensors_io.write_bytes_atomic

    def then_another_install(path, data):
        write(path, data)
        if path.suffix == ".so":
            path.write_bytes(b"another install's build, for other GPUs")
    monkeypatch.setattr(safetensors_io, "write_bytes_atomic", then_another_install)
    cli.install_prebuilt(tmp_path / "mine.so", "9.0", package_dir=pkg)
    assert "not the file its build record describes" in kernels.find_prebuilt([(9, 0)], pkg)[1]


def test_install_refuses_arch_names(pkg, tmp_path):
    (tmp_path / "new.so").write_bytes(b"a build")
    with pytest.raises(ValueError, match="MAJOR.MINOR"):
        cli.install_prebuilt(tmp_path / "new.so", "Hopper", package_dir=pkg)
    assert kernels.find_prebuilt([(9, 0)], pkg) == (pkg / "_C.so", None)  # the installed one untouched


def test_failed_install_leaves_no_record_of_the_old_library(pkg, monkeypatch, tmp_path):
    (tmp_path / "new.so").write_bytes(b"a newer build")

    def disk_full(*a):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(safetensors_io, "write_bytes_atomic", disk_full)
    with pytest.raises(OSError):
        cli.install_prebuilt(tmp_path / "new.so", "9.0", package_dir=pkg)
    assert not (pkg / "_C.json").exists()
    assert "no build record" in kernels.find_prebuilt([(9, 0)], pkg)[1]


def test_arch_lists_are_numbered():
    assert toolchain.arch_list_for("8.0 9.0a", []) == "8.0;9.0a"
    # a visible H100/H200 gets its arch-specific code (the wgmma kernels exist only there) where the
    # toolkit compiles it (CUDA 12 and later); where the toolkit is not known, plain 9.0
    assert toolchain.arch_list_for(None, [(9, 0), (8, 0), (9, 0)], "13.0") == "8.0;9.0a"
    assert toolchain.arch_list_for(None, [(9, 0)], "12.1") == "9.0a"
    assert toolchain.arch_list_for(None, [(9, 0)], "11.8") == "9.0"
    assert toolchain.arch_list_for(None, [(9, 0), (8, 0)]) == "8.0;9.0"
    assert toolchain.arch_list_for(None, [(8, 9), (12, 0)], "13.0") == "12.0;8.9"
    for bad in ("Hopper", "native", "9", "sm_90", ";", "8.0,9.0"):
        with pytest.raises(ValueError, match="MAJOR.MINOR"):
            toolchain.arch_list_for(bad, [])
    with pytest.raises(RuntimeError, match="no GPU visible"):
        toolchain.arch_list_for(None, [])


def test_cli_installs_prebuilt_kernels(pkg, monkeypatch, tmp_path, capsys):
    (tmp_path / "jit.so").write_bytes(b"freshly built")
    built = []
    monkeypatch.setattr(kernels, "build", lambda arch, verbose=False: built.append(arch) or str(tmp_path / "jit.so"))
    monkeypatch.setattr(kernels, "PACKAGE_DIR", pkg)
    with pytest.raises(ValueError, match="MAJOR.MINOR"):  # before a minute of compiling, not after
        cli.main(["build-kernels", "--arch", "Hopper", "--prebuilt"])
    assert built == []
    assert cli.main(["build-kernels", "--arch", "9.0", "--prebuilt"]) == 0
    assert capsys.readouterr().out.strip() == str(pkg / "_C.so")
    assert (pkg / "_C.so").read_bytes() == b"freshly built"
    assert json.loads((pkg / "_C.json").read_text())["archs"] == "9.0"


@pytest.mark.parametrize("stale", [False, True])
def test_load_uses_a_prebuilt_library_only_when_it_matches(pkg, monkeypatch, stale):
    """kernels.load() on a (simulated) machine with an H100 and an A100: the matching prebuilt library
    is loaded and nothing is compiled; a stale one is not loaded (with a warning saying why), and
    the JIT build serves instead."""
    keep_load_state(monkeypatch)
    monkeypatch.setattr(torch.version, "cuda", torch.version.cuda or "13.0")
    cli.install_prebuilt(pkg / "_C.so", "8.0;9.0", package_dir=pkg)  # the record under that CUDA
    if stale:
        _edit_record(pkg, archs="9.0")  # not for the A100
    loaded, built = [], []
    monkeypatch.setattr(kernels, "PACKAGE_DIR", pkg)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: [(9, 0), (8, 0)][i])
    monkeypatch.setattr(torch._C, "_dispatch_has_kernel_for_dispatch_key", lambda *a: False)
    monkeypatch.setattr(torch.ops, "load_library", loaded.append)
    monkeypatch.setattr(kernels, "find_cuda_home", lambda: "/cuda")
    monkeypatch.setattr(kernels, "build", lambda *a, **k: built.append(1) or "/cache/awqlib_kernels.so")
    monkeypatch.setattr(kernels, "_backend", "reference")
    if stale:
        with pytest.warns(UserWarning, match=r"not using the prebuilt CUDA kernels in .*: _C.so was built for 9.0, "
                                             r"not for this machine's GPU \(8.0\)"):
            assert kernels._load() is True
        assert loaded == [] and built == [1] and kernels.backend() == "jit"
    else:
        assert kernels._load() is True
        assert loaded == [str(pkg / "_C.so")] and built == [] and kernels.backend() == "prebuilt"


def test_load_never_raises_on_a_broken_installation(pkg, monkeypatch):
    keep_load_state(monkeypatch)
    monkeypatch.setattr(kernels, "PACKAGE_DIR", pkg)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: (9, 0))
    monkeypatch.setattr(torch.version, "cuda", torch.version.cuda or "13.0")
    monkeypatch.setattr(torch._C, "_dispatch_has_kernel_for_dispatch_key", lambda *a: False)

    def gone():
        raise FileNotFoundError("awqlib CUDA sources not found")
    monkeypatch.setattr(kernels, "source_dir", gone)
    monkeypatch.setattr(kernels, "find_cuda_home", lambda: None)
    monkeypatch.setattr(kernels, "_backend", "reference")
    with pytest.warns(UserWarning) as caught:
        assert kernels._load() is False
    said = [str(w.message) for w in caught]
    assert len(said) == 2 and "checking it failed (FileNotFoundError" in said[0] and "nvcc" in said[1], said


def test_wgmma_flag_follows_the_arch_list():
    """The host code learns that the build holds the wgmma kernels (csrc/awq_stream.cu:
    stream_wgmma_built) from AWQ_WGMMA_BUILT, which the flags carry exactly for an sm_90a build."""
    # a plain 9.0 beside 9.0a (machine code or PTX) might be what the driver picks: no wgmma then
    for archs, has in (("9.0a", True), ("8.0;9.0a", True), ("9.0a+PTX", True), ("9.0", False), ("8.0;9.0", False),
                       ("10.0a", False), ("8.0", False), ("9.0;9.0a", False), ("9.0a;9.0+PTX", False),
                       ("Hopper", False), ("native", False)):
        assert toolchain.has_wgmma(archs) is has, archs
        flags = toolchain.nvcc_flags(archs)
        assert flags[:len(toolchain.NVCC_FLAGS)] == toolchain.NVCC_FLAGS
        assert (toolchain.WGMMA_DEFINE in flags) is has, archs
    assert toolchain.nvcc_flags(None) == toolchain.NVCC_FLAGS
    assert kernels.cache_dir("9.0a").name.endswith("-sm90a")


def test_jit_build_compiles_for_the_list_it_records(monkeypatch, tmp_path):
    """kernels.build: a numbered list (or the visible GPU's) is what torch compiles, with the wgmma
    define exactly for a 9.0a build; a named one (Hopper, native) goes to torch as given, without it."""
    import torch.utils.cpp_extension as cpp
    monkeypatch.setenv("CUDA_HOME", os.environ.get("CUDA_HOME", str(tmp_path)))  # build() sets both: restored
    monkeypatch.setattr(cpp, "CUDA_HOME", cpp.CUDA_HOME)
    seen = []
    monkeypatch.setattr(cpp, "load", lambda **kw: seen.append((os.environ.get("TORCH_CUDA_ARCH_LIST"),
                                                                kw["extra_cuda_cflags"])))
    monkeypatch.setattr(kernels, "find_cuda_home", lambda: str(tmp_path))
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    keep_load_state(monkeypatch)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "7.5")  # restored after each build
    for requested, archs, define in (("9.0a", "9.0a", True), ("8.0 9.0a", "8.0;9.0a", True), ("8.0;9.0", "8.0;9.0", False),
                                     ("Hopper", "Hopper", False), ("native", "native", False)):
        kernels.build(requested, build_dir=tmp_path)
        env, flags = seen[-1]
        assert env == archs and (toolchain.WGMMA_DEFINE in flags) is define, (requested, seen[-1])
        assert os.environ["TORCH_CUDA_ARCH_LIST"] == "7.5"
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    monkeypatch.setattr(kernels, "visible_capabilities", lambda: [(9, 0)])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    kernels.build(build_dir=tmp_path)  # the visible H100
    assert seen[-1] == ("9.0a", toolchain.nvcc_flags("9.0a")) and "TORCH_CUDA_ARCH_LIST" not in os.environ
