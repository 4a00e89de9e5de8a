"""One test per architecture on a tiny config: the spec folds scales exactly, and
quantize -> save -> from_quantized gives the in-memory quantized model's logits."""

import re

import pytest
import torch

from awqlib import AutoAWQ, WQLinear
from awqlib import awq
from awqlib.arch import get_spec
from awqlib.arch.blocks import resolve_groups
from awqlib.config import QuantConfig
from conftest import ARCHS, first_block, tiny_config, tiny_model


@pytest.mark.parametrize("arch", ARCHS)
def test_scale_folding_is_exact(arch, calib_ids):
    """Folding any positive s into prev and the readers must not change the block's output."""
    _, spec, block, inps, kws = first_block(arch, calib_ids[:4])
    kw = kws[inps[0].shape[0]]
    ref = awq.run_block(block, inps[0], kw)
    n_applied = 0
    for g in resolve_groups(spec, block):
        n = next(iter(g.readers.values())).in_features
        awq.apply_scale(g, torch.rand(n) * 3 + 0.2)
        n_applied += 1
    out = awq.run_block(block, inps[0], kw)
    assert n_applied >= 2
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_quantize_save_load_logits(arch, calib_ids, tmp_path):
    model = tiny_model(arch)
    ids = calib_ids[:2, :32]
    with torch.no_grad():
        fp = model(input_ids=ids).logits
    w = AutoAWQ.from_model(model)
    w.quantize(None, {"w_bit": 4, "q_group_size": 64}, calib_data=list(calib_ids), n_samples=16, seqlen=64)
    n_q = sum(isinstance(m, WQLinear) for m in model.modules())
    kept = {re.sub(r"^.*\.layers\.\d+\.", "", n) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and ".layers." in n}
    assert n_q > 0 and kept <= get_spec(model.config.model_type).unquantized, \
        f"every decoder linear is quantized but those the spec keeps in fp16: {kept}"
    with torch.no_grad():
        q = model(input_ids=ids).logits
    assert torch.isfinite(q).all()
    rel = ((q - fp).norm() / fp.norm()).item()
    assert rel < 0.5, rel
    w.save_quantized(tmp_path / "ckpt")
    loaded = AutoAWQ.from_quantized(str(tmp_path / "ckpt"))
    with torch.no_grad():
        out = loaded(input_ids=ids).logits
    torch.testing.assert_close(out, q, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["tiled", "stream"])
def test_in_process_quantize_repacks_where_the_kernels_serve(monkeypatch, tmp_path, layout):
    """quantize() leaves linears on the kernels' device in the runtime layout, as from_quantized
    does (only one layout ever reaches the kernels); the checkpoint stays in the GEMM layout.  The
    kernels' device is the CPU here, so the walk, the driver's call and the round trip run without
    a GPU (tests/test_gpu_e2e.py checks the same on CUDA)."""
    from awqlib import kernels, modules
    from awqlib.packing import layout_of
    monkeypatch.setenv("AWQLIB_LAYOUT", layout)
    monkeypatch.setattr(modules, "KERNEL_DEVICE_TYPES", ("cpu",))
    monkeypatch.setattr(kernels, "load", lambda: True)
    w = AutoAWQ.from_model(tiny_model("llama_mha"))
    w.quantize(None, {"w_bit": 4, "q_group_size": 64}, method="rtn")
    linears = [m for m in w.model.modules() if isinstance(m, WQLinear)]
    assert linears and all(m.layout == layout for m in linears)
    ids = torch.randint(0, w.model.config.vocab_size, (2, 16))
    with torch.no_grad():
        before = w(input_ids=ids).logits
    w.save_quantized(tmp_path / "q")
    monkeypatch.setattr(modules, "KERNEL_DEVICE_TYPES", ())  # load it as the CPU really is: GEMM layout
    loaded = AutoAWQ.from_quantized(str(tmp_path / "q"))
    assert all(m.layout == "gemm" for m in loaded.model.modules() if isinstance(m, WQLinear))
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / "q" / "model.safetensors"))
    assert all(layout_of(v) == "gemm" for k, v in saved.items() if k.endswith(".qweight"))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, before)
    # a mistyped layout is refused before any block is touched, not after the last one
    monkeypatch.setenv("AWQLIB_LAYOUT", "stram")
    w = AutoAWQ.from_model(tiny_model("llama_mha"))
    with pytest.raises(ValueError, match="AWQLIB_LAYOUT='stram'"):
        w.quantize(None, {"w_bit": 4, "q_group_size": 64}, method="rtn")
    assert not w.interrupted and not any(isinstance(m, WQLinear) for m in w.model.modules())


