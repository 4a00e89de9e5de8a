"""csrc/awq_block_ops.cu's kernels run on the CPU (csrc/cpu_twin.h, tests/cpu_twin/block_ops_twin.cpp):
the code a GPU would run -- the row/unit index math, strided and broadcast inputs, the 16-byte
vector and scalar paths, the warp-shuffle and shared-memory reductions, each rounding -- compiled
by the host C++ compiler, every CUDA thread a fiber, every buffer against a guard page, outputs
starting as NaN.  Checked against the reference as the GPU tests check the GPU
(tests/block_op_checks.py).  What it cannot show: the GPU's rsqrtf / expf / tanhf (the host's
functions stand in), the host code's choice of kernel (the GPU tests cover it), speed.

Needs a host C++20 compiler and the CUDA headers; skipped without them.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from block_op_checks import check_gated_act, check_rms_norm, check_rotary, rotary_id
from test_cpu_twin import _compile

HARNESS = Path(__file__).parent / "cpu_twin" / "block_ops_twin.cpp"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
VEC_BYTES = 16
EPS = 1e-6


@pytest.fixture(scope="module")
def twin(tmp_path_factory) -> Path:
    return _compile(HARNESS, tmp_path_factory.mktemp("block_ops_twin"))


def span(t: torch.Tensor) -> bytes:
    """The memory a strided view covers, from its first element to its last."""
    n = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())) if t.numel() else 0
    return torch.as_strided(t, (n,), (1,)).contiguous().view(torch.uint8).numpy().tobytes()


def read(path: Path, dtype: torch.dtype, shape) -> torch.Tensor:
    return torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8).view(dtype).view(shape)


def run(twin: Path, op: str, tmp_path: Path, dtype: str, order: str, inputs: dict, **kv):
    for name, t in inputs.items():
        (tmp_path / f"{name}.bin").write_bytes(span(t))
    args = [str(twin), op, str(tmp_path), dtype, order, *(f"{k}={v}" for k, v in kv.items())]
    r = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip() == "ok", f"{' '.join(args)}\nrc={r.returncode}\n{r.stderr[-3000:]}"


def elems(dtype: torch.dtype) -> int:
    return VEC_BYTES // torch.empty(0, dtype=dtype).element_size()


RMS_CASES = [  # rows, hidden, group (as rms_norm_cuda picks: warp up to kNormWarpMaxHidden), vector loads
    (3, 64, "warp", True), (9, 128, "warp", True),  # 9 rows: a CTA of 8 warps, then one with 7 idle
    (2, 40, "warp", False), (2, 1032, "cta", True), (2, 2051, "cta", False), (3, 4096, "cta", True),
]


@pytest.mark.parametrize("order", ["forward", "reverse"])
@pytest.mark.parametrize("scale_fp32", [False, True])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("rows,hidden,group,vec", RMS_CASES)
def test_rms_norm_kernel_on_cpu(twin, tmp_path, rows, hidden, group, vec, dtype, scale_fp32, order):
    dt = DTYPES[dtype]
    assert not vec or hidden % elems(dt) == 0
    x = (torch.randn(rows, hidden) * 3).to(dt)
    w = (torch.randn(hidden) * (0.3 if scale_fp32 else 1)).to(dt)
    offset = 1.0 if scale_fp32 else 0.0
    run(twin, "rms_norm", tmp_path, dtype, order, {"x": x, "w": w}, rows=rows, hidden=hidden, group=group,
        vec=int(vec), scale_fp32=int(scale_fp32), eps=EPS, offset=offset, add=0)
    out = read(tmp_path / "out.bin", dt, (rows, hidden))
    check_rms_norm(out, x, w, EPS, offset, scale_fp32, what=f"twin rms_norm {rows}x{hidden} {group} vec={vec}")


@pytest.mark.parametrize("order", ["forward", "reverse"])
@pytest.mark.parametrize("scale_fp32", [False, True])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("rows,hidden,group,vec", RMS_CASES)
def test_add_rms_norm_kernel_on_cpu(twin, tmp_path, rows, hidden, group, vec, dtype, scale_fp32, order):
    """add_rms_norm's kernel (the rms_norm kernel with kAdd): the sum is torch's residual + x bit for
    bit, and the norm is rms_norm's of that rounded sum."""
    dt = DTYPES[dtype]
    x = (torch.randn(rows, hidden) * 3).to(dt)
    residual = (torch.randn(rows, hidden) * 3).to(dt)
    w = (torch.randn(hidden) * (0.3 if scale_fp32 else 1)).to(dt)
    offset = 1.0 if scale_fp32 else 0.0
    run(twin, "rms_norm", tmp_path, dtype, order, {"x": x, "residual": residual, "w": w}, rows=rows, hidden=hidden,
        group=group, vec=int(vec), scale_fp32=int(scale_fp32), eps=EPS, offset=offset, add=1)
    total = read(tmp_path / "sum.bin", dt, (rows, hidden))
    assert torch.equal(total, residual + x), f"twin add_rms_norm {rows}x{hidden}: the sum is not residual + x"
    out = read(tmp_path / "out.bin", dt, (rows, hidden))
    check_rms_norm(out, residual + x, w, EPS, offset, scale_fp32,
                   what=f"twin add_rms_norm {rows}x{hidden} {group} vec={vec}")


