"""`import awqlib` is cheap and works without optional packages."""

import subprocess
import sys


def test_import_needs_no_optional_packages():
    code = ("import sys; sys.modules['datasets'] = None; sys.modules['gguf'] = None; import awqlib, torch; "
            "assert 'awqlib.kernels' not in sys.modules or not awqlib.kernels._state; "
            "print(torch.ops.awqlib.awq_gemm)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "awq_gemm" in out.stdout
