"""GPTQ error feedback on a static AWQ grid (awqlib/gptq.py) and its wiring as method='awq+gptq'."""

import pytest
import torch
from torch import nn

from awqlib import AutoAWQ, awq, gptq
from awqlib.modules import WQLinear
from awqlib.quant import compute_qparams, dequantize, quantize
from conftest import tiny_model


def _layer(out_f=64, in_f=256, tokens=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    mix = torch.randn(in_f, in_f, generator=g) / in_f**0.5 + torch.eye(in_f)  # correlated inputs
    x = torch.randn(tokens, in_f, generator=g) @ mix
    x[:, :3] *= 10  # outlier channels
    return w, x


def _out_err(w, wq, x):
    return (x @ (w - wq).t()).pow(2).sum().item()


@pytest.mark.parametrize("zero_point", [True, False])
def test_gptq_beats_rtn_on_the_same_grid_and_stays_on_it(zero_point):
    w, x = _layer()
    wq, scale, zero = gptq.gptq(w, x.t() @ x, 4, 64, zero_point)
    rs, rz = compute_qparams(w, 4, 64, zero_point)
    assert torch.equal(scale, rs) and torch.equal(zero, rz), "the grid is RTN's (static groups)"
    rtn = dequantize(quantize(w, rs, rz), rs, rz)
    assert _out_err(w, wq, x) < 0.8 * _out_err(w, rtn, x)
    q = gptq.codes_of(wq, scale, zero)  # exactly on the grid
    lin = nn.Linear(256, 64, bias=False)
    lin.weight.data = wq
    m = WQLinear.from_linear(lin, 4, 64, zero_point, qparams=(scale, zero))
    assert torch.equal(m.dequantized_weight(), wq), "the checkpoint stores exactly GPTQ's weight"
    assert q.min() >= 0 and q.max() <= 15


def test_clip_sets_the_grid_not_the_weight():
    w, x = _layer()
    absmax = w.view(64, 4, 64).abs().amax(-1, keepdim=True)
    wq, scale, zero = gptq.gptq(w, x.t() @ x, 4, 64, True, clip=(-0.8 * absmax, 0.8 * absmax))
    assert (scale < compute_qparams(w, 4, 64, True)[0]).all()
    gptq.codes_of(wq, scale, zero)


def test_singular_hessian_dead_channels_and_few_tokens_stay_finite():
    w, x = _layer(tokens=8)  # rank 8 << 256
    x[:, 10:20] = 0  # dead channels
    wq, scale, zero = gptq.gptq(w, x.t() @ x, 4, 64, True, percdamp=0.0)
    assert torch.isfinite(wq).all()
    gptq.codes_of(wq, scale, zero)
    # a dead channel feeds no error elsewhere and is rounded to nearest
    rtn = dequantize(quantize(w, scale, zero), scale, zero)
    assert torch.equal(wq[:, 10:20], rtn[:, 10:20])


def test_nan_hessian_is_a_clear_error():
    H = torch.eye(8)
    H[0, 1] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN"):
        gptq.hessian_factor(H)


def test_the_refit_objective_uses_the_damping_the_factor_needed():
    """An indefinite H (rounding in X^T X can make one) fails at the asked damping; the factor
    retries with more, and damped_hessian, given what hessian_factor returns, is the matrix whose
    inverse U factors (review: the scale refit used the asked damping, a different objective)."""
    H = torch.tensor([[1.0, 3.0, 0.0], [3.0, 1.0, 0.0], [0.0, 0.0, 1.0]])  # eigenvalues -2, 1, 4
    U, damp = gptq.hessian_factor(H, 0.01)
    assert damp == pytest.approx(10.0)  # 0.01, 0.1 and 1.0 leave it indefinite
    torch.testing.assert_close(U.t() @ U, torch.linalg.inv(gptq.damped_hessian(H, damp)), rtol=1e-4, atol=1e-5)


def test_the_quantizer_refits_with_the_damping_its_factor_used(calib_ids, monkeypatch):
    """review: awq.py took the scale refit's objective from the asked damping (gptq_damp) although
    the factor GPTQ used had needed more; the refit must see what hessian_factor returned."""
    used, seen = [], []
    real_factor, real_damped = gptq.hessian_factor, gptq.damped_hessian

    def factor(H, percdamp=0.01, max_tries=6):  # as if the first try had failed: ten times the damping
        U, damp = real_factor(H, percdamp * 10, max_tries)
        used.append(damp)
        return U, damp
    monkeypatch.setattr(gptq, "hessian_factor", factor)
    monkeypatch.setattr(gptq, "damped_hessian", lambda H, percdamp: seen.append(percdamp) or real_damped(H, percdamp))
    AutoAWQ.from_model(tiny_model("llama")).quantize(None, {"w_bit": 4, "q_group_size": 64}, calib_data=list(calib_ids),
                                                     n_samples=16, seqlen=64, gptq_refit_rounds=1)
    assert seen and seen == used and all(d == pytest.approx(10 * 0.1) for d in seen)


def test_method_names_are_validated_in_one_place():
    with pytest.raises(ValueError, match="awq\\+gptq"):
        awq.method_options("gptq")
    with pytest.raises(ValueError, match="chosen by the method"):
        awq.make_options("awq", gptq=True)
    with pytest.raises(TypeError, match="unknown option.*n_gird"):
        awq.make_options("awq", n_gird=3)
    assert awq.make_options("awq+gptq").gptq and not awq.make_options("awq").gptq
    with pytest.raises(ValueError, match=r"\['gptq_sequential'\] only apply to method='awq\+gptq'"):
        awq.make_options("awq", gptq_sequential=True)  # would be silently ignored
    assert awq.make_options("awq+gptq", gptq_sequential=True).gptq_sequential


def test_awq_gptq_model_end_to_end_is_finite_and_differs_from_awq(calib_ids, tmp_path):
    outs = {}
    for method in ("awq", "awq+gptq"):
        model = tiny_model("llama")
        w = AutoAWQ.from_model(model)
        w.quantize(None, {"w_bit": 4, "q_group_size": 64}, calib_data=list(calib_ids), n_samples=16, seqlen=64,
                   method=method)
        lin = model.model.layers[1].mlp.down_proj
        assert isinstance(lin, WQLinear)
        outs[method] = lin.dequantized_weight()
        assert torch.isfinite(outs[method]).all()
        w.save_quantized(tmp_path / method)
        card = (tmp_path / method / "README.md").read_text()
        assert f"| method | {awq.METHODS[method]} |" in card
    assert not torch.equal(outs["awq"], outs["awq+gptq"])


def test_act_order_keeps_the_static_grid_and_the_natural_column_order():
    """Act-order changes only the order the columns are quantized in: each column keeps its own
    group's (scale, zero), the result is in the natural column order and on the grid, and with the
    outlier channels quantized first it is at least as good as the natural order on the layer."""
    w, x = _layer()
    x[:, 200:203] *= 10  # outliers at the end too: the natural order quantizes them last
    H = x.t() @ x
    perm = gptq.act_order_permutation(H)
    assert set(perm[:6].tolist()) == {0, 1, 2, 200, 201, 202}
    wq, scale, zero = gptq.gptq(w, H, 4, 64, True, act_order=True)
    nat, s2, z2 = gptq.gptq(w, H, 4, 64, True)
    assert torch.equal(scale, s2) and torch.equal(zero, z2), "same static grid"
    gptq.codes_of(wq, scale, zero)  # exactly on the natural-order grid
    assert not torch.equal(wq, nat)
    assert _out_err(w, wq, x) < _out_err(w, nat, x)
    # the identity permutation is the natural order, bit for bit
    U, _ = gptq.hessian_factor(H)
    assert torch.equal(gptq.gptq_quantize(w, U, scale, zero, perm=torch.arange(256)),
                       gptq.gptq_quantize(w, U, scale, zero))


def test_act_order_on_a_model_changes_the_codes_not_the_format(calib_ids):
    weights = {}
    for act_order in (False, True):
        model = tiny_model("llama")
        w = AutoAWQ.from_model(model)
        w.quantize(None, {"w_bit": 4, "q_group_size": 64}, calib_data=list(calib_ids), n_samples=16, seqlen=64,
                   gptq_act_order=act_order)
        lin = model.model.layers[1].mlp.down_proj
        assert isinstance(lin, WQLinear) and lin.qweight.shape == (lin.in_features, lin.out_features // 8)
        weights[act_order] = lin.dequantized_weight()
        assert torch.isfinite(weights[act_order]).all()
    assert not torch.equal(weights[False], weights[True])


def test_sequential_stages_follow_the_block_and_merge_experts():
    """True-sequential GPTQ's stages: one per scale group of the spec, all experts of a group in
    one stage (one extra forward, not one per expert), linears in no group on their own, in the
    order the block runs them."""
    from awqlib.arch import get_spec
    from awqlib.awq import gptq_stages
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    lin = dict.fromkeys(names)
    assert gptq_stages(get_spec("llama"), lin, names) == [names[:3], names[3:4], names[4:6], names[6:]]
    phi = ["self_attn.o_proj", "self_attn.qkv_proj", "mlp.gate_up_proj", "mlp.down_proj"]  # o_proj: no group
    run = ["self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"]
    assert gptq_stages(get_spec("phi3"), dict.fromkeys(phi), run) == [[n] for n in run]
    moe = names[:4] + [f"mlp.experts.{e}.{p}" for e in range(3) for p in ("gate_proj", "up_proj", "down_proj")]
    run = moe[:4] + ["mlp.experts.1.gate_proj", "mlp.experts.1.up_proj", "mlp.experts.1.down_proj"]  # 0, 2: no tokens
    stages = gptq_stages(get_spec("qwen3_moe"), dict.fromkeys(moe), run)
    assert stages[:2] == [moe[:3], moe[3:4]]
    assert sorted(stages[2]) == sorted(f"mlp.experts.{e}.{p}" for e in range(3) for p in ("gate_proj", "up_proj"))
    assert sorted(stages[3]) == [f"mlp.experts.{e}.down_proj" for e in range(3)]


def test_sequential_gptq_runs_a_half_precision_block():
    """The recapture runs the block in its compute dtype (bf16 here; fp16/bf16 whenever quantizing
    on a GPU): the earlier stages' GPTQ results (fp32, on the grid) take part in it in that dtype,
    and the codes still come from the fp32 results."""
    from awqlib.arch import get_spec
    from awqlib.config import QuantConfig
    spec = get_spec("llama")
    ids = torch.randint(0, 256, (16, 64), generator=torch.Generator().manual_seed(1))
    model = tiny_model("llama").to(torch.bfloat16)
    inps, kws = awq.capture_inputs(model, spec, ids, 8, torch.device("cpu"), torch.device("cpu"))
    assert inps[0].dtype == torch.bfloat16
    block = awq.get_blocks(model, spec)[0]
    awq.quantize_block(block, spec, QuantConfig(group_size=64), awq.make_options("awq+gptq", gptq_sequential=True),
                       inps, kws[0], torch.device("cpu"))
    lin = block.mlp.down_proj
    assert isinstance(lin, WQLinear) and torch.isfinite(lin.dequantized_weight()).all()


def test_sequential_gptq_recaptures_each_later_stage(calib_ids, monkeypatch):
    """gptq_sequential: every stage after the first takes its Hessian from one more forward of the
    block, with the earlier stages already on the grid; the first stage is what plain GPTQ does."""
    from awqlib import awq
    calls = []
    real = awq.recapture_sites
    monkeypatch.setattr(awq, "recapture_sites", lambda block, lin, *a: calls.append(sorted(lin)) or real(block, lin, *a))
    weights = {}
    for seq in (False, True):
        model = tiny_model("llama")
        AutoAWQ.from_model(model).quantize(None, {"w_bit": 4, "q_group_size": 64}, calib_data=list(calib_ids),
                                           n_samples=16, seqlen=64, gptq_sequential=seq)
        blk = model.model.layers[1]
        weights[seq] = {n: blk.get_submodule(n).dequantized_weight() for n in ("self_attn.q_proj", "mlp.down_proj")}
    assert calls == [["self_attn.o_proj"], ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]] * 2  # per block
    assert torch.equal(weights[False]["self_attn.q_proj"], weights[True]["self_attn.q_proj"])
    assert not torch.equal(weights[False]["mlp.down_proj"], weights[True]["mlp.down_proj"])


def test_sequential_gptq_keeps_first_capture_statistics_where_a_recapture_has_none(calib_ids, monkeypatch):
    """A linear the recapture does not reach (an expert the quantized upstream no longer routes
    tokens to) keeps the statistics of the first capture instead of falling back to round-to-
    nearest: with every recapture empty, sequential GPTQ is plain GPTQ, bit for bit."""
    from awqlib import awq
    monkeypatch.setattr(awq, "recapture_sites", lambda *a: {})
    weights = {}
    for seq in (False, True):
        model = tiny_model("llama")
        AutoAWQ.from_model(model).quantize(None, {"w_bit": 4, "q_group_size": 64}, calib_data=list(calib_ids),
                                           n_samples=16, seqlen=64, gptq_sequential=seq)
        weights[seq] = model.model.layers[1].mlp.down_proj.dequantized_weight()
    assert torch.equal(weights[False], weights[True])


def _gptq_codes(w, H, g=64):
    scale, zero = gptq.static_qparams(w, 4, g, True)
    U, perm, _ = gptq.ordered_factor(H, 0.1, True)
    q = gptq.codes_of(gptq.gptq_quantize(w, U, scale, zero, 4, 128, perm), scale, zero)
    return q, scale, zero


def test_refit_scales_is_each_rows_least_squares_and_never_loses():
    w, x = _layer()
    H = x.t() @ x
    q, scale, zero = _gptq_codes(w, H)
    Hd = gptq.damped_hessian(H, 0.1)
    new = gptq.refit_scales(w, q, scale, zero, Hd)
    assert new.dtype == torch.float32 and torch.equal(new, new.half().float()), "fp16-representable"

    def err(s):
        e = w - dequantize(q, s, zero)
        return torch.einsum("ri,ij,rj->r", e.double(), Hd.double(), e.double())

    assert (err(new) <= err(scale)).all()
    assert err(new).sum() < 0.99 * err(scale).sum()
    # a row's optimum, from its explicit design matrix: column a holds (q - z) on group a, else 0
    for r in range(0, 64, 9):
        v = (q[r].float().view(4, 64) - zero[r].view(4, 1))
        phi = torch.block_diag(*[v[a].view(64, 1) for a in range(4)]).double()
        best = torch.linalg.solve(phi.t() @ Hd.double() @ phi, phi.t() @ Hd.double() @ w[r].double())
        if not torch.equal(new[r], scale[r]):
            assert torch.equal(new[r], best.half().float()), r


def test_refit_scales_keeps_a_group_whose_codes_all_sit_on_the_zero():
    w, x = _layer()
    q, scale, zero = _gptq_codes(w, x.t() @ x)
    q[5, 64:128] = zero[5, 1].int()  # (q - z) = 0 on the whole group: its scale is not determined
    new = gptq.refit_scales(w, q, scale, zero, gptq.damped_hessian(x.t() @ x, 0.1))
    assert torch.isfinite(new).all() and new[5, 1] == scale[5, 1]
    assert not torch.equal(new[5], scale[5]), "the row's other groups are still refitted"


def test_refit_scales_on_a_model_keeps_gptqs_codes_and_changes_only_scales(calib_ids):
    mods = {}
    for refit in (0, 1):
        model = tiny_model("llama")
        AutoAWQ.from_model(model).quantize(None, {"w_bit": 4, "q_group_size": 64}, calib_data=list(calib_ids),
                                           n_samples=16, seqlen=64, gptq_refit_rounds=refit)
        mods[refit] = model.model.layers[1].mlp.down_proj
    a, b = mods[0], mods[1]
    assert torch.equal(a.qweight, b.qweight) and torch.equal(a.qzeros, b.qzeros), "same codes and zeros"
    assert not torch.equal(a.scales, b.scales)
    assert torch.isfinite(b.dequantized_weight()).all()


def test_refit_scales_needs_gptq():
    with pytest.raises(ValueError, match="gptq_refit_rounds"):
        AutoAWQ.from_model(tiny_model("llama")).quantize(None, {"w_bit": 4, "q_group_size": 64}, method="awq",
                                                         calib_data=[[1, 2, 3]], gptq_refit_rounds=1)

