"""``fuse_layers=True``: linears that read the same input become one quantized GEMM, and the small
ops around them one kernel each.

q/k/v and gate/up are concatenated along the output dimension at load time (the GEMM layout
packs along N, so concatenating ``qweight``/``qzeros``/``scales`` on dim 1 is exact).  The
attention and MLP code of transformers is left untouched: each original linear is replaced by a
:class:`FusedSlice` that asks the shared :class:`FusedWQLinear` for its part.  The first slice
to see an input runs the fused GEMM; its siblings, called with the *same* tensor (checked by
identity and version counter), take their slices of the cached result.  Called with anything
else, a slice simply recomputes, so the result is always the unfused one.

Checkpoints never see the fusion: each slice's ``state_dict()`` entry is the unfused linear's
tensors (a state-dict hook, as :class:`~awqlib.modules.WQLinear` does for its runtime layout),
and the fused module is marked ``runtime_only`` so that the checkpoint writer leaves its tensors
out.  They stay in ``state_dict()`` because accelerate offloads a placed model from it.

Around the linears a decoder block runs ~35 small kernels in transformers' code (each RMSNorm is 8,
the rotary embedding of q and k 10, the activation 2): at decode they take about as long as the
int4 linears and dominate HF ``generate``'s host time.  :func:`fuse_block_ops` gives each of them
one :mod:`awqlib.blockops` op -- RMSNorm modules become :class:`FusedRMSNorm`, the dense gated MLP
:class:`FusedGatedMLP`, unfused experts run act * up as one op, the attention's rotary function
(looked up in its module's globals) becomes ours, for that attention module only, and the residual
adds of a layer join the second norm's kernel and the MLP's down GEMM (the layer's forward
recompiled from its own source, see :func:`_residual_code`).  Every
replacement is first run on a probe input against the code it replaces, in the model's dtype and
on its device (bit for bit off CUDA, within two ulps on a CUDA kernel), so a transformers release
that changes a formula keeps its own code (with a warning); the state dict keeps its names.
"""

from __future__ import annotations

import __future__
import ast
import inspect
import logging
import textwrap
import types

import torch
from torch import nn

from . import blockops, kernels
from .arch import ExpertSpec, GatedMLP
from .arch.blocks import expand_groups, find_submodule, get_blocks, replace_module
from .modules import WQLinear
from .moe import UnfusedExperts
from .quant import pack_factor

log = logging.getLogger("awqlib")


class FusedWQLinear(nn.Module):
    runtime_only = True  # its tensors are the slices' tensors rearranged: not for checkpoints

    def __init__(self, parts: list[WQLinear]):
        super().__init__()
        p0 = parts[0]
        self.sizes = [p.out_features for p in parts]
        self.linear = WQLinear(p0.in_features, sum(self.sizes), p0.bits, p0.group_size,
                               bias=any(p.bias is not None for p in parts), device=p0.qweight.device)
        gemm = [p.gemm_params() for p in parts]
        self.linear.qweight = torch.cat([g[0] for g in gemm], dim=1)
        self.linear.qzeros = torch.cat([g[1] for g in gemm], dim=1)
        self.linear.scales = torch.cat([g[2] for g in gemm], dim=1)
        if any(p.tiled for p in parts):  # keep the runtime layout the parts had
            self.linear.set_layout(next(p.layout for p in parts if p.tiled))
        if self.linear.bias is not None:
            self.linear.bias = torch.cat([p.bias if p.bias is not None else
                                          torch.zeros(p.out_features, dtype=torch.float16, device=p.scales.device)
                                          for p in parts])
        self._key = None
        self._outs: tuple[torch.Tensor, ...] = ()
        self._pending = 0

    def part(self, x: torch.Tensor, idx: int) -> torch.Tensor:
        # Eager: keyed by identity and version counter (no reference kept to x).  Traced by
        # torch.compile: keyed by the traced tensor itself (it has neither), which dynamo compares
        # while tracing and keeps as a side effect: the graph holds one GEMM per fused group.
        compiling = torch.compiler.is_compiling()
        key = x if compiling else (id(x), x._version)
        stale = self._key is not key if compiling else key != self._key
        if self._pending == 0 or stale:
            self._outs = self.linear(x).split(self.sizes, dim=-1)
            self._key, self._pending = key, len(self.sizes)
        self._pending -= 1
        out = self._outs[idx]
        if self._pending == 0:  # every sibling served: drop the references
            self._outs, self._key = (), None
        return out


