"""fuse_layers=True: same outputs, same checkpoint, fewer GEMMs."""

import pytest
import torch
from safetensors.torch import load_file

from awqlib import AutoAWQ
from awqlib.fuse import FusedSlice, FusedWQLinear
from conftest import ARCHS, tiny_model


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


# -- one op per norm, rotary and activation ----------------------------------------------------------

# what fuse_block_ops replaces in the tiny models (2 blocks): families without a dense gated MLP
# (MoE, OPT) keep theirs; OPT's LayerNorm and learned positions have nothing to replace
# and, per block, the residual add before the second norm (add_rms_norm) where the layer's forward
# has the three statements and the norm is one of ours: not Granite (a residual multiplier), Phi-3
# (dropout around the add) or LayerNorm families; never the add after the MLP (mlp_add), which joins
# a quantized down GEMM only, and these models are not quantized
BLOCK_OPS = {"opt": {"rms_norm": 0, "add_rms_norm": 0, "mlp_add": 0, "gated_mlp": 0, "expert_act": 0, "rotary": 0},
             "mixtral": {"rms_norm": 5, "add_rms_norm": 2, "mlp_add": 0, "gated_mlp": 0, "expert_act": 0, "rotary": 2},  # experts fused (3-D)
             "qwen3_moe": {"rms_norm": 9, "add_rms_norm": 2, "mlp_add": 0, "gated_mlp": 0, "expert_act": 0, "rotary": 2},
             "qwen3": {"rms_norm": 9, "add_rms_norm": 2, "mlp_add": 0, "gated_mlp": 2, "expert_act": 0, "rotary": 2},  # + q/k_norm
             "gemma2": {"rms_norm": 9, "add_rms_norm": 2, "mlp_add": 0, "gated_mlp": 2, "expert_act": 0, "rotary": 2},  # 4 per block
             "gemma3": {"rms_norm": 13, "add_rms_norm": 2, "mlp_add": 0, "gated_mlp": 2, "expert_act": 0, "rotary": 2},  # + q/k_norm
             "granite": {"rms_norm": 5, "add_rms_norm": 0, "mlp_add": 0, "gated_mlp": 2, "expert_act": 0, "rotary": 2},
             "phi3": {"rms_norm": 5, "add_rms_norm": 0, "mlp_add": 0, "gated_mlp": 2, "expert_act": 0, "rotary": 2},
             "starcoder2": {"rms_norm": 0, "add_rms_norm": 0, "mlp_add": 0, "gated_mlp": 0, "expert_act": 0, "rotary": 2},  # LayerNorms
             "cohere": {"rms_norm": 0, "add_rms_norm": 0, "mlp_add": 0, "gated_mlp": 2, "expert_act": 0, "rotary": 0},  # interleaved
             "cohere2": {"rms_norm": 0, "add_rms_norm": 0, "mlp_add": 0, "gated_mlp": 2, "expert_act": 0, "rotary": 0}}  # rotary


def _generate(model, ids):
    return model.generate(input_ids=ids, max_new_tokens=6, do_sample=False)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_block_ops_give_transformers_bits(arch, dtype, calib_ids):
    """The one-op norms, rotary and activation compute transformers' own expressions: on the CPU the
    logits and the greedy generation (KV cache and all) are bit for bit those of the unmodified model,
    in every family, and the state dict keeps its names and tensors."""
    from awqlib.arch import get_spec
    from awqlib.fuse import fuse_block_ops
    model = tiny_model(arch).to(dtype).eval()
    ids = calib_ids[:2, :16]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        logits, gen = model(input_ids=ids).logits, _generate(model, ids[:1, :5])
    counts = fuse_block_ops(model, get_spec(model.config.model_type))
    assert counts == BLOCK_OPS.get(arch, {"rms_norm": 5, "add_rms_norm": 2, "mlp_add": 0, "gated_mlp": 2, "expert_act": 0, "rotary": 2})
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, logits)
        assert torch.equal(_generate(model, ids[:1, :5]), gen)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def test_fuse_layers_dispatches_11_ops_per_llama_layer():
    """The point of the block ops: a decode step of a Llama layer dispatches 40 ops in transformers'
    code (fp16 or int4) and 11 with fuse_layers (q/k/v, o and gate/up GEMMs, the first norm, rotary,
    2 KV-cache appends, attention, the residual add and second norm as one op, act * up, and the
    down GEMM with the last residual add): each is at least one kernel on a GPU."""
    from benchmarks.bench_dispatch import measure
    rows = measure("llama")
    assert rows["fp16"]["per_layer"] == rows["int4"]["per_layer"] == 40, rows["fp16"]["layer_ops"]
    ops = rows["int4 fuse_layers"]["layer_ops"]
    assert rows["int4 fuse_layers"]["per_layer"] == 11, ops
    assert ops["awqlib.awq_gemm"] == 3 and ops["awqlib.awq_gemm_add"] == 1 and ops["awqlib.rms_norm"] == 1
    assert ops["awqlib.add_rms_norm"] == 1 and ops["awqlib.rotary"] == 1 and ops["awqlib.gated_act"] == 1
    assert "aten.add" not in ops, ops


