"""awqlib.blockops on the CPU: the reference implementations are transformers' own modules and
functions, bit for bit; the fake implementations give what the real ones give (shape, dtype,
strides: torch.compile lays memory out by them); wrong arguments are errors naming what is
accepted.  The CUDA kernels are compared with these references in tests/test_kernels_cuda.py
(`-k block_op`)."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from transformers.activations import ACT2FN
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as llama_rotary
from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb as phi3_rotary
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

from awqlib import blockops

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
EPS = 1e-6


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, dtype, seed=0, scale=1.0):
    return (torch.randn(*shape, generator=_gen(seed)) * scale).to(dtype)


def _cos_sin(batch, seq, rot, dtype, seed=1):
    """cos/sin as transformers' rotary embeddings make them ([batch, seq, rot], the two halves equal),
    from random positions so that every angle differs."""
    pos = torch.rand(batch, seq, 1, generator=_gen(seed)) * 4096
    inv = 1.0 / (10000 ** (torch.arange(0, rot, 2).float() / rot))
    freqs = pos * inv
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _same(a: torch.Tensor, b: torch.Tensor):
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, a.dtype, b.shape, b.dtype)
    assert torch.equal(a, b), f"max diff {(a.float() - b.float()).abs().max().item()}"


# ------------------------------------------------------------------ the references are transformers'


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 64), (2, 7, 96), (3, 5, 1000)])
def test_block_op_rms_norm_is_llama_rmsnorm(dtype, shape):
    norm = LlamaRMSNorm(shape[-1], eps=EPS).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(_randn(shape[-1], dtype=dtype, seed=3))
    x = _randn(*shape, dtype=dtype, scale=3.0)
    with torch.no_grad():
        _same(blockops.rms_norm(x, norm.weight, EPS), norm(x))


@pytest.mark.parametrize("dtype", DTYPES)
def test_block_op_rms_norm_is_gemma3_rmsnorm(dtype):
    """Gemma stores w - 1 and scales by (1 + w) in fp32, rounding once."""
    norm = Gemma3RMSNorm(320, eps=EPS).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(_randn(320, dtype=dtype, seed=4, scale=0.3))
    x = _randn(2, 9, 320, dtype=dtype, scale=5.0)
    with torch.no_grad():
        _same(blockops.rms_norm(x, norm.weight, EPS, weight_offset=1.0, scale_in_fp32=True), norm(x))


@pytest.mark.parametrize("dtype", DTYPES)
def test_block_op_rms_norm_is_qwen3_q_norm(dtype):
    """Qwen3's q_norm / k_norm: RMSNorm over head_dim of [batch, seq, heads, head_dim] (many short rows)."""
    norm = Qwen3RMSNorm(128, eps=EPS).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(_randn(128, dtype=dtype, seed=5))
    q = _randn(2, 11, 16 * 128, dtype=dtype).view(2, 11, 16, 128)
    with torch.no_grad():
        _same(blockops.rms_norm(q, norm.weight, EPS), norm(q))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("unsqueeze_dim", [1, 2])