class FusedSlice(nn.Module):
    def __init__(self, fused: FusedWQLinear, idx: int, in_features: int, out_features: int, has_bias: bool):
        super().__init__()
        self.in_features, self.out_features, self.has_bias = in_features, out_features, has_bias
        self.idx = idx
        self.__dict__["fused"] = fused  # not a submodule: registered once on the parent
        self._register_state_dict_hook(_export_unfused)
        self._register_load_state_dict_pre_hook(_drop_unfused, with_module=True)

    def forward(self, x):
        return self.fused.part(x, self.idx)

    def unfused_state(self) -> dict[str, torch.Tensor]:
        """The tensors of the unfused WQLinear this slice stands for (GEMM layout)."""
        lin, sizes = self.fused.linear, self.fused.sizes
        a = sum(sizes[: self.idx])
        b = a + sizes[self.idx]
        pf = pack_factor(lin.bits)
        qweight, qzeros, scales = lin.gemm_params()
        out = {"qweight": qweight[:, a // pf: b // pf], "qzeros": qzeros[:, a // pf: b // pf], "scales": scales[:, a:b]}
        if self.has_bias:
            out["bias"] = lin.bias[a:b]
        return out


def _export_unfused(module: FusedSlice, state_dict: dict, prefix: str, local_metadata) -> None:
    for k, v in module.unfused_state().items():
        state_dict[prefix + k] = v


def _drop_unfused(module: FusedSlice, state_dict: dict, prefix: str, *args) -> None:
    # the fused module loads the data; the exported views are only for checkpoints
    for k in ("qweight", "qzeros", "scales", "bias"):
        state_dict.pop(prefix + k, None)


def fuse_model(wrapped) -> int:
    """Fuse the quantized linears of an :class:`~awqlib.AWQModel`; see :func:`fuse_layers`."""
    return fuse_layers(wrapped.model, wrapped.spec)


def fuse_layers(model: nn.Module, spec) -> int:
    """Fuse every scaling group's quantized linears that share a parent, then the block's small ops
    (:func:`fuse_block_ops`). Returns the count of fused linear groups."""
    n = fuse_linears(model, spec)
    fuse_block_ops(model, spec)
    return n


def fuse_linears(model: nn.Module, spec) -> int:
    """Fuse every scaling group's quantized linears that share a parent. Returns the count."""
    n = 0
    for block in get_blocks(model, spec):
        for g in expand_groups(spec, block):
            by_parent: dict[str, list[str]] = {}
            for name in g.linears:
                parent, _, child = name.rpartition(".")
                by_parent.setdefault(parent, []).append(child)
            for parent_name, children in by_parent.items():
                parent = block.get_submodule(parent_name) if parent_name else block
                parts = [getattr(parent, c) for c in children]
                if len(parts) < 2 or not all(isinstance(p, WQLinear) for p in parts):
                    continue
                fused = FusedWQLinear(parts)
                tag = "fused_" + "_".join(children)
                parent.add_module(tag, fused)
                for i, (c, p) in enumerate(zip(children, parts)):
                    setattr(parent, c, FusedSlice(fused, i, p.in_features, p.out_features, p.bias is not None))
                n += 1
    log.info("awqlib: fused %d groups of quantized linears", n)
    return n


# -- the small ops around the linears ------------------------------------------------------------------

def _probe(shape: tuple[int, ...], like: torch.Tensor, seed: int) -> torch.Tensor:
    """A reproducible probe input on ``like``'s device and dtype (not drawn from the global RNG: the
    user's seeds must not move).  On CUDA the kernels are loaded first, so that the probe checks
    the kernel that will serve the model, not the reference it falls back to until then."""
    if like.device.type == "cuda":
        kernels.load()
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 4).to(device=like.device, dtype=like.dtype)


def _where(module: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """An empty tensor of ``dtype`` on the device ``module`` computes on (the CPU for meta tensors)."""
    t = next((t for t in (*module.parameters(), *module.buffers()) if not t.is_meta), None)
    return torch.empty(0, dtype=dtype, device=t.device if t is not None else "cpu")


def _hooked(module: nn.Module) -> bool:
    """Hooks (a user's, accelerate's device hooks) or a forward already replaced on the instance:
    replacing the module or its forward would drop them, so such modules keep their code."""
    return (getattr(module, "_hf_hook", None) is not None or "forward" in vars(module)
            or any(getattr(module, h, None) for h in ("_forward_hooks", "_forward_pre_hooks",
                                                       "_backward_hooks", "_backward_pre_hooks")))


# A probe runs the op itself where the model computes.  Where the op is the reference (every device
# but CUDA) it must give transformers' bits; a CUDA kernel sums and rounds in its own order, so there
# it may differ by two units in the last place of the output's largest value.
_TWO_ULPS = {torch.float16: 2.0 ** -9, torch.bfloat16: 2.0 ** -6, torch.float32: 2.0 ** -22}


def _agree(got, want) -> bool:
    if not isinstance(got, torch.Tensor) or not isinstance(want, torch.Tensor) or got.shape != want.shape \
            or got.dtype != want.dtype:
        return False
    if want.device.type != "cuda":
        return torch.equal(got, want)
    tol = _TWO_ULPS.get(want.dtype, 0.0) * want.abs().max().float()
    return bool(((got.float() - want.float()).abs() <= tol).all())


def _outputs(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


def _all_agree(got: tuple, want: tuple) -> bool:
    return len(got) == len(want) and all(_agree(g, w) for g, w in zip(got, want))


def _probe_agrees(what: str, run_op, run_transformers, run_reference=None) -> bool:
    """Whether the op (``run_op()``) agrees with transformers' code (``run_transformers()``) on a probe.
    A CUDA kernel that disagrees where the op's reference (``run_reference()``) agrees is a kernel
    bug, said loudly; either way transformers' code stays."""
    with torch.no_grad():
        try:
            want = _outputs(run_transformers())
        except Exception:  # noqa: BLE001 -- another signature: not the code the op replaces
            return False
        if _all_agree(_outputs(run_op()), want):
            return True
        if run_reference is not None and isinstance(want[0], torch.Tensor) and want[0].device.type == "cuda":
            if _all_agree(_outputs(run_reference()), want):
                log.warning("awqlib: the CUDA kernel of %s disagrees with transformers' code on a probe input; "
                            "keeping transformers' code (please report this, with the GPU and the torch version)",
                            what)
    return False


class FusedRMSNorm(nn.Module):
    """transformers' RMSNorm as one op; holds the replaced module's ``weight`` (same state dict)."""

    def __init__(self, weight: nn.Parameter, eps: float, weight_offset: float, scale_in_fp32: bool):
        super().__init__()
        self.weight = weight
        self.eps, self.weight_offset, self.scale_in_fp32 = eps, weight_offset, scale_in_fp32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return blockops.rms_norm(x, self.weight, self.eps, self.weight_offset, self.scale_in_fp32)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(residual + x, self(residual + x)) as one op."""
        return blockops.add_rms_norm(x, residual, self.weight, self.eps, self.weight_offset, self.scale_in_fp32)

    def extra_repr(self) -> str:
        return (f"{tuple(self.weight.shape)}, eps={self.eps}, weight_offset={self.weight_offset}, "
                f"scale_in_fp32={self.scale_in_fp32}")


def _rms_norm_replacement(module: nn.Module, spec, dtype: torch.dtype) -> FusedRMSNorm | None:
    """A FusedRMSNorm computing what ``module`` (a transformers *RMSNorm) does on inputs of ``dtype``,
    or None (not one we reproduce: other parameters, hooks, another formula)."""
    weight = module._parameters.get("weight")
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if (weight is None or weight.dim() != 1 or weight.is_meta or not isinstance(eps, float) or set(module._parameters) != {"weight"}
            or module._buffers or list(module.children()) or _hooked(module)):
        return None
    fused = FusedRMSNorm(weight, eps, spec.norm_offset, spec.norm_scale_in_fp32).train(module.training)
    x = _probe((3, weight.shape[0]), _where(module, dtype), 0)
    reference = lambda: blockops._reference_rms_norm(x, weight, eps, spec.norm_offset, spec.norm_scale_in_fp32)  # noqa: E731
    return fused if _probe_agrees("rms_norm", lambda: fused(x), lambda: module.forward(x), reference) else None


class FusedGatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))`` with act * up as one op; adopts the replaced MLP's children under
    their names (same state dict; fused gate/up slices still share one GEMM)."""

    def __init__(self, mlp: nn.Module, spec: GatedMLP, act: str):
        super().__init__()
        for name, child in mlp.named_children():
            self.add_module(name, child)
        for name, value in vars(mlp).items():  # its plain attributes (config, sizes) stay readable
            if not name.startswith("_") and name not in vars(self):
                setattr(self, name, value)
        self.spec, self.act = spec, act
        self.train(mlp.training)

    def _gated(self, x: torch.Tensor) -> torch.Tensor:
        s = self.spec
        if s.gate_up:
            gate, up = getattr(self, s.gate_up)(x).chunk(2, dim=-1)
        else:
            gate, up = getattr(self, s.gate)(x), getattr(self, s.up)(x)
        return blockops.gated_act(gate, up, self.act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, self.spec.down)(self._gated(x))

    def forward_add(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``residual + self(x)``, the add in the down GEMM where down is a quantized linear without
        bias or hooks (WQLinear.forward_add)."""
        down = getattr(self, self.spec.down)
        if _adds_in_gemm(self):
            return down.forward_add(self._gated(x), residual)
        return residual + down(self._gated(x))

    def extra_repr(self) -> str:
        return f"act={self.act}"


def _activation_name(act: nn.Module, like: torch.Tensor) -> str | None:
    """The blockops activation computing what ``act`` does (on ``like``'s device and dtype), or None."""
    gate, up = _probe((4, 256), like, 1), _probe((4, 256), like, 2)
    return next((a for a in blockops.ACTIVATIONS if _probe_agrees(
        f"gated_act({a})", lambda: blockops.gated_act(gate, up, a), lambda: act(gate) * up,
        lambda: blockops._reference_gated_act(gate, up, a))), None)


def _mlp_replacement(mlp: nn.Module, spec: GatedMLP, dtype: torch.dtype) -> FusedGatedMLP | None:
    """A FusedGatedMLP computing what the block's MLP ``mlp`` does (the whole forward, probed), or None."""
    names = (spec.gate_up, spec.down) if spec.gate_up else (spec.gate, spec.up, spec.down)
    if (mlp._parameters or mlp._buffers or _hooked(mlp)
            or not all(isinstance(getattr(mlp, n, None), nn.Module) for n in names)):
        return None
    act, hidden = getattr(mlp, spec.act, None), getattr(getattr(mlp, names[0]), "in_features", None)
    like = _where(mlp, dtype)
    name = _activation_name(act, like) if isinstance(act, nn.Module) and isinstance(hidden, int) else None
    if name is None:
        return None
    fused = FusedGatedMLP(mlp, spec, name)
    x = _probe((3, hidden), like, 7)
    return fused if _probe_agrees(f"{spec.path} with gated_act", lambda: fused(x), lambda: mlp.forward(x)) else None


def _experts_replacement(experts: UnfusedExperts, spec: ExpertSpec, dtype: torch.dtype) -> FusedGatedMLP | None:
    """The first unfused expert as a FusedGatedMLP (probed as a dense MLP is), where every expert may
    run as one (none hooked, all sharing its activation module), or None."""
    first = experts[0]
    if any(_hooked(e) or e.act_fn is not first.act_fn for e in experts):
        return None
    mlp = GatedMLP(path=f"{spec.path}.0", gate=spec.gate, up=spec.up, down=spec.down)
    return _mlp_replacement(first, mlp, dtype)


def _fused_rotary(original):
    """transformers' ``apply_rotary_pos_emb`` as one op; calls it does not take go to ``original``."""
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        unsqueeze_dim = kwargs.get("unsqueeze_dim", 1)
        if args or set(kwargs) - {"unsqueeze_dim"} or not all(isinstance(t, torch.Tensor) for t in (q, k, cos, sin)):
            return original(q, k, cos, sin, *args, **kwargs)
        try:
            blockops._check_rotary(q, k, cos, sin, unsqueeze_dim)
        except ValueError:
            return original(q, k, cos, sin, *args, **kwargs)
        return blockops.rotary(q, k, cos, sin, unsqueeze_dim)
    apply_rotary_pos_emb.original = original
    return apply_rotary_pos_emb


def _rotary_dims(config, head_dim: int) -> set[int]:
    """The rotary widths the model's cos/sin can have: head_dim times its partial_rotary_factor, which
    transformers 5 keeps in rope_parameters (per layer type for some models: a layer type without
    one rotates the whole head), 4.x on the config."""
    rope = getattr(config, "rope_parameters", None)
    per_type = [v for v in rope.values() if isinstance(v, dict)] if isinstance(rope, dict) else []
    factors = {getattr(config, "partial_rotary_factor", None)}
    if isinstance(rope, dict):
        factors.add(rope.get("partial_rotary_factor"))
    factors |= {p.get("partial_rotary_factor", 1.0) for p in per_type}
    return {int(head_dim * f) for f in factors if isinstance(f, (int, float)) and 0 < f <= 1} or {head_dim}


def _rotary_matches(original, head_dim: int, rotary_dim: int, like: torch.Tensor) -> bool:
    q, k = _probe((2, 3, 5, head_dim), like, 3), _probe((2, 1, 5, head_dim), like, 4)
    cos, sin = _probe((2, 5, rotary_dim), like, 5), _probe((2, 5, rotary_dim), like, 6)
    return _probe_agrees("rotary", lambda: blockops.rotary(q, k, cos, sin, 1), lambda: original(q, k, cos, sin),
                         lambda: blockops._reference_rotary(q, k, cos, sin, 1))


def _cell(cell):
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell
        return None


def _with_globals(fn, replace: dict, code: types.CodeType | None = None):
    """``fn`` run with ``replace`` over its globals, and so every function it wraps (functools.wraps,
    each holding the next in a closure cell); None where ``fn`` is not such a chain of functions.
    ``code``: the innermost function's new code (same free variables), kept under its wrappers."""
    if not isinstance(fn, types.FunctionType):
        return None
    inner, closure = getattr(fn, "__wrapped__", None), fn.__closure__
    if inner is not None:
        new_inner = _with_globals(inner, replace, code)
        if new_inner is None or not any(_cell(c) is inner for c in closure or ()):
            return None  # the wrapper reaches what it wraps some other way: it would keep calling the original
        closure = tuple(types.CellType(new_inner) if _cell(c) is inner else c for c in closure)
    # a copy of the module's globals: torch.compile reads globals as a plain dict (an overlay that
    # looked names up in the live module would break it), so a patch to the modeling module after
    # fusing is not seen by the fused forward -- patch before fusing
    own = code if code is not None and inner is None else fn.__code__
    if own.co_freevars != fn.__code__.co_freevars:
        return None
    new = types.FunctionType(own, {**fn.__globals__, **replace}, fn.__name__, fn.__defaults__, closure)
    new.__kwdefaults__, new.__dict__ = fn.__kwdefaults__, dict(fn.__dict__)
    for name in ("__module__", "__qualname__", "__doc__", "__annotations__"):
        setattr(new, name, getattr(fn, name))
    if inner is not None:
        new.__wrapped__ = new_inner
    return new


def _innermost(fn):
    """The function under ``fn``'s functools.wraps wrappers (each names the next in ``__wrapped__``)."""
    while isinstance(getattr(fn, "__wrapped__", None), types.FunctionType):
        fn = fn.__wrapped__
    return fn


_ROTARY = "apply_rotary_pos_emb"


def _rotary_forward(attn: nn.Module, config, cache: dict, dtype: torch.dtype):
    """The attention's own forward with our rotary, or None (its class does not call a rotary we match)."""
    cls = type(attn)
    if cls not in cache:
        cache[cls] = None
        inner = _innermost(cls.forward)
        original = getattr(inner, "__globals__", {}).get(_ROTARY)
        head_dim = getattr(attn, "head_dim", None)
        if (isinstance(inner, types.FunctionType) and callable(original) and _ROTARY in inner.__code__.co_names
                and isinstance(head_dim, int)):
            dims = _rotary_dims(config, head_dim)
            if all(r % 2 == 0 and _rotary_matches(original, head_dim, r, _where(attn, dtype)) for r in dims):
                cache[cls] = _with_globals(cls.forward, {_ROTARY: _fused_rotary(original)})
                if cache[cls] is not None:
                    cache[cls].awqlib_rotary = True  # seen through the bound method: fused already
    return cache[cls]


# -- the residual adds of a pre-norm decoder layer --------------------------------------------------------
#
# transformers' pre-norm decoder layers add their residual twice, each add a kernel of its own:
#     hidden_states = residual + hidden_states                          # after attention,
#     residual = hidden_states
#     hidden_states = self.post_attention_layernorm(hidden_states)     # ... before the second norm
#     hidden_states = self.mlp(hidden_states)
#     hidden_states = residual + hidden_states                          # after the MLP
# The layer's forward is compiled again from its own source with the first three statements one call
# of _add_rms_norm (add_rms_norm: the add in the norm's kernel) and the last two one call of
# _add_mlp (the add in the epilogue of the MLP's down GEMM: awq_gemm_add, where the MLP is a fused
# one with a quantized down).  Both read so in Llama, Mistral, Qwen2/3 and Gemma; the first alone
# in Gemma 2/3 (pre_feedforward_layernorm; a norm between the MLP and its add) and the MoE
# families (no dense MLP at the add).  The match is statement for statement on the syntax tree and
# each helper falls back to the statements it stands for, so the new forward computes what the
# old one does; a forward with anything else there (Phi-3's dropout around the adds, Granite's
# residual multiplier) keeps its code.

_ADD_NORM = "_awqlib_add_rms_norm"
_ADD_MLP = "_awqlib_add_mlp"


def _global_hooks() -> bool:
    """Whether module hooks are registered for every module (torch.nn.modules.module's
    register_module_forward_hook & co.: module trackers, FlopCounterMode): a call the helpers below
    make without going through a module's __call__ would escape them."""
    from torch.nn.modules import module as m
    return any(getattr(m, name, None) for name in ("_global_forward_hooks", "_global_forward_pre_hooks",
                                                     "_global_backward_hooks", "_global_backward_pre_hooks"))


def _add_rms_norm(norm, hidden_states, residual):
    """``s = residual + hidden_states`` and ``norm(s)``, as (s, norm(s)): one op where ``norm`` is a
    FusedRMSNorm without hooks and the two are tensors of one shape and dtype."""
    if (isinstance(norm, FusedRMSNorm) and not _hooked(norm) and not _global_hooks()
            and isinstance(hidden_states, torch.Tensor)
            and isinstance(residual, torch.Tensor) and hidden_states.shape == residual.shape
            and hidden_states.dtype == residual.dtype):
        return norm.add_forward(hidden_states, residual)
    s = residual + hidden_states
    return s, norm(s)


def _add_mlp(mlp, hidden_states, residual):
    """``residual + mlp(hidden_states)``: the add in the down GEMM where ``mlp`` is a FusedGatedMLP
    without hooks (FusedGatedMLP.forward_add)."""
    if (isinstance(mlp, FusedGatedMLP) and not _hooked(mlp) and not _global_hooks()
            and isinstance(residual, torch.Tensor)):
        return mlp.forward_add(hidden_states, residual)
    return residual + mlp(hidden_states)


def _names(node, *ids) -> bool:
    return isinstance(node, ast.Name) and (not ids or node.id in ids)


def _assigns_one_name(*stmts: ast.stmt) -> bool:
    return all(isinstance(t, ast.Assign) and len(t.targets) == 1 and _names(t.targets[0]) for t in stmts)


def _self_call(value: ast.expr, self_name: str, arg: str) -> str | None:
    """The attribute ``a`` where ``value`` reads ``self.a(arg)``; else None."""
    if (isinstance(value, ast.Call) and not value.keywords and len(value.args) == 1 and _names(value.args[0], arg)
            and isinstance(value.func, ast.Attribute) and _names(value.func.value, self_name)):
        return value.func.attr
    return None


def _residual_sum(value: ast.expr, h: str) -> str | None:
    """``r`` where ``value`` reads ``r + h`` or ``h + r`` (r another name); else None."""
    if (isinstance(value, ast.BinOp) and isinstance(value.op, ast.Add) and _names(value.left)
            and _names(value.right) and h in (value.left.id, value.right.id) and value.left.id != value.right.id):
        return value.right.id if value.left.id == h else value.left.id
    return None


def _add_norm_match(a: ast.stmt, b: ast.stmt, c: ast.stmt, self_name: str) -> tuple[str, str, str] | None:
    """(hidden, residual, norm attribute) where a, b, c read ``h = r + h`` (or ``h + r``), ``r = h``,
    ``h = self.norm(h)``; else None."""
    if not _assigns_one_name(a, b, c):
        return None
    h = a.targets[0].id
    r = _residual_sum(a.value, h)
    norm = _self_call(c.value, self_name, h)
    if r is None or norm is None or b.targets[0].id != r or not _names(b.value, h) or c.targets[0].id != h:
        return None
    return h, r, norm


def _mlp_add_match(a: ast.stmt, b: ast.stmt, self_name: str, mlp: str) -> tuple[str, str] | None:
    """(hidden, residual) where a, b read ``h = self.<mlp>(h)``, ``h = r + h`` (or ``h + r``); else None."""
    if not _assigns_one_name(a, b):
        return None
    h = a.targets[0].id
    r = _residual_sum(b.value, h)
    if _self_call(a.value, self_name, h) != mlp or r is None or b.targets[0].id != h:
        return None
    return h, r


def _load(name: str) -> ast.Name:
    return ast.Name(name, ast.Load())


def _helper_call(helper: str, self_name: str, attr: str, h: str, r: str) -> ast.Call:
    return ast.Call(func=_load(helper), args=[ast.Attribute(_load(self_name), attr, ast.Load()), _load(h), _load(r)],
                    keywords=[])


def _fuse_residual_adds(stmts: list, self_name: str, mlp: str | None, norms: bool, sites: list) -> list:
    """``stmts`` with every add-and-norm triple (where ``norms``) one call of _add_rms_norm and every
    MLP-and-add pair (where ``mlp`` names the MLP) one call of _add_mlp, appending ("norm" | "mlp",
    attribute) to ``sites``; looking into if / for / while / with / try bodies, not into nested
    definitions."""
    out, i = [], 0
    while i < len(stmts):
        norm = _add_norm_match(*stmts[i:i + 3], self_name) if norms and i + 3 <= len(stmts) else None
        pair = _mlp_add_match(*stmts[i:i + 2], self_name, mlp) if mlp and i + 2 <= len(stmts) else None
        if norm is not None:
            h, r, attr = norm
            fused = ast.Assign(targets=[ast.Tuple([ast.Name(r, ast.Store()), ast.Name(h, ast.Store())], ast.Store())],
                               value=_helper_call(_ADD_NORM, self_name, attr, h, r))
            out.append(ast.copy_location(fused, stmts[i]))
            sites.append(("norm", attr))
            i += 3
        elif pair is not None and (not norms or i + 4 > len(stmts)
                                   or _add_norm_match(*stmts[i + 1:i + 4], self_name) is None):
            h, r = pair
            fused = ast.Assign(targets=[ast.Name(h, ast.Store())], value=_helper_call(_ADD_MLP, self_name, mlp, h, r))
            out.append(ast.copy_location(fused, stmts[i]))
            sites.append(("mlp", mlp))
            i += 2
        else:
            st = stmts[i]
            if not isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                for field in ("body", "orelse", "finalbody"):
                    v = getattr(st, field, None)
                    if isinstance(v, list) and v and isinstance(v[0], ast.stmt):
                        setattr(st, field, _fuse_residual_adds(v, self_name, mlp, norms, sites))
                for handler in getattr(st, "handlers", ()):
                    handler.body = _fuse_residual_adds(handler.body, self_name, mlp, norms, sites)
            out.append(st)
            i += 1
    return out


# every __future__ feature's compiler flag: a function recompiled from its source keeps its module's
_FUTURE_FLAGS = 0
for _feature in __future__.all_feature_names:
    _FUTURE_FLAGS |= getattr(__future__, _feature).compiler_flag


def _owner(inner: types.FunctionType) -> str | None:
    """The class a method was defined in (the last class of its qualified name), or None."""
    parts = inner.__qualname__.split(".")
    return parts[-2] if len(parts) > 1 and parts[-2].isidentifier() else None


def _mangled(attr: str, owner: str | None) -> str:
    """``attr`` as Python stores a private name (``self.__x`` in class ``C``: ``_C__x``)."""
    if owner and attr.startswith("__") and not attr.endswith("__") and owner.lstrip("_"):
        return f"_{owner.lstrip('_')}{attr}"
    return attr


def _code_of(module: types.CodeType, inner: types.FunctionType) -> types.CodeType | None:
    """The code object in a compiled module (at any depth) of the function defined where ``inner`` was:
    its name and first line."""
    todo = list(module.co_consts)
    while todo:
        k = todo.pop(0)
        if isinstance(k, types.CodeType):
            if k.co_name == inner.__name__ and k.co_firstlineno == inner.__code__.co_firstlineno:
                return k
            todo.extend(k.co_consts)
    return None


def _compiled_like(inner: types.FunctionType, transform) -> tuple[types.CodeType, list] | None:
    """``inner``'s source, passed through ``transform(function_def) -> result``, compiled as the
    original was: a method inside ``class <owner>:`` (so private names mangle alike) and not dedented
    (multi-line strings keep their text), with its module's __future__ flags, at its own lines."""
    try:
        lines, first = inspect.getsourcelines(inner)
    except (OSError, TypeError):
        return None
    owner = _owner(inner)
    if owner is not None and lines[0][:1] in " \t":
        source, shift = f"class {owner}:\n" + "".join(lines), first - 2
    else:
        source, shift = textwrap.dedent("".join(lines)), first - 1
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    body = tree.body[0].body if isinstance(tree.body[0], ast.ClassDef) else tree.body
    fdef = body[0] if len(body) == 1 else None
    if not isinstance(fdef, ast.FunctionDef) or fdef.name != inner.__name__ or not fdef.args.args:
        return None
    result = transform(fdef)
    ast.fix_missing_locations(tree)  # the new nodes take their statement's line, then all shift
    ast.increment_lineno(tree, shift)
    module = compile(tree, inner.__code__.co_filename, "exec", flags=inner.__code__.co_flags & _FUTURE_FLAGS,
                     dont_inherit=True)
    # the function's code, never its def statement: decorators, defaults and annotations are not
    # evaluated again (the new function takes the original's)
    code = _code_of(module, inner)
    return (code, result) if code is not None else None


def _same_code(a: types.CodeType, b: types.CodeType) -> bool:
    """Whether two code objects hold the same instructions, names, locals, arguments, flags, lines
    and constants, nested code alike."""
    fields = ("co_code", "co_names", "co_varnames", "co_freevars", "co_cellvars", "co_flags", "co_argcount",
              "co_posonlyargcount", "co_kwonlyargcount", "co_firstlineno", "co_name")
    if any(getattr(a, f) != getattr(b, f) for f in fields) or len(a.co_consts) != len(b.co_consts):
        return False
    return all(_same_code(x, y) if isinstance(x, types.CodeType) and isinstance(y, types.CodeType)
               else type(x) is type(y) and x == y for x, y in zip(a.co_consts, b.co_consts))


def _source_is_the_code(inner: types.FunctionType) -> bool:
    """Whether the file ``inner`` was loaded from still compiles to ``inner``'s code: the whole file
    (as its module was compiled: the same instructions), the function found by name and first line.
    A file edited since the import is not recompiled from."""
    import linecache
    filename = inner.__code__.co_filename
    linecache.checkcache(filename)
    text = "".join(linecache.getlines(filename, inner.__globals__))
    try:
        module = compile(text, filename, "exec", dont_inherit=True)
    except (SyntaxError, ValueError):
        return False
    code = _code_of(module, inner)
    return code is not None and _same_code(code, inner.__code__)


def _residual_code(forward, mlp: str | None, norms: bool = True) -> tuple[types.CodeType, list[tuple[str, str]]] | None:
    """The code of ``forward``'s innermost function (under its functools.wraps wrappers) with its
    residual adds fused -- the norms' where ``norms``, the MLP's where ``mlp`` names its attribute --
    and the sites, as ("norm" | "mlp", attribute as stored); None where it has none, or where the
    source on disk is not the code that runs (edited since it was imported), or the function has
    free variables (such as super()'s cell, which a recompiled function cannot keep)."""
    inner = _innermost(forward)
    if not isinstance(inner, types.FunctionType) or inner.__code__.co_freevars or not _source_is_the_code(inner):
        return None

    def fuse(fdef: ast.FunctionDef) -> list[tuple[str, str]]:
        sites: list[tuple[str, str]] = []
        fdef.body = _fuse_residual_adds(fdef.body, fdef.args.args[0].arg, mlp, norms, sites)
        return sites

    made = _compiled_like(inner, fuse)
    if made is None or not made[1]:
        return None
    owner = _owner(inner)
    return made[0], [(kind, _mangled(attr, owner)) for kind, attr in made[1]]


def _residual_forward(block: nn.Module, mlp: str | None, norms: bool, cache: dict):
    """The block's forward with its residual adds fused (as _residual_code; ``awqlib_residual``: the
    sites), or None; one per class and choice of sites."""
    key = (type(block), mlp, norms)
    if key not in cache:
        cache[key] = None
        made = _residual_code(type(block).forward, mlp, norms)
        helpers = {_ADD_NORM: _add_rms_norm, _ADD_MLP: _add_mlp}
        forward = _with_globals(type(block).forward, helpers, made[0]) if made else None
        if forward is not None:
            forward.awqlib_residual = tuple(made[1])
            cache[key] = forward
    return cache[key]


def _add_norm_agrees(norm: FusedRMSNorm, dtype: torch.dtype) -> bool:
    like = _where(norm, dtype)
    x, r = _probe((3, norm.weight.shape[0]), like, 8), _probe((3, norm.weight.shape[0]), like, 9)
    return _probe_agrees("add_rms_norm", lambda: norm.add_forward(x, r), lambda: (r + x, norm(r + x)),
                         lambda: blockops._reference_add_rms_norm(x, r, norm.weight, norm.eps, norm.weight_offset,
                                                                  norm.scale_in_fp32))


def _adds_in_gemm(mlp) -> bool:
    """Whether a FusedGatedMLP's forward_add runs its add in the down GEMM (WQLinear.forward_add: a
    WQLinear's own forward, no bias, no hooks)."""
    down = getattr(mlp, mlp.spec.down, None) if isinstance(mlp, FusedGatedMLP) else None
    return (isinstance(down, WQLinear) and type(down).forward is WQLinear.forward
            and type(down).forward_add is WQLinear.forward_add and down.bias is None and not _hooked(down))


def _add_mlp_agrees(mlp: FusedGatedMLP, dtype: torch.dtype) -> bool:
    """Whether the MLP with its residual add in the down GEMM gives the two ops' bits on a probe (on
    every device: the GEMM's product is the same, rounded, then the sum rounded as torch's add)."""
    s = mlp.spec
    first, down = getattr(mlp, s.gate_up or s.gate), getattr(mlp, s.down)
    like = _where(mlp, dtype)
    x, r = _probe((3, first.in_features), like, 10), _probe((3, down.out_features), like, 11)
    with torch.no_grad():
        if torch.equal(mlp.forward_add(x, r), r + mlp(x)):
            return True
    log.warning("awqlib: awq_gemm_add (the residual add in the down GEMM's epilogue) differs from the GEMM and "
                "the add on a probe input on %s; keeping the add apart (please report this, with the GPU and the "
                "torch version)", x.device)
    return False


def fuse_block_ops(model: nn.Module, spec) -> dict[str, int]:
    """Give the model's RMSNorms, dense gated MLPs, unfused experts and attention rotaries one op each
    (see the module docstring); works on quantized and unquantized models alike, and is meant to run
    before accelerate dispatches the model (a module with hooks keeps its code).  Returns what it
    replaced, by kind; calling it again replaces nothing more."""
    counts = {"rms_norm": 0, "add_rms_norm": 0, "mlp_add": 0, "gated_mlp": 0, "expert_act": 0, "rotary": 0}
    kept = dict.fromkeys(counts, 0)  # candidates whose probe disagreed (or that have hooks)
    # the dtype the model computes in (its embeddings' and norms'; quantized linears hold no parameters)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    for name, module in list(model.named_modules()):
        if not name or isinstance(module, FusedRMSNorm) or not type(module).__name__.endswith("RMSNorm"):
            continue
        fused = _rms_norm_replacement(module, spec, dtype)
        if fused is not None:
            replace_module(model, name, fused)
        _tally(counts, kept, "rms_norm", fused is not None)
    rotaries: dict[type, object] = {}
    residual_forwards: dict[tuple, object] = {}
    config = getattr(model, "config", None)
    config = getattr(config, "get_text_config", lambda: config)()
    for block in get_blocks(model, spec):
        mlp = find_submodule(block, spec.mlp.path) if spec.mlp is not None else None
        if mlp is not None and not isinstance(mlp, FusedGatedMLP) and hasattr(mlp, spec.mlp.down):
            fused = _mlp_replacement(mlp, spec.mlp, dtype)
            if fused is not None:
                replace_module(block, spec.mlp.path, fused)
            _tally(counts, kept, "gated_mlp", fused is not None)
        experts = find_submodule(block, spec.experts.path) if spec.experts else None
        if isinstance(experts, UnfusedExperts) and len(experts) and not isinstance(experts[0], FusedGatedMLP):
            first = _experts_replacement(experts, spec.experts, dtype)
            for i, expert in enumerate(experts):
                if first is not None:
                    experts[i] = first if i == 0 else FusedGatedMLP(expert, first.spec, first.act)
                _tally(counts, kept, "expert_act", first is not None)
        if not getattr(vars(block).get("forward"), "awqlib_residual", None):
            # which sites are candidates (their modules ours), then which of them pass their probes:
            # the forward is compiled with those only, so a site never runs a fusion it was not probed for
            mlp_attr = spec.mlp.path if spec.mlp is not None and spec.mlp.path.isidentifier() else None
            found = _residual_forward(block, mlp_attr, True, residual_forwards)
            sites = found.awqlib_residual if found is not None else ()
            norms = [getattr(block, a, None) for kind, a in sites if kind == "norm"]
            mlps = [getattr(block, a, None) for kind, a in sites if kind == "mlp"]
            norms_ours = bool(norms) and all(isinstance(n, FusedRMSNorm) for n in norms)
            mlps_ours = bool(mlps) and all(_adds_in_gemm(m) for m in mlps)
            if (norms_ours or mlps_ours) and not _hooked(block):
                norms_ok = norms_ours and all(_add_norm_agrees(n, dtype) for n in norms)
                mlps_ok = mlps_ours and all(_add_mlp_agrees(m, dtype) for m in mlps)
                forward = _residual_forward(block, mlp_attr if mlps_ok else None, norms_ok, residual_forwards)
                if forward is not None:
                    block.forward = types.MethodType(forward, block)
            else:
                norms_ok = mlps_ok = False
            if norms_ours:
                _tally(counts, kept, "add_rms_norm", norms_ok)
            if mlps_ours:
                _tally(counts, kept, "mlp_add", mlps_ok)
        attn = find_submodule(block, "self_attn") if spec.rotate_half else None
        if attn is not None and not getattr(vars(attn).get("forward"), "awqlib_rotary", False):
            forward = None if _hooked(attn) else _rotary_forward(attn, config, rotaries, dtype)
            if forward is not None:
                attn.forward = types.MethodType(forward, attn)
            _tally(counts, kept, "rotary", forward is not None)
    log.info("awqlib: one-op block ops: %s", ", ".join(f"{v} {k}" for k, v in counts.items()))
    if any(kept.values()):
        log.warning("awqlib: fuse_layers kept transformers' own code for %s: their computation differs from the "
                    "one-op version on a probe input, or they have hooks (fuse before dispatching with accelerate)",
                    ", ".join(f"{v} {k}" for k, v in kept.items() if v))
    return counts


def _tally(counts: dict, kept: dict, kind: str, replaced: bool) -> None:
    if replaced:
        counts[kind] += 1
    else:
        kept[kind] += 1
