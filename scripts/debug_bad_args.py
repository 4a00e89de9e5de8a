"""Reproduce the argument-check path of the CUDA op in isolation (one bad call per process), so a
crash in C++ error handling shows which call and, under cuda-gdb, where.  Device-machine helper:
    python scripts/debug_bad_args.py            # runs every case in a subprocess
    python scripts/debug_bad_args.py CASE       # one case in this process
"""
import faulthandler
import os
import subprocess
import sys

faulthandler.enable()
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

CASES = ["dtype", "features", "qzeros", "dtype_twice", "features_twice"]


def run_case(name: str) -> None:
    import torch
    from awqlib import kernels
    from awqlib.packing import pack_awq
    assert kernels.load()
    codes = torch.randint(0, 16, (128, 64), dtype=torch.int32, device="cuda")
    zeros = torch.randint(0, 16, (4, 64), dtype=torch.int32, device="cuda")
    qweight, qzeros = pack_awq(codes, zeros)
    scales = torch.rand(4, 64, device="cuda").half()
    calls = {
        "dtype": lambda: torch.ops.awqlib.awq_gemm(torch.randn(2, 128, device="cuda"), qweight, qzeros, scales, 32),
        "features": lambda: torch.ops.awqlib.awq_gemm(torch.randn(2, 64, device="cuda").half(), qweight, qzeros,
                                                      scales, 32),
        "qzeros": lambda: torch.ops.awqlib.awq_gemm(torch.randn(2, 128, device="cuda").half(), qweight, qzeros,
                                                    scales, 64),
    }
    seq = [name.replace("_twice", "")] * (2 if name.endswith("_twice") else 1)
    for c in seq:
        try:
            calls[c]()
            print(f"{name}: no error raised")
        except Exception as e:  # noqa: BLE001
            print(f"{name}: {type(e).__name__}: {str(e).splitlines()[0]}", flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        run_case(sys.argv[1])
    else:
        for c in CASES:
            r = subprocess.run([sys.executable, __file__, c], capture_output=True, text=True, timeout=120)
            tail = (r.stdout + r.stderr).strip().splitlines()[-6:]
            print(f"--- {c}: rc={r.returncode}\n" + "\n".join(tail), flush=True)