def rotary_case(b, s, hq, hk, d, r, dt, unsqueeze_dim, cos_batch):
    qkv = torch.randn(b, s, (hq + 2 * hk) * d).to(dt)
    q = qkv[..., : hq * d].view(b, s, hq, d)
    k = qkv[..., hq * d: (hq + hk) * d].view(b, s, hk, d)
    if unsqueeze_dim == 1:
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    emb = torch.rand(cos_batch, s, r // 2) * 30
    emb = torch.cat((emb, emb), dim=-1)
    return q, k, emb.cos().to(dt), emb.sin().to(dt)


ROTARY_CASES = [  # batch, seq, q heads, k heads, head_dim, rotary dim
    (1, 1, 4, 2, 128, 128), (2, 3, 4, 2, 64, 64), (2, 3, 2, 2, 128, 64), (1, 3, 2, 1, 128, 96), (2, 2, 2, 1, 80, 80),
]


@pytest.mark.parametrize("cos_batch", ["one", "each"])
@pytest.mark.parametrize("unsqueeze_dim", [1, 2])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", ROTARY_CASES, ids=[rotary_id(*c) for c in ROTARY_CASES])
def test_rotary_kernel_on_cpu(twin, tmp_path, shape, dtype, unsqueeze_dim, cos_batch):
    b, s, hq, hk, d, r = shape
    dt = DTYPES[dtype]
    q, k, cos, sin = rotary_case(b, s, hq, hk, d, r, dt, unsqueeze_dim, 1 if cos_batch == "one" else b)
    e = elems(dt)
    vec = (r // 2) % e == 0 and d % e == 0  # rotary_cuda's rule (the views here are aligned)
    qo_shape, ko_shape = q.shape, k.shape
    run(twin, "rotary", tmp_path, dtype, "reverse" if b == 2 else "forward", {"q": q, "k": k, "cos": cos, "sin": sin},
        vec=int(vec), unsqueeze_dim=unsqueeze_dim, head_dim=d, rot_dim=r,
        **{f"{n}_{key}": v for n, t in (("q", q), ("k", k))
           for key, v in zip(("rows", "d1", "d2", "s0", "s1", "s2"),
                             (t.numel() // d, t.shape[1], t.shape[2], *t.stride()[:3]))},
        cos_sb=0 if cos.shape[0] == 1 else cos.stride(0), cos_ss=cos.stride(1),
        sin_sb=0 if sin.shape[0] == 1 else sin.stride(0), sin_ss=sin.stride(1))
    outs = (read(tmp_path / "q_out.bin", dt, qo_shape), read(tmp_path / "k_out.bin", dt, ko_shape))
    check_rotary(outs, q, k, cos, sin, unsqueeze_dim, what=f"twin rotary {shape} vec={vec}")


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("rows,features,vec", [(1, 344, True), (5, 344, True), (3, 37, False)])
def test_gated_act_kernel_on_cpu(twin, tmp_path, rows, features, vec, dtype, act):
    dt = DTYPES[dtype]
    gate_up = (torch.randn(rows, 2 * features) * 3).to(dt)  # one fused gate/up output: strided halves
    gate, up = gate_up[:, :features], gate_up[:, features:]
    run(twin, "gated", tmp_path, dtype, "reverse" if rows == 5 else "forward", {"gate": gate, "up": up},
        rows=rows, features=features, gate_stride=gate.stride(0), up_stride=up.stride(0), vec=int(vec), act=act)
    out = read(tmp_path / "out.bin", dt, (rows, features))
    check_gated_act(out, gate, up, act, what=f"twin {act} {rows}x{features} vec={vec}")


def test_the_twin_catches_a_kernel_reading_past_its_input(twin, tmp_path):
    """The harness gives each input exactly its span: a row count one too many runs into the guard page."""
    x, w = torch.randn(2, 64).half(), torch.randn(64).half()
    (tmp_path / "x.bin").write_bytes(span(x))
    (tmp_path / "w.bin").write_bytes(span(w))
    r = subprocess.run([str(twin), "rms_norm", str(tmp_path), "fp16", "forward", "rows=3", "hidden=64", "group=warp",
                        "vec=1", "scale_fp32=0", f"eps={EPS}", "offset=0", "add=0"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 3 and "past the end of x.bin" in r.stderr, r.stderr
