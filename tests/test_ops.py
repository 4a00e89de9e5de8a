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


def test_tiled_layout_same_function_and_module_round_trip():
    """The op computes the same function on a warp-tiled qweight; a tiled WQLinear still saves and
    loads the GEMM layout, and its outputs do not change."""
    from awqlib.modules import WQLinear
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 192, bias=True)
    m = WQLinear.from_linear(lin, group_size=32)
    x = torch.randn(5, 128)
    before = m(x)
    sd_before = {k: v.clone() for k, v in m.state_dict().items()}
    assert m.tile_for_kernels() and m.tiled and m.qweight.shape == (3, 4, 256)
    assert torch.equal(m(x), before)
    sd = m.state_dict()
    assert sd.keys() == sd_before.keys() and all(torch.equal(sd[k], sd_before[k]) for k in sd)
    fresh = WQLinear(128, 192, group_size=32, bias=True)
    fresh.tile_for_kernels()
    fresh.load_state_dict(sd_before)  # GEMM layout in, tiled inside
    assert fresh.tiled and torch.equal(fresh.qweight, m.qweight) and torch.equal(fresh(x), before)
    assert torch.equal(m.dequantized_weight(), WQLinear.from_linear(lin, group_size=32).dequantized_weight())


def test_tile_only_where_the_kernels_can():
    from awqlib.modules import WQLinear
    m = WQLinear(128, 200, group_size=32)      # N % 64 != 0
    assert not m.tile_for_kernels() and not m.tiled
    m = WQLinear(96, 128, group_size=48)       # group % 32 != 0
    assert not m.tile_for_kernels()
