"""fuse_layers=True: same outputs, same checkpoint, fewer GEMMs."""

import pytest
import torch
from safetensors.torch import load_file

from awqlib import AutoAWQ
from awqlib.fuse import FusedSlice, FusedWQLinear
from conftest import tiny_model


def test_fused_model_matches_unfused(tmp_path, calib_ids):
    w = AutoAWQ.from_model(tiny_model("llama"))
    w.quantize(None, {"q_group_size": 64}, method="rtn")
    w.save_quantized(tmp_path / "a")
    plain = AutoAWQ.from_quantized(str(tmp_path / "a"))
    fused = AutoAWQ.from_quantized(str(tmp_path / "a"), fuse_layers=True)
    assert sum(isinstance(m, FusedWQLinear) for m in fused.modules()) == 2 * 2  # qkv + gate/up per block
    assert sum(isinstance(m, FusedSlice) for m in fused.modules()) == 2 * 5
    ids = calib_ids[:2, :32]
    with torch.no_grad():
        torch.testing.assert_close(fused(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    g1 = plain.generate(input_ids=ids[:1, :4], max_new_tokens=6, do_sample=False)
    g2 = fused.generate(input_ids=ids[:1, :4], max_new_tokens=6, do_sample=False)
    assert torch.equal(g1, g2)
    fused.save_quantized(tmp_path / "b")
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_slice_called_with_other_input_recomputes():
    from awqlib import WQLinear
    parts = [WQLinear.from_linear(torch.nn.Linear(64, 32), 4, 64) for _ in range(2)]
    f = FusedWQLinear(parts)
    s0, s1 = FusedSlice(f, 0, 64, 32, False), FusedSlice(f, 1, 64, 32, False)
    x, y = torch.randn(3, 64), torch.randn(3, 64)
    torch.testing.assert_close(s0(x), parts[0](x))
    torch.testing.assert_close(s1(y), parts[1](y))  # not x: must not reuse x's cached result
    torch.testing.assert_close(s1(x), parts[1](x))


def test_fused_state_dict_holds_the_unfused_tensors():
    """Fused slices export the unfused linears' tensors (what checkpoints store) next to the fused
    module's own (what accelerate offloads), and a fused model loads its own state dict back."""
    from awqlib.fuse import fuse_layers
    w = AutoAWQ.from_model(tiny_model("llama")).quantize(None, {"q_group_size": 64}, method="rtn")
    before = {k: v.clone() for k, v in w.model.state_dict().items()}
    assert fuse_layers(w.model, w.spec) == 2 * 2
    after = w.model.state_dict()
    assert set(after) - set(before) and all(".fused_" in k for k in set(after) - set(before))
    assert all(torch.equal(after[k], v) for k, v in before.items())
    w.model.load_state_dict(after, strict=True)


@pytest.mark.parametrize("layout", ["tiled", "stream"])
def test_a_runtime_layout_model_computes_and_saves_what_the_gemm_layout_does(tmp_path, calib_ids, layout):
    """The layouts the CUDA kernels get (repacked at load), checked on the CPU's reference path: a
    model whose quantized linears hold a runtime layout -- fused or not -- gives the GEMM layout's
    logits bit for bit, and saves the same checkpoint, byte for byte."""
    from awqlib import WQLinear
    w = AutoAWQ.from_model(tiny_model("llama"))
    w.quantize(None, {"q_group_size": 64}, method="rtn")
    w.save_quantized(tmp_path / "a")
    ids = calib_ids[:2, :24]
    for fuse in (False, True):
        gemm = AutoAWQ.from_quantized(str(tmp_path / "a"), fuse_layers=fuse)
        q = AutoAWQ.from_quantized(str(tmp_path / "a"), fuse_layers=fuse)
        linears = [m for m in q.modules() if isinstance(m, WQLinear)]
        assert linears and all(m.set_layout(layout) and m.layout == layout for m in linears)
        with torch.no_grad():
            assert torch.equal(q(input_ids=ids).logits, gemm(input_ids=ids).logits)
        out = tmp_path / f"{layout}-{fuse}"
        q.save_quantized(out)
        for f in ("model.safetensors", "config.json"):
            assert (out / f).read_bytes() == (tmp_path / "a" / f).read_bytes(), (fuse, f)
