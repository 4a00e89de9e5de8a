"""Layer 2: the op and WQLinear against a dense reference (CPU; CUDA kernels: test_kernels_cuda.py)."""

import torch
import pytest

from awqlib import WQLinear
from awqlib.quant import fake_quantize


@pytest.mark.parametrize("g", [32, 64, 128, -1])
@pytest.mark.parametrize("bias", [False, True])
def test_wqlinear_matches_fake_quant(g, bias):
    lin = torch.nn.Linear(256, 72, bias=bias)
    q = WQLinear.from_linear(lin, 4, g, True)
    x = torch.randn(3, 5, 256)
    w = fake_quantize(lin.weight.data, 4, g, True)
    ref = x @ w.t() + (lin.bias.data.half().float() if bias else 0)
    out = q(x)
    assert out.shape == (3, 5, 72)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q.dequantized_weight(), w)


def test_op_shape_errors():
    q = WQLinear.from_linear(torch.nn.Linear(128, 64), 4, 64)
    with pytest.raises(ValueError, match="expects 128"):
        q(torch.randn(2, 64))


def test_op_under_torch_compile():
    q = WQLinear.from_linear(torch.nn.Linear(128, 64), 4, 64)
    x = torch.randn(4, 128)
    f = torch.compile(lambda t: q(t), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(f(x), q(x))


def test_fake_tensor_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode
    q = WQLinear.from_linear(torch.nn.Linear(128, 64), 4, 64)
    with FakeTensorMode(allow_non_fake_inputs=True):
        out = torch.ops.awqlib.awq_gemm(torch.empty(7, 128), q.qweight, q.qzeros, q.scales, 64)
    assert out.shape == (7, 64)