def test_a_formula_awqlib_does_not_match_keeps_transformers_code(monkeypatch, calib_ids):
    """Each replacement is checked against the code it replaces: an RMSNorm, activation or rotary
    whose formula differs (a future transformers, a custom model) is left alone, and the model still
    computes what it did."""
    import transformers.models.llama.modeling_llama as ml
    from awqlib.arch import get_spec
    from awqlib.fuse import fuse_block_ops

    def norm_in_fp32(self, x):  # scales before rounding (Gemma's order) where Llama rounds first
        xf = x.float()
        return (self.weight.float() * xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)).to(x.dtype)

    def interleaved(q, k, cos, sin, unsqueeze_dim=1):  # GPT-J's rotary: pairs (0, 1), (2, 3), ...
        def rot(x):
            x1, x2 = x[..., 0::2], x[..., 1::2]
            return x * cos.unsqueeze(unsqueeze_dim) + torch.stack((-x2, x1), -1).flatten(-2) * sin.unsqueeze(unsqueeze_dim)
        return rot(q), rot(k)

    monkeypatch.setattr(ml.LlamaRMSNorm, "forward", norm_in_fp32)
    monkeypatch.setattr(ml, "apply_rotary_pos_emb", interleaved)
    model = tiny_model("llama").half().eval()
    for layer in model.model.layers:
        layer.mlp.act_fn = torch.nn.GELU()  # exact GELU: not one of blockops' activations
    ids = calib_ids[:2, :16]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert fuse_block_ops(model, get_spec("llama")) == {"rms_norm": 0, "add_rms_norm": 0, "mlp_add": 0, "gated_mlp": 0, "expert_act": 0,
                                                        "rotary": 0}
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, logits)


def test_probing_leaves_the_global_rng_alone():
    from awqlib.arch import get_spec
    from awqlib.fuse import fuse_block_ops
    model = tiny_model("gemma3").eval()
    torch.manual_seed(123)
    fuse_block_ops(model, get_spec(model.config.model_type))
    after = torch.rand(4)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(4), after)


