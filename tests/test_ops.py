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


@pytest.mark.parametrize("residual_kind", ["same", "transposed", "0-dim fp32", "broadcast", "bias"])
def test_gemm_add_is_residual_plus_the_gemm(residual_kind):
    """awq_gemm_add (a layer's residual add after its last linear) is residual + awq_gemm bit for bit,
    with torch's promotion and broadcasting, a contiguous result, and a fake that says so (opcheck);
    WQLinear.forward_add is residual + the layer, its bias included."""
    q = WQLinear.from_linear(torch.nn.Linear(128, 64, bias=residual_kind == "bias"), 4, 64)
    x = torch.randn(5, 128)
    r = {"transposed": torch.randn(64, 5).t(), "0-dim fp32": torch.tensor(0.5),
         "broadcast": torch.randn(1, 64)}.get(residual_kind, torch.randn(5, 64))
    want = r + q(x)
    assert torch.equal(q.forward_add(x, r), want) and q.forward_add(x, r).is_contiguous()
    if residual_kind != "bias":
        args = (x, q.qweight, q.qzeros, q.scales, 64, r)
        assert torch.equal(torch.ops.awqlib.awq_gemm_add(*args), want)
        res = torch.library.opcheck(torch.ops.awqlib.awq_gemm_add.default, args)
        assert all(v == "SUCCESS" for v in res.values()), res


def test_kernel_name_off_cuda_is_the_reference():
    """ops.gemm_kernel_name where the PyTorch reference runs: "reference", with the reference's own
    shape checks (on CUDA the kernels answer: tests/test_kernels_cuda.py, tests/test_cpu_twin.py)."""
    from awqlib.ops import Kernel, gemm_kernel_name
    q = WQLinear.from_linear(torch.nn.Linear(128, 64), 4, 64)
    assert gemm_kernel_name(torch.empty(3, 128), q.qweight, q.qzeros, q.scales, 64) == "reference"
    assert gemm_kernel_name(torch.empty(3, 128), q.qweight, q.qzeros, q.scales, 64, Kernel.STREAM) == "reference"
    with pytest.raises(ValueError, match="input has 96 features, the weight expects 128"):
        gemm_kernel_name(torch.empty(3, 96), q.qweight, q.qzeros, q.scales, 64)


