"""The two invariants AutoAWQ 0.2.9 broke on the CPU (its restore copy aliased the weights)."""

import copy

import pytest
import torch

from awqlib import AutoAWQ, awq
from awqlib.arch.blocks import resolve_groups
from awqlib.config import QuantConfig
from awqlib.quant import compute_qparams, quantize
from conftest import first_block, tiny_model


def test_search_changes_no_weight(calib_ids):
    _, spec, block, inps, kws = first_block("llama_mha", calib_ids)
    qcfg = QuantConfig(group_size=64)
    before = copy.deepcopy(block.state_dict())
    opts = awq.AWQOptions()
    lin = awq.quantizable_linears(block, spec, qcfg)
    groups = resolve_groups(spec, block)
    sites, inspected, _ = awq.capture_block(block, groups, lin, inps, kws, torch.device("cpu"), opts)
    assert sites["self_attn.q_proj"] is sites["self_attn.v_proj"], "q/k/v read one tensor: one site"
    assert sites["mlp.gate_proj"] is sites["mlp.up_proj"] and sites["mlp.down_proj"] is not sites["mlp.up_proj"]
    assert torch.equal(before["self_attn.q_proj.weight"], block.self_attn.q_proj.weight)
    for g in groups:
        ratio, s, losses = awq.search_scale(g, list(g.readers.values()), sites[g.group.linears[0]],
                                            inspected.get(g.group.inspect), qcfg, opts)
        assert len(losses) == 22 and min(losses) <= losses[0]  # 21 ratios and the identity
    after = block.state_dict()
    for k in before:
        assert torch.equal(before[k], after[k]), f"search modified {k}"


def test_stored_weight_is_rtn_of_scaled_original(calib_ids):
    """Without clipping, each stored linear is exactly RTN(W_original * s) for the s folded into the prev op."""
    model = tiny_model("llama_mha")
    orig = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    w = AutoAWQ.from_model(model)
    w.quantize(None, {"w_bit": 4, "q_group_size": 64}, calib_data=list(calib_ids), n_samples=16, seqlen=64,
               apply_clip=False, method="awq")
    checked = 0
    for i, rep in enumerate(w.reports):
        # a linear is scaled as a reader (columns) by one group, and as a prev (rows) by at most one other
        col_scale, row_scale = {}, {}
        for prev, r in rep.scales.items():
            for l in r.linears:
                col_scale[l] = r.scales
            if prev in ("self_attn.v_proj", "mlp.up_proj"):
                row_scale[prev] = r.scales
        block = model.model.layers[i]
        for name, s in col_scale.items():
            wo = orig[f"model.layers.{i}.{name}"].float()
            if name in row_scale:
                wo = wo / row_scale[name][:, None]
            target = wo * s
            scale, zero = compute_qparams(target, 4, 64, True)
            q = quantize(target, scale, zero)
            stored = block.get_submodule(name)
            from awqlib.packing import unpack_columns
            assert torch.equal(unpack_columns(stored.qweight), q.t().contiguous()), name
            checked += 1
    assert checked == 2 * 7


def test_unconverted_reader_is_scaled_once(calib_ids):
    """A linear left in fp16 by modules_to_not_convert still reads x / s, so it must hold exactly
    W s (it once got W s^2: scaled as a member of the group and again as an unconverted reader)."""
    model = tiny_model("llama_mha")
    k_orig = [l.self_attn.k_proj.weight.detach().clone() for l in model.model.layers]
    w = AutoAWQ.from_model(model)
    w.quantize(None, {"w_bit": 4, "q_group_size": 64, "modules_to_not_convert": ["k_proj"]},
               calib_data=list(calib_ids), n_samples=16, seqlen=64, apply_clip=False, method="awq")
    for layer, k0, rep in zip(model.model.layers, k_orig, w.reports):
        r = rep.scales["input_layernorm"]
        assert r.linears == ["self_attn.q_proj", "self_attn.v_proj"] and r.scales is not None
        assert isinstance(layer.self_attn.k_proj, torch.nn.Linear)
        expected = (k0.float() * r.scales).to(torch.float16).to(k0.dtype)
        torch.testing.assert_close(layer.self_attn.k_proj.weight, expected, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])  # gemma3: two rotaries, a scaled embedding
def test_half_compute_keeps_what_a_checkpoint_recomputes(tmp_path, monkeypatch, arch):
    """A float32 model quantized in float16 (what a GPU computes in) keeps its rotary inv_freq in
    float32, as its reloaded checkpoint recomputes it: the quantized model in memory computes what
    the checkpoint does.  ``model.to(float16)`` would round it, and every position but the first
    would differ (caught on an H200 by test_in_process_quantize_serves_the_runtime_layout)."""
    from awqlib import pipeline
    monkeypatch.setattr(pipeline.BlockSource, "compute_dtype", lambda self: torch.float16)
    model = tiny_model(arch)
    unsaved = {n: b.clone() for n, b in model.named_buffers() if n.endswith("inv_freq")}
    assert unsaved and all(b.dtype == torch.float32 for b in unsaved.values())
    w = AutoAWQ.from_model(model)
    w.quantize(None, {"q_group_size": 64}, method="rtn")
    assert next(w.model.parameters()).dtype == torch.float16
    assert unsaved.keys() <= dict(w.model.named_buffers()).keys()
    assert all(torch.equal(b, unsaved[n]) for n, b in w.model.named_buffers() if n in unsaved)
    w.save_quantized(tmp_path / "q")
    loaded = AutoAWQ.from_quantized(str(tmp_path / "q"), device="cpu", torch_dtype=torch.float16)
    assert unsaved.keys() <= dict(loaded.model.named_buffers()).keys()
    assert all(torch.equal(b, unsaved[n]) for n, b in loaded.model.named_buffers() if n in unsaved)
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(w(input_ids=ids).logits, loaded(input_ids=ids).logits)