def test_rotary_swap_is_per_module_and_keeps_the_decorators(calib_ids):
    """Only the fused model's attention modules see the one-op rotary (the class, transformers'
    module and other models keep theirs), and the forward keeps what its decorators do (e.g.
    transformers' renamed keyword arguments)."""
    import inspect
    import transformers.models.llama.modeling_llama as ml
    from awqlib.arch import get_spec
    from awqlib.fuse import fuse_block_ops
    original_rotary, original_forward = ml.apply_rotary_pos_emb, ml.LlamaAttention.forward
    fused, plain = tiny_model("llama").eval(), tiny_model("llama").eval()
    fuse_block_ops(fused, get_spec("llama"))
    assert ml.apply_rotary_pos_emb is original_rotary and ml.LlamaAttention.forward is original_forward
    attn, ref = fused.model.layers[0].self_attn, plain.model.layers[0].self_attn
    assert "forward" in vars(attn) and "forward" not in vars(ref)
    assert inspect.signature(attn.forward) == inspect.signature(ref.forward)
    x = torch.randn(1, 5, fused.config.hidden_size)
    pos = fused.model.rotary_emb(x, torch.arange(5)[None])
    names = inspect.signature(ref.forward).parameters
    kw = {"past_key_values": None} if "cache" in names else {}  # a deprecated name the decorator still maps
    with torch.no_grad():
        assert torch.equal(attn(x, pos, None, **kw)[0], ref(x, pos, None, **kw)[0])


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_quantized_experts_run_act_times_up_as_one_op(arch, calib_ids):
    """Quantizing unfuses the experts into per-expert linears; fuse_block_ops then gives each expert
    the one-op act * up, with the unfused model's bits on the CPU."""
    from awqlib.arch import get_spec
    from awqlib.fuse import fuse_block_ops
    w = AutoAWQ.from_model(tiny_model(arch)).quantize(None, {"q_group_size": 64}, method="rtn")
    ids = calib_ids[:2, :16]
    with torch.no_grad():
        logits, gen = w.model(input_ids=ids).logits, _generate(w.model, ids[:1, :5])
    counts = fuse_block_ops(w.model, get_spec(w.model.config.model_type))
    n_experts = w.model.config.num_local_experts if arch == "mixtral" else w.model.config.num_experts
    assert counts["expert_act"] == 2 * n_experts and counts["gated_mlp"] == 0
    with torch.no_grad():
        assert torch.equal(w.model(input_ids=ids).logits, logits)
        assert torch.equal(_generate(w.model, ids[:1, :5]), gen)


def test_fuse_layers_model_compiles_whole_with_one_gemm_per_fused_group(calib_ids):
    """torch.compile(fullgraph=True) traces a fuse_layers model without a graph break (the ops have
    fake implementations; the fused slices' cache is keyed by the traced tensor), gives the eager
    bits, and its graph holds 4 quantized GEMMs and 2 one-op norms per Llama layer (+ the last norm)."""
    from awqlib.fuse import fuse_layers
    w = AutoAWQ.from_model(tiny_model("llama")).quantize(None, {"q_group_size": 64}, method="rtn")
    fuse_layers(w.model, w.spec)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    ids = calib_ids[:1, :8]
    with torch.no_grad():
        eager = w.model(input_ids=ids, use_cache=False).logits
        compiled = torch.compile(w.model, fullgraph=True, backend=backend)(input_ids=ids, use_cache=False).logits
    assert torch.equal(compiled, eager) and len(graphs) == 1
    targets = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert sum("awq_gemm" in t for t in targets) == 2 * 4
    assert sum("rms_norm" in t for t in targets) == 2 * 2 + 1
    assert sum("rotary" in t for t in targets) == 2 and sum("gated_act" in t for t in targets) == 2


@pytest.mark.parametrize("op", ["rms_norm", "add_rms_norm", "gated_act", "rotary"])
def test_an_op_that_disagrees_with_transformers_on_the_probe_is_not_used(monkeypatch, op, calib_ids):
    """The probes run the op itself (the CUDA kernel on a GPU), not only its reference: an op that
    computes something else is never swapped in."""
    from awqlib import blockops
    from awqlib.arch import get_spec
    from awqlib.fuse import fuse_block_ops
    real = getattr(blockops, op)

    def off_by_a_bit(*args, **kwargs):
        out = real(*args, **kwargs)
        return tuple(o * 1.001 for o in out) if isinstance(out, tuple) else out * 1.001

    monkeypatch.setattr(blockops, op, off_by_a_bit)
    model = tiny_model("llama").eval()
    ids = calib_ids[:2, :16]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    counts = fuse_block_ops(model, get_spec("llama"))
    assert counts[{"gated_act": "gated_mlp"}.get(op, op)] == 0, counts
    assert sum(counts.values()) > 0  # the others still are
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, logits)


