"""The sdist is complete enough to run the tests from, and declares its license the SPDX way."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile

import pytest

from conftest import REPO


def test_sdist_ships_the_test_suite_and_spdx_license(tmp_path):
    pytest.importorskip("setuptools", minversion="77")
    if not (REPO / ".git").exists():
        pytest.skip("needs the git checkout (the file list comes from git)")
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    src = tmp_path / "src"
    for f in files:
        if (REPO / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, src / f)
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