def test_block_op_rotary_is_llama_apply_rotary_pos_emb(dtype, unsqueeze_dim):
    b, s, hq, hk, d = 2, 9, 8, 2, 128
    # as transformers makes them: the projection viewed [b, s, h, d], transposed for unsqueeze_dim 1
    q = _randn(b, s, hq * d, dtype=dtype, seed=6).view(b, s, hq, d)
    k = _randn(b, s, hk * d, dtype=dtype, seed=7).view(b, s, hk, d)
    if unsqueeze_dim == 1:
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    cos, sin = _cos_sin(b, s, d, dtype)
    ref = llama_rotary(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
    got = blockops.rotary(q, k, cos, sin, unsqueeze_dim)
    for g, r in zip(got, ref):
        _same(g, r)
        assert g.is_contiguous()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rot", [64, 96])
def test_block_op_rotary_is_phi3_partial_rotary(dtype, rot):
    b, s, hq, hk, d = 1, 6, 4, 4, 128
    q = _randn(b, s, hq, d, dtype=dtype, seed=8).transpose(1, 2)
    k = _randn(b, s, hk, d, dtype=dtype, seed=9).transpose(1, 2)
    cos, sin = _cos_sin(b, s, rot, dtype)
    for g, r in zip(blockops.rotary(q, k, cos, sin), phi3_rotary(q, k, cos, sin)):
        _same(g, r)


@pytest.mark.parametrize("dtype", DTYPES)
def test_block_op_rotary_broadcasts_cos_over_the_batch(dtype):
    q = _randn(3, 4, 5, 64, dtype=dtype, seed=10)
    k = _randn(3, 2, 5, 64, dtype=dtype, seed=11)
    cos, sin = _cos_sin(1, 5, 64, dtype)
    for g, r in zip(blockops.rotary(q, k, cos, sin), llama_rotary(q, k, cos, sin)):
        _same(g, r)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act, hf", [("silu", "silu"), ("gelu_tanh", "gelu_pytorch_tanh")])
def test_block_op_gated_act_is_act2fn(dtype, act, hf):
    # the two halves of one fused gate/up output: strided rows
    gate_up = _randn(2, 7, 2 * 344, dtype=dtype, scale=4.0)
    gate, up = gate_up[..., :344], gate_up[..., 344:]
    got = blockops.gated_act(gate, up, act)
    _same(got, ACT2FN[hf](gate) * up)
    assert got.is_contiguous()


# ------------------------------------------------------------------ fake implementations


def test_block_op_fakes_give_shapes_and_dtypes():
    with FakeTensorMode():
        x = torch.empty(2, 5, 4096, dtype=torch.bfloat16)
        assert blockops.rms_norm(x, torch.empty(4096, dtype=torch.bfloat16), EPS).dtype == torch.bfloat16
        # Llama's weight * y.to(x.dtype) promotes: an fp32 weight gives fp32
        assert blockops.rms_norm(x, torch.empty(4096), EPS).dtype == torch.float32
        assert blockops.rms_norm(x, torch.empty(4096), EPS, 1.0, True).dtype == torch.bfloat16
        q, k = torch.empty(2, 32, 5, 128, dtype=torch.float16), torch.empty(2, 8, 5, 128, dtype=torch.float16)
        cs = torch.empty(1, 5, 64, dtype=torch.float16)
        qo, ko = blockops.rotary(q, k, cs, cs)
        assert (qo.shape, ko.shape, qo.dtype) == (q.shape, k.shape, torch.float16)
        g = torch.empty(3, 11008, dtype=torch.float16)
        assert blockops.gated_act(g, g, "silu").shape == g.shape


def _opcheck(op, args):
    res = torch.library.opcheck(op, args)
    assert all(v == "SUCCESS" for v in res.values()), res


@pytest.mark.parametrize("transposed", [False, True])
def test_block_op_opcheck_rms_norm(transposed):
    x = _randn(16, 6, dtype=torch.bfloat16).t() if transposed else _randn(6, 16, dtype=torch.bfloat16)
    w = _randn(16, dtype=torch.bfloat16, seed=2)
    _opcheck(torch.ops.awqlib.rms_norm.default, (x, w, EPS, 0.0, False))
    _opcheck(torch.ops.awqlib.rms_norm.default, (x, w, EPS, 1.0, True))


@pytest.mark.parametrize("residual_kind", ["same", "transposed", "0-dim fp32", "broadcast"])
def test_block_op_opcheck_add_rms_norm(residual_kind):
    """add_rms_norm's fake says what the op returns (shapes, dtypes, contiguous outputs), also for a
    residual that promotes or broadcasts as torch's add does."""
    x = _randn(6, 16, dtype=torch.bfloat16)
    r = {"same": _randn(6, 16, dtype=torch.bfloat16, seed=3),
         "transposed": _randn(16, 6, dtype=torch.bfloat16, seed=3).t(),
         "0-dim fp32": torch.tensor(0.5),
         "broadcast": _randn(1, 16, dtype=torch.bfloat16, seed=3)}[residual_kind]
    w = _randn(16, dtype=torch.bfloat16, seed=2)
    _opcheck(torch.ops.awqlib.add_rms_norm.default, (x, r, w, EPS, 0.0, False))
    s, n = blockops.add_rms_norm(x, r, w, EPS)
    assert torch.equal(s, r + x) and torch.equal(n, blockops.rms_norm(r + x, w, EPS))


@pytest.mark.parametrize("rot", [64, 32])
def test_block_op_opcheck_rotary_on_transposed_views(rot):
    """The fake's strides must be the real op's: with q a transposed view (as transformers makes it)
    the reference once kept q's strides for full rotary and made a contiguous tensor for partial
    rotary, while the fake always kept q's."""
    q = _randn(1, 5, 4, 64, dtype=torch.float16).transpose(1, 2)
    k = _randn(1, 5, 2, 64, dtype=torch.float16, seed=1).transpose(1, 2)
    cos, sin = _cos_sin(1, 5, rot, torch.float16)
    _opcheck(torch.ops.awqlib.rotary.default, (q, k, cos, sin, 1))


def test_block_op_opcheck_gated_act():
    gu = _randn(3, 40, dtype=torch.float16)
    _opcheck(torch.ops.awqlib.gated_act.default, (gu[:, :20], gu[:, 20:], "gelu_tanh"))
    g = _randn(20, 3, dtype=torch.float16).t()  # dense but transposed
    _opcheck(torch.ops.awqlib.gated_act.default, (g, _randn(3, 20, dtype=torch.float16), "silu"))


def test_block_op_opcheck_mixed_dtypes_promote_as_the_reference_does():
    """bf16 q with fp32 cos/sin (autocast over an fp32 model) gives fp32, as transformers' q * cos
    does; fp16 gate with fp32 up likewise: the fakes say so (torch.compile lays out by them)."""
    q, k = _randn(1, 4, 5, 32, dtype=torch.bfloat16), _randn(1, 2, 5, 32, dtype=torch.bfloat16, seed=1)
    cos, sin = _cos_sin(1, 5, 32, torch.float32)
    _opcheck(torch.ops.awqlib.rotary.default, (q, k, cos, sin, 1))
    assert blockops.rotary(q, k, cos, sin)[0].dtype == torch.float32
    _opcheck(torch.ops.awqlib.gated_act.default, (_randn(3, 8, dtype=torch.float16), _randn(3, 8, dtype=torch.float32), "silu"))


def test_block_op_gradients_are_the_references():
    """Training through a fused model (adapters, fine-tuning): where a gradient is wanted the wrappers
    run the reference, so gradients are the reference's (rms_norm computes in fp32 inside, so it is
    compared with its reference, not gradchecked in fp64); without one they run the op."""
    d = torch.float64
    q = _randn(2, 3, 4, 8, dtype=d).requires_grad_()
    k = _randn(2, 1, 4, 8, dtype=d, seed=1).requires_grad_()
    cos, sin = _cos_sin(2, 4, 6, d)
    assert torch.autograd.gradcheck(lambda a, b: blockops.rotary(a, b, cos, sin, 1), (q, k))
    assert torch.autograd.gradcheck(lambda a: blockops.rotary(a, k.detach(), cos, sin, 1)[0], (q,))  # one output used
    g, u = _randn(3, 8, dtype=d, seed=2).requires_grad_(), _randn(3, 8, dtype=d, seed=3).requires_grad_()
    for act in blockops.ACTIVATIONS:
        assert torch.autograd.gradcheck(lambda a, b: blockops.gated_act(a, b, act), (g, u))
    x, w = _randn(3, 16, dtype=torch.float32).requires_grad_(), _randn(16, dtype=torch.float32, seed=4).requires_grad_()
    grad = _randn(3, 16, dtype=torch.float32, seed=5)
    for offset, fp32 in ((0.0, False), (1.0, True)):
        got = torch.autograd.grad(blockops.rms_norm(x, w, EPS, offset, fp32), (x, w), grad)
        want = torch.autograd.grad(blockops._reference_rms_norm(x, w, EPS, offset, fp32), (x, w), grad)
        assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_block_op_wrappers_run_the_op_where_no_gradient_is_wanted(monkeypatch):
    """Inference (no_grad, or inputs without grad) goes to the op -- one kernel on CUDA -- and never
    through a Python autograd step; only a wanted gradient takes the reference."""
    calls = []
    real = blockops._reference_gated_act
    monkeypatch.setattr(blockops, "_reference_gated_act", lambda *a: calls.append(1) or real(*a))
    g = _randn(2, 8, dtype=torch.float32).requires_grad_()
    with torch.no_grad():
        blockops.gated_act(g, g, "silu")
    blockops.gated_act(g.detach(), g.detach(), "silu")
    assert calls == []
    blockops.gated_act(g, g, "silu")
    assert calls == [1]


# ------------------------------------------------------------------ strict arguments


def test_block_op_errors_name_what_is_accepted():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"act 'relu' is not one of silu, gelu_tanh"):
        blockops.gated_act(x, x, "relu")
    with pytest.raises(ValueError, match=r"gate \(2, 8\) and up \(2, 7\) differ in shape"):
        blockops.gated_act(x, torch.randn(2, 7), "silu")
    q = torch.randn(1, 2, 3, 8)
    cs = torch.randn(1, 3, 5)
    with pytest.raises(ValueError, match=r"rotary dim 5 must be even and <= the head dim 8"):
        blockops.rotary(q, q, cs, cs)
    with pytest.raises(ValueError, match=r"rotary dim 10 must be even and <= the head dim 8"):
        blockops.rotary(q, q, torch.randn(1, 3, 10), torch.randn(1, 3, 10))
    with pytest.raises(ValueError, match=r"unsqueeze_dim must be 1 \(\[batch, heads, seq, dim\]\) or 2"):
        blockops.rotary(q, q, torch.randn(1, 3, 8), torch.randn(1, 3, 8), 3)
    with pytest.raises(ValueError, match=r"must be 4-D and cos \(1, 3, 8\) / sin \(1, 3, 6\) 3-D of one shape"):
        blockops.rotary(q, q, torch.randn(1, 3, 8), torch.randn(1, 3, 6))
    with pytest.raises(ValueError, match="weight_offset needs scale_in_fp32=True"):
        blockops.rms_norm(x, torch.ones(8), EPS, weight_offset=1.0)