def test_probes_check_whole_modules_in_the_models_dtype(monkeypatch, calib_ids):
    """What the probes must catch: an MLP whose forward is not down(act(gate) * up) though its parts
    are, a rotary that rounds once in fp32 (same function as ours in fp32, not in fp16), and an
    RMSNorm with a parameter besides its weight."""
    import transformers.models.llama.modeling_llama as ml
    from awqlib.arch import get_spec
    from awqlib.fuse import fuse_block_ops
    original_rotary = ml.apply_rotary_pos_emb

    def rotary_in_fp32(q, k, cos, sin, unsqueeze_dim=1):
        out = original_rotary(q.float(), k.float(), cos.float(), sin.float(), unsqueeze_dim)
        return out[0].to(q.dtype), out[1].to(k.dtype)

    monkeypatch.setattr(ml.LlamaMLP, "forward",
                        lambda self, x: self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x) * 2))
    monkeypatch.setattr(ml, "apply_rotary_pos_emb", rotary_in_fp32)
    model = tiny_model("llama").half().eval()
    model.model.norm.register_parameter("bias", torch.nn.Parameter(torch.zeros(model.config.hidden_size,
                                                                               dtype=torch.float16)))
    ids = calib_ids[:2, :16]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    counts = fuse_block_ops(model, get_spec("llama"))
    assert counts == {"rms_norm": 4, "add_rms_norm": 2, "mlp_add": 0, "gated_mlp": 0, "expert_act": 0, "rotary": 0}
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, logits)


def test_modules_with_hooks_keep_their_code_and_fusing_twice_changes_nothing(caplog, calib_ids):
    """Replacing a module or its forward would drop its hooks (a user's, accelerate's): such modules
    keep their code, with a warning; a second fuse_block_ops replaces nothing it replaced before."""
    import logging
    from awqlib.arch import get_spec
    from awqlib.fuse import fuse_block_ops
    model = tiny_model("llama").eval()
    fired = []
    model.model.norm.register_forward_hook(lambda *a: fired.append("norm"))
    model.model.layers[0].mlp.register_forward_pre_hook(lambda *a: fired.append("mlp"))
    model.model.layers[1].self_attn._hf_hook = object()  # what accelerate's add_hook_to_module leaves
    with caplog.at_level(logging.WARNING, logger="awqlib"):
        counts = fuse_block_ops(model, get_spec("llama"))
    assert counts == {"rms_norm": 4, "add_rms_norm": 2, "mlp_add": 0, "gated_mlp": 1, "expert_act": 0, "rotary": 1}
    assert "kept transformers' own code for 1 rms_norm, 1 gated_mlp, 1 rotary" in caplog.text and not fired
    del model.model.layers[1].self_attn._hf_hook
    with torch.no_grad():
        model(input_ids=calib_ids[:1, :8])
    assert fired == ["mlp", "norm"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="awqlib"):
        again = fuse_block_ops(model, get_spec("llama"))
    assert again == {"rms_norm": 0, "add_rms_norm": 0, "mlp_add": 0, "gated_mlp": 0, "expert_act": 0, "rotary": 1}  # its hook left
    assert "kept transformers' own code for 1 rms_norm, 1 gated_mlp:" in caplog.text  # still hooked


def test_rotary_widths_come_from_where_transformers_keeps_them():
    from types import SimpleNamespace

    from awqlib.fuse import _rotary_dims
    assert _rotary_dims(SimpleNamespace(), 128) == {128}
    assert _rotary_dims(SimpleNamespace(partial_rotary_factor=0.75), 128) == {96}  # transformers 4.x
    assert _rotary_dims(SimpleNamespace(rope_parameters={"rope_type": "default", "partial_rotary_factor": 0.5}),
                        128) == {64}                                                # transformers 5
    per_layer = {"full_attention": {"partial_rotary_factor": 0.25}, "sliding_attention": {"rope_type": "default"}}
    assert _rotary_dims(SimpleNamespace(rope_parameters=per_layer), 128) == {32, 128}
    assert _rotary_dims(SimpleNamespace(partial_rotary_factor=None), 64) == {64}


def test_a_forward_wrapped_other_than_through_a_closure_keeps_transformers_rotary():
    """A decorator that reaches the function it wraps other than through a closure cell would keep
    calling the original: no rebuilt forward then (it would claim a swap that never happens)."""
    import functools

    from awqlib.fuse import _with_globals

    def target(x):
        return helper(x)  # noqa: F821 -- resolved in the rebuilt function's globals

    def boxed(fn):
        box = [fn]

        @functools.wraps(fn)
        def wrapper(*a):
            return box[0](*a)
        return wrapper

    def direct(fn):
        @functools.wraps(fn)
        def wrapper(*a):
            return fn(*a)
        return wrapper

    assert _with_globals(boxed(target), {"helper": abs}) is None
    assert _with_globals(direct(target), {"helper": abs})(-3) == 3
    assert _with_globals(functools.partial(target), {"helper": abs}) is None