def test_mixed_dense_and_moe_blocks_are_refused_up_front():
    """A Qwen3-MoE with dense layers (mlp_only_layers) is not supported: said before any work, not
    as an AttributeError from deep inside."""
    from transformers import AutoModelForCausalLM
    cfg = tiny_config("qwen3_moe")
    cfg.mlp_only_layers = [1]
    w = AutoAWQ.from_model(AutoModelForCausalLM.from_config(cfg).eval())
    with pytest.raises(ValueError, match=r"decoder blocks \[1\] .* no experts at 'mlp.experts'.*not supported"):
        w.quantize(None, {"q_group_size": 64}, method="rtn")
    assert not w.interrupted


def test_unknown_model_type():
    with pytest.raises(ValueError, match="supported: .*llama"):
        get_spec("not_a_model")


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_expert_without_calibration_tokens_is_still_quantized(arch, calib_ids):
    model = tiny_model(arch)
    starved = 3

    def never_route_to_starved(mod, args, out):
        logits, scores, idx = out
        return logits, scores, torch.where(idx == starved, (idx + 1) % 4, idx)

    for layer in model.model.layers:
        layer.mlp.gate.register_forward_hook(never_route_to_starved)
    w = AutoAWQ.from_model(model)
    w.quantize(None, {"w_bit": 4, "q_group_size": 64}, calib_data=list(calib_ids), n_samples=16, seqlen=64)
    for layer in model.model.layers:
        experts = layer.mlp.experts
        assert len(experts) == 4
        assert sum(isinstance(m, WQLinear) for m in experts.modules()) == 12
    starved_reports = [r for rep in w.reports for k, r in rep.scales.items() if f"experts.{starved}." in k]
    assert starved_reports and all(r.ratio is None for r in starved_reports)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_unfused_experts_compute_what_transformers_fused_ones_do(arch, calib_ids):
    """transformers 5's 3-D expert parameters, unfused into per-expert linears: the same model."""
    from awqlib.moe import UnfusedExperts, unfuse_experts
    model = tiny_model(arch)
    spec = get_spec(model.config.model_type)
    ids = calib_ids[:2, :32]
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        for block in awq.get_blocks(model, spec):
            unfuse_experts(block, spec.experts)
            assert isinstance(block.get_submodule(spec.experts.path), UnfusedExperts)
        torch.testing.assert_close(model(input_ids=ids).logits, ref, rtol=1e-5, atol=1e-5)


def test_moe_statistics_are_per_expert(calib_ids):
    """Each expert's linears see only their routed tokens; the shared norm scale sees all tokens."""
    _, spec, block, inps, kws = first_block("mixtral", calib_ids)
    lin = awq.quantizable_linears(block, spec, QuantConfig(group_size=64))
    groups = resolve_groups(spec, block)
    sites, inspected, _ = awq.capture_block(block, groups, lin, inps, kws, torch.device("cpu"), awq.AWQOptions())
    total = calib_ids.numel()
    per_expert = [sites[f"mlp.experts.{e}.w1"].count for e in range(4)]
    assert sites["mlp.experts.0.w1"] is sites["mlp.experts.0.w3"]
    assert sites["mlp.experts.0.w1"] is not sites["mlp.experts.1.w1"]
    assert sum(per_expert) == 2 * total  # top-2 routing
    assert inspected["mlp"].site.count == total


def test_experts_run_only_where_tokens_are_routed():
    """UnfusedExperts groups the (token, slot) pairs by expert with one sort and one host sync and
    runs only the experts that got tokens, with the bits of a loop asking every expert for its
    tokens (same row order within an expert, experts added in index order)."""
    from awqlib.arch import ExpertSpec
    from awqlib.moe import UnfusedExperts

    def every_expert(experts, x, index, weights):
        out = torch.zeros_like(x)
        for i, expert in enumerate(experts):
            token, slot = torch.where(index == i)
            if token.numel():
                out.index_add_(0, token, (expert(x[token]) * weights[token, slot, None]).to(out.dtype))
        return out

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float16):
        experts = UnfusedExperts(ExpertSpec("mlp.experts", "gate_proj", "up_proj", "down_proj"), 16, 64, 96,
                                 torch.nn.SiLU(), dtype=dtype)
        for p in experts.parameters():
            p.data = torch.randn(p.shape, generator=g).to(dtype) / 8
        for tokens, k in ((1, 2), (7, 4), (33, 8), (5, 1)):
            x = torch.randn(tokens, 64, generator=g).to(dtype)
            index = torch.stack([torch.randperm(16, generator=g)[:k] for _ in range(tokens)])
            weights = torch.rand(tokens, k, generator=g).to(dtype)
            assert torch.equal(experts(x, index, weights), every_expert(experts, x, index, weights)), (dtype, tokens, k)


