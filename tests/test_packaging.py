"""The sdist is complete enough to run the tests from, and declares its license the SPDX way."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile

import pytest

from conftest import REPO


def copy_checkout(dest, *paths: str) -> list[str]:
    """The checkout's files (git's list: tracked and untracked-not-ignored; under ``paths`` only, if
    given) copied to ``dest``; their names."""
    pytest.importorskip("setuptools", minversion="77")
    if not (REPO / ".git").exists():
        pytest.skip("needs the git checkout (the file list comes from git)")
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", *paths], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (REPO / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, dest / f)
    return files


def test_sdist_ships_the_test_suite_and_spdx_license(tmp_path):
    src = tmp_path / "src"
    files = copy_checkout(src)
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(tmp_path / "dist")], cwd=src,
                   check=True, capture_output=True)
    (sdist,) = (tmp_path / "dist").glob("awqlib-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
        pkg_info = tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith("/PKG-INFO")
                                        and m.name.count("/") == 1)).read().decode()
    tests = {f for f in files if f.startswith("tests/")}
    assert "tests/conftest.py" in names and tests <= names, sorted(tests - names)
    assert {"docs/ECOSYSTEM.md", "benchmarks/RESULTS.md", "LICENSE"} <= names  # what README links to
    assert "License-Expression: Apache-2.0" in pkg_info and "License-File: LICENSE" in pkg_info


def test_build_ships_exactly_the_kernel_sources_of_csrc(tmp_path):
    """build_py copies csrc/ into the package as awqlib/csrc; a source an earlier build copied and
    csrc/ no longer has (a retired kernel) is removed, or the installed package would compile it."""
    src = tmp_path / "src"
    copy_checkout(src, "setup.py", "pyproject.toml", "README.md", "LICENSE", "awqlib", "csrc")
    lib = tmp_path / "lib"
    shipped = lib / "awqlib" / "csrc"
    shipped.mkdir(parents=True)
    (shipped / "awq_retired.cu").write_text("#error retired\n")  # an earlier build's copy
    (shipped / "notes.txt").write_text("not a kernel source: not ours to delete\n")
    subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(lib)], cwd=src, check=True,
                   capture_output=True)
    sources = {p.name for p in shipped.iterdir() if p.suffix in (".cu", ".cuh", ".h", ".cpp")}
    assert sources == {p.name for p in (src / "csrc").iterdir() if p.suffix in (".cu", ".cuh", ".h", ".cpp")}
    assert (shipped / "notes.txt").is_file()