def test_fused_mlp_keeps_the_mlps_plain_attributes():
    from awqlib.arch import get_spec
    from awqlib.fuse import FusedGatedMLP, fuse_block_ops
    model = tiny_model("llama").eval()
    before = model.model.layers[0].mlp
    fuse_block_ops(model, get_spec("llama"))
    after = model.model.layers[0].mlp
    assert isinstance(after, FusedGatedMLP) and after.config is before.config
    assert (after.hidden_size, after.intermediate_size) == (before.hidden_size, before.intermediate_size)
    assert not after.training and not model.model.norm.training  # an eval model stays in eval mode


def test_fuse_layers_model_generates_compiled_with_a_static_cache():
    """The way to CUDA graphs in HF generate (a static KV cache and a compiled forward, mode
    "reduce-overhead" on a GPU): a fuse_layers model traces whole for prefill and decode and
    generates the eager tokens."""
    from awqlib.fuse import fuse_layers
    w = AutoAWQ.from_model(tiny_model("llama")).quantize(None, {"q_group_size": 64}, method="rtn")
    fuse_layers(w.model, w.spec)
    ids = torch.randint(0, w.model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(0))
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    with torch.no_grad():
        eager = w.model.generate(input_ids=ids, max_new_tokens=8, do_sample=False, cache_implementation="static")
        w.model.forward = torch.compile(w.model.forward, fullgraph=True, backend=backend)
        compiled = w.model.generate(input_ids=ids, max_new_tokens=8, do_sample=False, cache_implementation="static")
    assert torch.equal(compiled, eager) and len(graphs) == 2  # prefill, then every decode step


# -- the residual add before a block's second norm: the forward recompiled from its source ---------------

def _wrapped(f):
    """A decorator as transformers writes them (functools.wraps, the inner function in a closure)."""
    import functools

    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        return f(*args, **kwargs)
    return wrapper


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        from awqlib.fuse import FusedRMSNorm
        self.lin = torch.nn.Linear(8, 8)
        self.mlp = torch.nn.Linear(8, 8)
        self.n = FusedRMSNorm(torch.nn.Parameter(torch.randn(8)), 1e-6, 0.0, False)

    @_wrapped
    def forward(self, x, flag=True):
        residual = x
        x = self.lin(x)
        if flag:  # the three statements, inside an if: found
            x = x + residual
            residual = x
            x = self.n(x)
        x = self.mlp(x)  # the MLP and the add after it: found
        x = residual + x
        return x


class _MlpScaled(_Block):
    def forward(self, x):
        residual = x
        x = self.mlp(x) * 2  # not a call alone
        x = residual + x
        return x


class _MlpOther(_Block):
    def forward(self, x):
        residual = x
        x = self.lin(x)  # not the MLP's attribute
        x = residual + x
        y = self.mlp(x)
        z = residual + y  # another name
        return z


class _Scaled(_Block):
    def forward(self, x):
        residual = x
        x = residual + x * 2  # not a plain sum of the two names
        residual = x
        x = self.n(x)
        return x + residual


class _Between(_Block):
    def forward(self, x):
        residual = x
        x = residual + x
        x.mul_(1)  # a statement between the add and what follows
        residual = x
        x = self.n(x)
        return x + residual


class _OtherInput(_Block):
    def forward(self, x):
        residual = x
        x = residual + self.lin(x)
        residual = x
        x = self.n(residual)  # the norm of another name
        return x + residual


class _Super(_Block):
    def forward(self, x):
        residual = x
        x = residual + super().forward(x)  # super()'s cell: a recompiled function could not keep it
        residual = x
        x = self.n(x)
        return x + residual