def test_qwen2_moe_shared_expert_shares_the_experts_scale_and_its_gate_stays_fp16(calib_ids, tmp_path):
    """The shared expert reads the experts' normed input: its gate/up join the experts' scale group
    (once each), the router and the [1, hidden] shared_expert_gate are scaled but never quantized (vLLM
    builds both without a quant config), and the checkpoint stores that gate as an fp16 weight, named in
    modules_to_not_convert; a checkpoint whose config leaves it out still loads (vLLM needs no entry)."""
    import json
    _, spec, block, _, _ = first_block("qwen2_moe", calib_ids[:2])
    norm = next(g for g in resolve_groups(spec, block) if g.name == "post_attention_layernorm")
    assert norm.group.linears.count("mlp.shared_expert.up_proj") == 1 and "mlp.experts.3.gate_proj" in norm.readers
    assert norm.scale_only == (block.mlp.gate, block.mlp.shared_expert_gate)
    assert "mlp.shared_expert_gate" not in awq.quantizable_linears(block, spec, QuantConfig(group_size=64))

    model = tiny_model("qwen2_moe")
    w = AutoAWQ.from_model(model)
    w.quantize(None, {"w_bit": 4, "q_group_size": 64}, calib_data=list(calib_ids), n_samples=16, seqlen=64)
    mlp = model.model.layers[0].mlp
    assert type(mlp.shared_expert_gate) is torch.nn.Linear and isinstance(mlp.shared_expert.down_proj, WQLinear)
    assert w.reports[0].scales["post_attention_layernorm"].ratio is not None
    out = w.save_quantized(tmp_path / "q")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["modules_to_not_convert"] == ["mlp.gate", "mlp.shared_expert_gate", "lm_head"]
    from conftest import checkpoint_tensors
    t = checkpoint_tensors(out)
    assert t["model.layers.0.mlp.shared_expert_gate.weight"].shape == (1, 128)
    assert {"model.layers.1.mlp.shared_expert.gate_proj.qweight", "model.layers.1.mlp.experts.3.down_proj.qweight",
            "model.layers.1.mlp.gate.weight"} <= t.keys()
    ids = calib_ids[:2, :32]
    with torch.no_grad():
        ref = AutoAWQ.from_quantized(str(out))(input_ids=ids).logits
        # layer fusion reads the expanded groups: the shared expert's gate/up fuse once, like each expert's
        fused = AutoAWQ.from_quantized(str(out), fuse_layers=True)
        from awqlib.fuse import FusedWQLinear
        assert sum(isinstance(m, FusedWQLinear) for m in fused.modules()) == 2 * (1 + 4 + 1)  # qkv, experts, shared
        torch.testing.assert_close(fused(input_ids=ids).logits, ref, rtol=1e-5, atol=1e-5)
    cfg["quantization_config"]["modules_to_not_convert"] = None
    (out / "config.json").write_text(json.dumps(cfg))
    with torch.no_grad():
        torch.testing.assert_close(AutoAWQ.from_quantized(str(out))(input_ids=ids).logits, ref, rtol=0, atol=0)


def test_expert_parallel_placeholder_index_runs_no_expert():
    """transformers 5 marks an expert held by another rank with index == num_experts: the routing skips
    it, as transformers' own experts do."""
    from awqlib.arch import ExpertSpec
    from awqlib.moe import UnfusedExperts
    g = torch.Generator().manual_seed(0)
    experts = UnfusedExperts(ExpertSpec("mlp.experts", "gate_proj", "up_proj", "down_proj"), 4, 32, 48, torch.nn.SiLU())
    x = torch.randn(3, 32, generator=g)
    index = torch.tensor([[0, 4], [4, 2], [1, 3]])
    weights = torch.rand(3, 2, generator=g)
    local = torch.tensor([[0, 0], [2, 2], [1, 3]])                 # the same rows without the placeholders ...
    w_local = weights * torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # ... contributing nothing
    torch.testing.assert_close(experts(x, index, weights), experts(x, local, w_local))


def test_a_shared_expert_that_no_group_size_fits_is_refused_up_front():
    """check_quantizable covers every linear a MoE block quantizes, not only the fused experts: a
    shared expert of 200 features with group 64 is refused before any work, naming the sizes that fit."""
    import transformers as T
    from awqlib.arch.blocks import check_quantizable
    from conftest import _COMMON
    cfg = T.Qwen2MoeConfig(**_COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=128,
                           shared_expert_intermediate_size=200, decoder_sparse_step=1, mlp_only_layers=[])
    model = T.AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(ValueError, match=r"shared_expert.down_proj has in_features=200.*Group sizes that work"):
        check_quantizable(model, get_spec("qwen2_moe"), QuantConfig(group_size=64))
