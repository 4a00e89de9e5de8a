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
add before a layer's second norm joins that norm (the layer's forward recompiled from its own
source, see :func:`_add_norm_code`).  Every
replacement is first run on a probe input against the code it replaces, in the model's dtype and
on its device (bit for bit off CUDA, within two ulps on a CUDA kernel), so a transformers release
that changes a formula keeps its own code (with a warning); the state dict keeps its names.
"""

from __future__ import annotations

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.spec
        if s.gate_up:
            gate, up = getattr(self, s.gate_up)(x).chunk(2, dim=-1)
        else:
            gate, up = getattr(self, s.gate)(x), getattr(self, s.up)(x)
        return getattr(self, s.down)(blockops.gated_act(gate, up, self.act))

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


_ROTARY = "apply_rotary_pos_emb"


def _rotary_forward(attn: nn.Module, config, cache: dict, dtype: torch.dtype):
    """The attention's own forward with our rotary, or None (its class does not call a rotary we match)."""
    cls = type(attn)
    if cls not in cache:
        cache[cls] = None
        inner = cls.forward
        while isinstance(getattr(inner, "__wrapped__", None), types.FunctionType):
            inner = inner.__wrapped__
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


# -- the residual add before a block's second norm ------------------------------------------------------
#
# transformers' pre-norm decoder layers end their attention half with three statements,
#     hidden_states = residual + hidden_states
#     residual = hidden_states
#     hidden_states = self.post_attention_layernorm(hidden_states)
# (Llama, Mistral, Qwen2/3, Mixtral; Gemma 2/3 with pre_feedforward_layernorm): an add kernel, then
# the norm's.  The layer's forward, with those statements made one call of _add_rms_norm (which runs
# add_rms_norm, one kernel, where the norm is a FusedRMSNorm), is compiled from its own source: the
# match is statement for statement on the syntax tree, so the new forward computes what the old one
# does, and a forward with anything else there (Phi-3's dropout around the add) keeps its code.  The
# add that ends the layer feeds the next layer's first norm, across the model's loop: it stays.

_ADD_NORM = "_awqlib_add_rms_norm"


def _add_rms_norm(norm, hidden_states, residual):
    """``s = residual + hidden_states`` and ``norm(s)``, as (s, norm(s)): one op where ``norm`` is a
    FusedRMSNorm without hooks and the two are tensors of one shape and dtype."""
    if (isinstance(norm, FusedRMSNorm) and not _hooked(norm) and isinstance(hidden_states, torch.Tensor)
            and isinstance(residual, torch.Tensor) and hidden_states.shape == residual.shape
            and hidden_states.dtype == residual.dtype):
        return norm.add_forward(hidden_states, residual)
    s = residual + hidden_states
    return s, norm(s)


def _names(node, *ids) -> bool:
    return isinstance(node, ast.Name) and (not ids or node.id in ids)


def _add_norm_match(a: ast.stmt, b: ast.stmt, c: ast.stmt, self_name: str) -> tuple[str, str, str] | None:
    """(hidden, residual, norm attribute) where a, b, c read ``h = r + h`` (or ``h + r``), ``r = h``,
    ``h = self.norm(h)``; else None."""
    if not all(isinstance(t, ast.Assign) and len(t.targets) == 1 and _names(t.targets[0]) for t in (a, b, c)):
        return None
    h, r = a.targets[0].id, b.targets[0].id
    add = a.value
    if not (isinstance(add, ast.BinOp) and isinstance(add.op, ast.Add) and _names(add.left) and _names(add.right)
            and {add.left.id, add.right.id} == {h, r} and h != r):
        return None
    call = c.value
    if not (_names(b.value, h) and c.targets[0].id == h and isinstance(call, ast.Call) and not call.keywords
            and len(call.args) == 1 and _names(call.args[0], h) and isinstance(call.func, ast.Attribute)
            and _names(call.func.value, self_name)):
        return None
    return h, r, call.func.attr