def test_residual_rewrite_takes_exactly_its_statements(monkeypatch):
    """fuse._residual_code fuses `h = r + h` (or `h + r`), `r = h`, `h = self.norm(h)` into one
    _add_rms_norm call and `h = self.mlp(h)`, `h = r + h` into one _add_mlp call -- inside control
    flow, under functools.wraps wrappers, defaults kept -- giving the original's bits, with
    add_rms_norm run once; a scaled sum, a statement between, the norm of another name, another
    attribute than the MLP's, another target, or a forward with super()'s cell are left alone."""
    import types

    from awqlib import blockops, fuse
    made = fuse._residual_code(_Block.forward, "mlp")
    assert made is not None and made[1] == [("norm", "n"), ("mlp", "mlp")]
    assert fuse._residual_code(_Block.forward, None)[1] == [("norm", "n")]  # no MLP site asked for
    for cls in (_Scaled, _Between, _OtherInput, _Super, _MlpScaled, _MlpOther):
        assert fuse._residual_code(cls.forward, "mlp") is None, cls.__name__
    forward = fuse._residual_forward(_Block(), "mlp", True, {})
    assert forward.awqlib_residual == (("norm", "n"), ("mlp", "mlp"))
    assert isinstance(forward.__wrapped__, types.FunctionType)
    calls = []
    real = blockops.add_rms_norm
    monkeypatch.setattr(blockops, "add_rms_norm", lambda *a, **k: calls.append(1) or real(*a, **k))
    block, x = _Block().eval(), torch.randn(3, 8)
    with torch.no_grad():
        want, want_plain = block(x), block(x, flag=False)
        block.forward = types.MethodType(forward, block)
        assert torch.equal(block(x), want) and calls == [1]
        assert torch.equal(block(x, flag=False), want_plain) and calls == [1]
    # a norm that is not ours (or has hooks) runs the statements it stands for
    block.n = torch.nn.Identity()
    with torch.no_grad():
        h = block.lin(x) + x
        assert torch.equal(block(x), h + block.mlp(h)) and calls == [1]


def test_fused_residual_layer_keeps_its_decorators_and_compiles(calib_ids):
    """The rewritten decoder layer's forward keeps transformers' wrappers (the same chain of
    functions around it) and compiles whole with the rest of a fused quantized model, the down GEMM
    with its residual add (awq_gemm_add) included."""
    from awqlib.arch import get_spec
    from awqlib.fuse import fuse_block_ops, fuse_linears
    model = tiny_model("llama").eval()
    wrapped = AutoAWQ.from_model(model)
    wrapped.quantize(None, {"q_group_size": 64}, method="rtn")
    fuse_linears(model, wrapped.spec)
    ids = calib_ids[:1, :8]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    counts = fuse_block_ops(model, get_spec("llama"))
    assert counts["add_rms_norm"] == counts["mlp_add"] == 2, counts
    layer = model.model.layers[0]
    assert layer.forward.__func__.awqlib_residual == (("norm", "post_attention_layernorm"), ("mlp", "mlp"))
    assert hasattr(layer.forward.__func__, "__wrapped__") == hasattr(type(layer).forward, "__wrapped__")
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        assert torch.equal(compiled(input_ids=ids).logits, logits)


_LAYER_SOURCE = '''from __future__ import annotations

import typing

import torch

if typing.TYPE_CHECKING:
    from nowhere import Missing


class Layer(torch.nn.Module):
    """A decoder layer as a modeling file might write one."""

    def __init__(self, norm, mlp):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)
        self.__n = norm  # a private name: stored as _Layer__n
        self.mlp = mlp

    def forward(self, x):
        def scale(t: Missing) -> Missing:  # annotations of a name that exists only for type checkers
            return t * 2.0

        message = """a multi-line string
            whose indentation is part of it"""
        residual = x
        x = scale(self.lin(x)) + len(message)
        x = residual + x
        residual = x
        x = self.__n(x)
        x = self.mlp(x)
        x = residual + x
        return x
'''