def _quantized(k: int, n: int, g: int):
    """(linear, its WQLinear, an input, the output, a copy of the state dict) with a fixed seed."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(k, n, bias=True)
    m = WQLinear.from_linear(lin, group_size=g)
    x = torch.randn(5, k)
    return lin, m, x, m(x), {key: v.clone() for key, v in m.state_dict().items()}


def test_tiled_layout_same_function_and_module_round_trip(monkeypatch):
    """The op computes the same function on a warp-tiled qweight; a tiled WQLinear still saves and
    loads the GEMM layout, and its outputs do not change."""
    monkeypatch.setenv("AWQLIB_LAYOUT", "tiled")
    lin, m, x, before, sd_before = _quantized(128, 192, 32)
    assert m.tile_for_kernels() and m.tiled and m.qweight.shape == (3, 4, 256)
    assert torch.equal(m(x), before)
    sd = m.state_dict()
    assert sd.keys() == sd_before.keys() and all(torch.equal(sd[k], sd_before[k]) for k in sd)
    fresh = WQLinear(128, 192, group_size=32, bias=True)
    fresh.tile_for_kernels()
    fresh.load_state_dict(sd_before)  # GEMM layout in, tiled inside
    assert fresh.tiled and torch.equal(fresh.qweight, m.qweight) and torch.equal(fresh(x), before)
    assert torch.equal(m.dequantized_weight(), WQLinear.from_linear(lin, group_size=32).dequantized_weight())


def test_default_layout_is_stream_where_its_kernel_takes_one_token(monkeypatch):
    """The stream layout by default; a group size the stream kernel cannot take at one token (192)
    gets the tiled layout, whose skinny kernel takes it, rather than dequantize + cuBLAS at decode."""
    monkeypatch.delenv("AWQLIB_LAYOUT", raising=False)
    m = WQLinear(3840, 4096, group_size=128)
    assert m.tile_for_kernels() and m.layout == "stream"
    m = WQLinear(3840, 4096, group_size=192)
    assert m.tile_for_kernels() and m.layout == "tiled"
    monkeypatch.setenv("AWQLIB_LAYOUT", "tiled")
    m = WQLinear(3840, 4096, group_size=128)
    assert m.tile_for_kernels() and m.layout == "tiled"


def test_tile_only_where_the_kernels_can():
    from awqlib.modules import WQLinear
    m = WQLinear(128, 200, group_size=32)      # N % 64 != 0
    assert not m.tile_for_kernels() and not m.tiled
    m = WQLinear(96, 128, group_size=48)       # group % 32 != 0
    assert not m.tile_for_kernels()


def test_the_layout_follows_a_move(monkeypatch):
    """A quantized linear moved onto the kernels' device (``.to()``, ``.cuda()``: WQLinear._apply) is
    repacked as a load there would be -- so a model loaded on the CPU and moved runs the stream
    kernel, not the GEMM layout's -- and computes and saves what it did before; moved back to the
    CPU it returns to the GEMM layout.  Not without the kernels, not in a layout the kernels already
    read, and never for a cast or a move to the same device (a captured graph may hold the buffers).
    The CPU stands in for CUDA (KERNEL_DEVICE_TYPES), and the move is _follow_device's view of it;
    test_gpu_e2e moves a real one."""
    from awqlib import modules
    monkeypatch.delenv("AWQLIB_LAYOUT", raising=False)
    _, m, x, before, sd_before = _quantized(256, 192, 64)
    monkeypatch.setattr(modules, "KERNEL_DEVICE_TYPES", ("cpu",))
    monkeypatch.setattr(modules.kernels, "load", lambda: True)
    codes = [m.qweight, m.qzeros]
    m.half().to("cpu")  # a cast and a move to the same device: the buffers are kept
    assert m.layout == "gemm" and m.qweight is codes[0] and m.qzeros is codes[1]
    meta = torch.device("meta")  # "it was elsewhere"
    monkeypatch.setattr(modules.kernels, "load", lambda: False)
    m._follow_device(meta)
    assert m.layout == "gemm"  # no kernels: the reference reads the GEMM layout as fast as any
    monkeypatch.setattr(modules.kernels, "load", lambda: True)
    m._follow_device(meta)
    assert m.layout == "stream" and torch.equal(m(x), before)
    sd = m.state_dict()
    assert all(torch.equal(sd[k], sd_before[k]) for k in sd_before)
    m.set_layout("tiled")
    m._follow_device(meta)
    assert m.layout == "tiled"  # a runtime layout stays as it is
    odd = WQLinear(96, 128, group_size=48)  # no runtime layout takes it: stays, without complaint
    odd._follow_device(meta)
    assert odd.layout == "gemm"
    monkeypatch.setattr(modules, "KERNEL_DEVICE_TYPES", ("cuda",))  # now the CPU is the CPU again
    m.set_layout("stream")
    m._follow_device(meta)  # arrived on the CPU in a runtime layout: back to the checkpoint's
    assert m.layout == "gemm" and all(torch.equal(getattr(m, k), sd_before[k]) for k in ("qweight", "qzeros", "scales"))
    assert torch.equal(m(x), before)


def test_a_bad_layout_setting_is_refused_before_anything_moves(monkeypatch, tmp_path):
    """A mistyped $AWQLIB_LAYOUT is refused where a GPU could receive the weights, before the module
    moves -- not after, from _follow_device, with the module on the GPU in the GEMM layout and the
    model half moved -- and by from_quantized before it reads the folder."""
    from awqlib import AutoAWQ, modules
    _, m, x, before, sd_before = _quantized(256, 192, 64)
    monkeypatch.setenv("AWQLIB_LAYOUT", "stram")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    codes, scales = m.qweight, m.scales
    with pytest.raises(ValueError, match="AWQLIB_LAYOUT='stram'"):
        m.half()
    assert m.qweight is codes and m.scales is scales and m.scales.dtype == torch.float16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    m.float()  # without a GPU the setting means nothing: a cast on the CPU is not refused
    assert m.scales.dtype == torch.float32
    with pytest.raises(ValueError, match="AWQLIB_LAYOUT='stram'"):
        AutoAWQ.from_quantized(str(tmp_path / "not-read"))


# --- the stream runtime layout and the named layouts ----------------------------------------------

def test_stream_layout_same_function_and_module_round_trip(monkeypatch):
    """On the stream layout (qweight, zeros and scales all repacked) the op computes the same
    function; state_dict() exports the GEMM layout; loading GEMM tensors into a stream module
    repacks them; tile_for_kernels chooses it by default."""
    _, m, x, before, sd_before = _quantized(256, 192, 64)
    assert m.layout == "gemm" and not m.tiled
    assert m.set_layout("stream") and m.layout == "stream" and m.tiled and m.qweight.shape == (3, 16, 128)
    assert not torch.equal(m.scales, sd_before["scales"])  # permuted per lane
    assert torch.equal(m(x), before)
    sd = m.state_dict()
    assert sd.keys() == sd_before.keys() and all(torch.equal(sd[k], sd_before[k]) for k in sd)
    monkeypatch.delenv("AWQLIB_LAYOUT", raising=False)  # the default runtime layout
    fresh = WQLinear(256, 192, group_size=64, bias=True)
    assert fresh.tile_for_kernels() and fresh.layout == "stream"
    fresh.load_state_dict(sd_before)  # GEMM layout in, stream inside
    assert all(torch.equal(getattr(fresh, k), getattr(m, k)) for k in ("qweight", "qzeros", "scales"))
    assert torch.equal(fresh(x), before)
    # stream -> tiled -> gemm, exactly
    assert m.set_layout("tiled") and m.layout == "tiled" and torch.equal(m.scales, sd_before["scales"])
    assert m.set_layout("gemm") and all(torch.equal(getattr(m, k), sd_before[k]) for k in ("qweight", "qzeros", "scales"))


def test_layout_env_is_strict(monkeypatch):
    monkeypatch.setenv("AWQLIB_LAYOUT", "fast")
    with pytest.raises(ValueError, match="tiled.*stream"):
        WQLinear(128, 64, group_size=64).tile_for_kernels()


def test_stream_only_where_the_kernel_can():
    assert not WQLinear(128, 200, group_size=32).set_layout("stream")   # N % 64 != 0
    assert not WQLinear(96, 128, group_size=48).set_layout("stream")    # group % 32 != 0
    with pytest.raises(ValueError, match="unknown layout"):
        WQLinear(128, 64, group_size=64).set_layout("marlin")


def test_bf16_scales_converted_once():
    """bf16 activations use a bf16 copy of the scales made once (not per call); the exported scales
    stay fp16; moving the module drops the copy."""
    m = WQLinear.from_linear(torch.nn.Linear(128, 64, bias=False), group_size=64)
    x = torch.randn(2, 128, dtype=torch.bfloat16)
    a = m.scales_for(torch.bfloat16)
    assert a.dtype == torch.bfloat16 and m.scales_for(torch.bfloat16) is a
    assert m.scales_for(torch.float16) is m.scales and m.state_dict()["scales"].dtype == torch.float16
    # the same function as converting the fp16 scales inside the op (what the reference does)
    assert torch.equal(m(x), torch.ops.awqlib.awq_gemm(x, m.qweight, m.qzeros, m.scales, 64))
    m.to(torch.device("cpu"))
    assert m.scales_for(torch.bfloat16) is not a


def test_kernel_enum_mirrors_cpp():
    """awqlib.ops.Kernel and `enum Kernel` in csrc/awq_dispatch.h name the same ids."""
    import re
    from pathlib import Path
    from awqlib.ops import Kernel
    src = (Path(__file__).resolve().parent.parent / "csrc" / "awq_dispatch.h").read_text()
    body = re.search(r"enum Kernel : int64_t \{(.*?)\};", src, re.S).group(1)
    cpp = {m.group(1): int(m.group(2)) for m in re.finditer(r"\bk(\w+) = (\d+)", body) if m.group(1) != "LastKernel"}
    snake = {re.sub(r"(?<!^)(?=[A-Z])", "_", k).upper(): v for k, v in cpp.items()}
    assert snake == {k.name: int(k) for k in Kernel}


@pytest.mark.parametrize("layout", ["gemm", "tiled", "stream"])
def test_gradients_reach_the_activations(layout):
    """Trainable modules around frozen int4 linears (LoRA adapters) need d(xW)/dx: awq_gemm's backward
    gives grad W^T with the weight dequantized as the forward used it, in every layout, and a
    LoRA-style adapter beside a WQLinear trains."""
    from awqlib import ops
    torch.manual_seed(0)
    q = WQLinear.from_linear(torch.nn.Linear(256, 128, bias=True), 4, 64)
    if layout != "gemm":
        assert q.set_layout(layout)
    x = torch.randn(2, 3, 256, requires_grad=True)
    q(x).square().sum().backward()
    x2 = x.detach().clone().requires_grad_()
    ref = ops._reference_gemm(x2, q.qweight, q.qzeros, q.scales_for(x2.dtype), q.group_size) + q.bias.float()
    ref.square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)

    adapter = torch.nn.Linear(256, 128, bias=False)
    before = adapter.weight.detach().clone()
    opt = torch.optim.SGD(adapter.parameters(), lr=0.1)
    loss = (q(x.detach()) + adapter(x.detach())).square().mean()
    loss.backward()
    opt.step()
    assert not torch.equal(adapter.weight, before)