def _fuse_add_norms(stmts: list, self_name: str, norms: list) -> list:
    """``stmts`` with every add-and-norm triple one call of _add_rms_norm (appending its norm to
    ``norms``), looking into if / for / while / with / try bodies, not into nested definitions."""
    out, i = [], 0
    while i < len(stmts):
        m = _add_norm_match(*stmts[i:i + 3], self_name) if i + 3 <= len(stmts) else None
        if m is None:
            st = stmts[i]
            if not isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                for field in ("body", "orelse", "finalbody"):
                    v = getattr(st, field, None)
                    if isinstance(v, list) and v and isinstance(v[0], ast.stmt):
                        setattr(st, field, _fuse_add_norms(v, self_name, norms))
                for handler in getattr(st, "handlers", ()):
                    handler.body = _fuse_add_norms(handler.body, self_name, norms)
            out.append(st)
            i += 1
            continue
        h, r, attr = m
        call = ast.Call(func=ast.Name(_ADD_NORM, ast.Load()),
                        args=[ast.Attribute(ast.Name(self_name, ast.Load()), attr, ast.Load()),
                              ast.Name(h, ast.Load()), ast.Name(r, ast.Load())], keywords=[])
        fused = ast.Assign(targets=[ast.Tuple([ast.Name(r, ast.Store()), ast.Name(h, ast.Store())], ast.Store())],
                           value=call)
        out.append(ast.copy_location(fused, stmts[i]))
        norms.append(attr)
        i += 3
    return out


def _add_norm_code(forward) -> tuple[types.CodeType, list[str]] | None:
    """The code of ``forward``'s innermost function (under its functools.wraps wrappers) with its
    add-and-norm triples fused, and the norms they name; None where it has none (or no source, or
    free variables such as super()'s cell, which a recompiled function cannot keep)."""
    inner = forward
    while isinstance(getattr(inner, "__wrapped__", None), types.FunctionType):
        inner = inner.__wrapped__
    if not isinstance(inner, types.FunctionType) or inner.__code__.co_freevars:
        return None
    try:
        lines, first = inspect.getsourcelines(inner)
        tree = ast.parse(textwrap.dedent("".join(lines)))
    except (OSError, TypeError, SyntaxError):
        return None
    fdef = tree.body[0] if len(tree.body) == 1 else None
    if not isinstance(fdef, ast.FunctionDef) or fdef.name != inner.__name__ or not fdef.args.args:
        return None
    norms: list[str] = []
    fdef.body = _fuse_add_norms(fdef.body, fdef.args.args[0].arg, norms)
    if not norms:
        return None
    ast.increment_lineno(tree, first - 1)  # tracebacks point into the modeling file, as before
    ast.fix_missing_locations(tree)
    module = compile(tree, inner.__code__.co_filename, "exec", dont_inherit=True)
    # the function's code, never its def statement: decorators, defaults and annotations are not
    # evaluated again (the new function takes the original's)
    code = next(k for k in module.co_consts if isinstance(k, types.CodeType) and k.co_name == fdef.name)
    return code, norms


def _add_norm_forward(block: nn.Module, cache: dict):
    """The block's forward with its add-and-norm triples fused (``awqlib_add_norm``: the norms they
    name), or None; one per class."""
    cls = type(block)
    if cls not in cache:
        cache[cls] = None
        made = _add_norm_code(cls.forward)
        forward = _with_globals(cls.forward, {_ADD_NORM: _add_rms_norm}, made[0]) if made else None
        if forward is not None:
            forward.awqlib_add_norm = tuple(made[1])
            cache[cls] = forward
    return cache[cls]


def _add_norm_agrees(norm: FusedRMSNorm, dtype: torch.dtype) -> bool:
    like = _where(norm, dtype)
    x, r = _probe((3, norm.weight.shape[0]), like, 8), _probe((3, norm.weight.shape[0]), like, 9)
    return _probe_agrees("add_rms_norm", lambda: norm.add_forward(x, r), lambda: (r + x, norm(r + x)),
                         lambda: blockops._reference_add_rms_norm(x, r, norm.weight, norm.eps, norm.weight_offset,
                                                                  norm.scale_in_fp32))


def fuse_block_ops(model: nn.Module, spec) -> dict[str, int]:
    """Give the model's RMSNorms, dense gated MLPs, unfused experts and attention rotaries one op each
    (see the module docstring); works on quantized and unquantized models alike, and is meant to run
    before accelerate dispatches the model (a module with hooks keeps its code).  Returns what it
    replaced, by kind; calling it again replaces nothing more."""
    counts = {"rms_norm": 0, "add_rms_norm": 0, "gated_mlp": 0, "expert_act": 0, "rotary": 0}
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
    add_norms: dict[type, object] = {}
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
        if not getattr(vars(block).get("forward"), "awqlib_add_norm", None):
            forward = _add_norm_forward(block, add_norms)
            norms = [getattr(block, n, None) for n in (forward.awqlib_add_norm if forward else ())]
            if norms and all(isinstance(n, FusedRMSNorm) for n in norms):  # a candidate: its norms are ours
                fused = not _hooked(block) and all(_add_norm_agrees(n, dtype) for n in norms)
                if fused:
                    block.forward = types.MethodType(forward, block)
                _tally(counts, kept, "add_rms_norm", fused)
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