def test_residual_rewrite_compiles_as_the_module_did(tmp_path, monkeypatch):
    """The recompiled forward is compiled as its module was: private names mangled in its class, the
    module's __future__ flags (a nested def's annotations stay unevaluated), strings and line
    numbers as in the file; and a modeling file edited on disk since it was imported is not
    recompiled at all (its text is no longer the code that runs)."""
    import importlib.util
    import inspect
    import os
    import types

    from awqlib import blockops, fuse
    from awqlib.fuse import FusedRMSNorm
    path = tmp_path / "modeling_toy.py"
    path.write_text(_LAYER_SOURCE)
    spec = importlib.util.spec_from_file_location("modeling_toy", path)
    toy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(toy)
    norm = FusedRMSNorm(torch.nn.Parameter(torch.randn(8)), 1e-6, 0.0, False)
    layer, x = toy.Layer(norm, torch.nn.Linear(8, 8)).eval(), torch.randn(3, 8)
    code, sites = fuse._residual_code(toy.Layer.forward, "mlp")
    assert sites == [("norm", "_Layer__n"), ("mlp", "mlp")]
    lines, first = inspect.getsourcelines(toy.Layer.forward)
    assert {line for *_, line in code.co_lines() if line} <= set(range(first, first + len(lines)))
    calls = []
    real = blockops.add_rms_norm
    monkeypatch.setattr(blockops, "add_rms_norm", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        want = layer(x)
        layer.forward = types.MethodType(fuse._residual_forward(layer, "mlp", True, {}), layer)
        assert torch.equal(layer(x), want) and calls == [1]
    path.write_text(_LAYER_SOURCE.replace("t * 2.0", "t * 3.25"))  # edited after the import
    os.utime(path, (path.stat().st_atime, path.stat().st_mtime + 10))
    assert fuse._residual_code(toy.Layer.forward, "mlp") is None


def test_module_hooks_for_every_module_still_see_the_fused_layers_modules(calib_ids):
    """Hooks registered for every module (module trackers, FlopCounterMode) see the second norm and
    the MLP called as before: while there are any, the fused helpers take the unfused path."""
    from awqlib.arch import get_spec
    from awqlib.fuse import fuse_block_ops
    model = tiny_model("llama").eval()
    ids = calib_ids[:1, :8]
    seen = []

    def record(module, args, out):
        seen.append(type(module).__name__)

    with torch.no_grad():
        handle = torch.nn.modules.module.register_module_forward_hook(record)
        model(input_ids=ids)
        before = list(seen)
        handle.remove()
        assert fuse_block_ops(model, get_spec("llama"))["add_rms_norm"] == 2
        seen.clear()
        handle = torch.nn.modules.module.register_module_forward_hook(record)
        try:
            model(input_ids=ids)
        finally:
            handle.remove()
    norms = lambda names: sum(n.endswith("RMSNorm") for n in names)  # noqa: E731
    assert norms(seen) == norms(before) == 5 and seen.count("FusedGatedMLP") == 2


# per family, what a quantized model's fuse_block_ops joins: both adds where the layer reads as Llama's,
# the first alone where a norm sits between the MLP and its add (Gemma 2/3) or the MLP is a MoE block
QUANTIZED_RESIDUAL = {"llama": (2, 2), "mistral": (2, 2), "qwen2": (2, 2), "qwen3": (2, 2), "gemma": (2, 2),
                      "gemma2": (2, 0), "gemma3": (2, 0), "qwen3_moe": (2, 0), "phi3": (0, 0), "granite": (0, 0)}


@pytest.mark.parametrize("arch", list(QUANTIZED_RESIDUAL))
def test_quantized_layers_join_their_residual_adds_bit_for_bit(arch, calib_ids):
    """In a quantized, fused model the residual adds join the second norm and the down GEMM where the
    family's layer reads so, and the logits stay the unfused model's bit for bit (CPU); a hook on a
    down projection afterwards is honoured (that MLP's add runs apart again)."""
    from awqlib.arch import get_spec
    from awqlib.fuse import fuse_block_ops, fuse_linears
    model = tiny_model(arch).eval()
    wrapped = AutoAWQ.from_model(model)
    wrapped.quantize(None, {"q_group_size": 32}, method="rtn")
    ids = calib_ids[:2, :12]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    fuse_linears(model, wrapped.spec)
    counts = fuse_block_ops(model, get_spec(model.config.model_type))
    assert (counts["add_rms_norm"], counts["mlp_add"]) == QUANTIZED_RESIDUAL[arch], counts
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, logits)
    if counts["mlp_add"]:
        seen = []
        model.model.layers[0].mlp.down_proj.register_forward_hook(lambda *a: seen.append(1))
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, logits)
        assert seen == [1]
