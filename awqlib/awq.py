"""The AWQ procedure (arXiv 2306.00978), one decoder block at a time.

    for each block:
        capture   run the fp block on the calibration activations; record, per input
                  site, mean |x| and the Gram matrix X^T X, plus the inputs/outputs of
                  the modules the search inspects (a token-budgeted subset)
        search    per scaling group, grid-search s = x^a / w^(1-a), and s = 1, and keep the
                  candidate whose fake-quantized output is closest to the fp output
        apply     fold 1/s into the previous op, s into the linears
        clip      per output group, shrink the clipping range where it lowers the
                  output error (q/k excluded: their error is seen through softmax)
        quantize  method "awq": round-to-nearest into the packed int4 GEMM layout;
                  method "awq+gptq" (the default): GPTQ error feedback on the same grid,
                  with the site's Gram matrix as the Hessian (awqlib/gptq.py)

Two things make the search cheap without approximating it:

* Where the inspected module is the scaled linears themselves (v->o, up->down),
  a candidate's loss ||X (W - Q(W s)/s)^T||^2 = tr(E G E^T) with G = X^T X.  G is
  accumulated once over *all* calibration tokens; a candidate then costs
  out*in^2 instead of tokens*out*in.
* Clipping works per (row, group), so its loss only needs G's diagonal blocks:
  every calibration token is used, at a cost independent of the token count.

Weights are never modified in place during the search: candidates are evaluated
on fresh tensors and the originals are restored by reference (AutoAWQ 0.2.9's
CPU restore bug, where ``.cpu()`` aliased the weights, cannot happen here).
"""

from __future__ import annotations

import logging
import math
import numbers
import re
import time
from dataclasses import dataclass, field, fields

import torch
from torch import nn

from .arch import ArchSpec
from .arch.blocks import (BlockGroup, get_blocks, quantizable_linears, replace_module, resolve_groups, run_block,
                          to_device)
from .config import QuantConfig
from .modules import WQLinear, repack_for_kernels
from .moe import unfuse_experts
from . import gptq
from .quant import ROW_CHUNK_BYTES, clamp_groups, effective_group_size, fake_quantize, row_chunks

log = logging.getLogger("awqlib")


@dataclass
class AWQOptions:
    duo_scaling: bool = True
    n_grid: int = 20
    grid_includes_one: bool = True      # also try a = 1.0 (AutoAWQ stops at 0.95)
    apply_clip: bool = True
    clip_grid: int = 20
    clip_asym: bool = False             # after the symmetric search, shrink each end of the range alone
    max_shrink: float = 0.5
    max_search_tokens: int = 8192       # tokens whose inspected-module outputs score a candidate (whole chunks)
    chunk_size: int = 8                 # sequences per block forward (bounds activation memory)
    propagate_quantized: bool = False   # next block sees the quantized (not the fp) block's output;
                                        # off: measured worse on SmolLM2 (docs/ALGORITHM.md)
    offload_device: str | torch.device = "cpu"
    gptq: bool = False                  # GPTQ error feedback on the AWQ grid (set by method="awq+gptq")
    gptq_damp: float = 0.1              # Hessian damping, a fraction of its mean diagonal; GPTQ's 0.01
                                        # fitted the calibration tokens and lost on held-out ones
                                        # (SmolLM2, docs/ALGORITHM.md)
    gptq_block: int = 128               # columns per lazy batch update
    gptq_act_order: bool = True         # quantize columns by decreasing Hessian diagonal, each on its own
                                        # group's fixed grid: same format; SmolLM2 ppl 26.59 -> 26.32
                                        # (docs/ALGORITHM.md)
    gptq_sequential: bool = False       # GPTQ the block's linears stage by stage (the spec's scale groups in
                                        # block order), each stage's Hessian taken with the earlier stages
                                        # already quantized (GPTQ's "true sequential"): one more block
                                        # forward per stage; SmolLM2 ppl 26.32 -> 26.44, off (docs/ALGORITHM.md)
    gptq_refit_rounds: int = 0          # after GPTQ, refit each row's group scales to its codes (least squares on
                                        # the damped Hessian), GPTQ again on that grid, ...: this many refits
                                        # (gptq.refit_rounds); same format; lower layer and block error, yet
                                        # SmolLM2 ppl 26.32 -> 26.37 (1 round), off (docs/ALGORITHM.md)

    def __post_init__(self):
        # options arrive from users (quantize(**options), JSON): a wrong type or range must be an
        # error here, not a truthy string that silently switches something on, or a crash deep inside
        for f in fields(self):
            v = getattr(self, f.name)
            boolish = isinstance(v, bool) or str(getattr(v, "dtype", "")) == "bool" and getattr(v, "ndim", 1) == 0
            ok = {"bool": boolish,  # numpy scalars (from a config or a sweep) are numbers like any other
                  "int": isinstance(v, numbers.Integral) and not boolish,
                  "float": isinstance(v, numbers.Real) and not boolish and math.isfinite(v),
                  }.get(f.type, isinstance(v, (str, torch.device)))
            if not ok:
                raise TypeError(f"option {f.name}={v!r}: expected {f.type}")
            if f.type in ("bool", "int", "float"):
                setattr(self, f.name, {"bool": bool, "int": int, "float": float}[f.type](v))
        for name, (rule, holds) in _OPTION_RANGES.items():
            if not holds(getattr(self, name)):
                raise ValueError(f"option {name}={getattr(self, name)!r}: must be {rule}")
        try:
            meta = torch.device(self.offload_device).type == "meta"
        except RuntimeError as e:
            raise ValueError(f"option offload_device={self.offload_device!r}: {e}") from None
        if meta:
            raise ValueError("option offload_device='meta': activations must be kept somewhere (cpu or a GPU)")


_OPTION_RANGES = {  # name -> (rule, check)
    "n_grid": (">= 1", lambda v: v >= 1),
    "clip_grid": (">= 1", lambda v: v >= 1),
    "max_shrink": ("in [0, 1)", lambda v: 0 <= v < 1),
    "max_search_tokens": (">= 1", lambda v: v >= 1),
    "chunk_size": (">= 1", lambda v: v >= 1),
    "gptq_damp": ("> 0", lambda v: v > 0),
    "gptq_block": (">= 1", lambda v: v >= 1),
    "gptq_refit_rounds": (">= 0", lambda v: v >= 0),
}


# ----------------------------------------------------------------------------------------------
# methods: every name accepted by quantize() and the CLI, and the options each one sets

METHODS = {  # name -> what it does (the model card's wording)
    "awq+gptq": "AWQ (activation-aware scaling and clipping), then GPTQ error feedback on AWQ's grid",
    "awq": "AWQ (activation-aware scaling and clipping)",
    "rtn": "round-to-nearest (no calibration)",
}
DEFAULT_METHOD = "awq+gptq"  # measured better everywhere we could measure (docs/ALGORITHM.md)


def method_options(method: str) -> dict[str, Any]:
    """The :class:`AWQOptions` fields that ``method`` fixes (a clear error for an unknown name)."""
    if method not in METHODS:
        raise ValueError(f"method={method!r}: use one of {', '.join(repr(m) for m in METHODS)}")
    return {"gptq": method == "awq+gptq"}


def make_options(method: str, **options) -> AWQOptions:
    fixed = method_options(method)
    clash = sorted(set(fixed) & set(options))
    if clash:
        raise ValueError(f"{clash} is chosen by the method: use method='awq+gptq' or 'awq' instead")
    unknown = sorted(set(options) - set(AWQOptions.__dataclass_fields__))
    if unknown:
        raise TypeError(f"quantize() got unknown option(s) {unknown}; besides its own arguments it accepts "
                        f"the AWQOptions fields {sorted(AWQOptions.__dataclass_fields__)}")
    idle = sorted(k for k in options if k.startswith("gptq_")) if not fixed["gptq"] else []
    if idle:
        raise ValueError(f"{idle} only apply to method='awq+gptq' (method={method!r} runs no GPTQ)")
    return AWQOptions(**options, **fixed)


@dataclass
class _Site:
    """Statistics of one input site (the tensor a set of linears read): the sum of |x| and the
    second moment of x.  The second moment is kept as the raw rows X while there are no more
    tokens than features (smaller than the Gram matrix, and cheaper to score with) and as the Gram
    matrix G = X^T X from then on; either way ``quad(e)`` = sum over tokens of (e x)^2 = tr(E G E^T)."""
    absum: torch.Tensor
    rows: list[torch.Tensor] | None  # None where only mean |x| is needed
    gram: torch.Tensor | None = None
    count: int = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        xf = x.float()
        self.absum += xf.abs().sum(0)
        self.count += x.shape[0]
        if self.gram is not None:
            self.gram.addmm_(xf.t(), xf)
        elif self.rows is not None:
            self.rows.append(xf.clone() if xf is x else xf)  # our own copy: rescale() divides in place
            if self.count > x.shape[-1]:  # from here on the Gram matrix is the smaller one
                X = torch.cat(self.rows)
                self.gram, self.rows = X.t() @ X, None

    def _x(self) -> torch.Tensor:
        if len(self.rows) != 1:
            self.rows = [torch.cat(self.rows)]
        return self.rows[0]

    def rescale(self, s: torch.Tensor) -> None:
        """The site's activations became x / s."""
        self.absum /= s
        if self.gram is not None:
            self.gram /= s[:, None] * s[None, :]
        elif self.rows:
            self._x().div_(s)

    def quad(self, e: torch.Tensor) -> torch.Tensor:
        """sum over tokens and rows of e: (e x)^2, i.e. tr(e G e^T)."""
        if self.gram is not None:
            return ((e @ self.gram) * e).sum()
        return (e @ self._x().t()).pow(2).sum()

    def hessian(self) -> torch.Tensor:
        """G = X^T X over every calibration token (GPTQ's Hessian, up to a factor)."""
        if self.gram is not None:
            return self.gram
        X = self._x()
        return X.t() @ X

    def diag_blocks(self, g: int) -> torch.Tensor:
        """The Gram matrix's diagonal g x g blocks, [n / g, g, g]."""
        if self.gram is not None:
            ng = self.gram.shape[0] // g
            return self.gram.view(ng, g, ng, g).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
        X = self._x()
        xg = X.view(X.shape[0], -1, g).transpose(0, 1)  # [n / g, tokens, g]
        return xg.transpose(1, 2) @ xg


class _SiteCapture:
    """Forward pre-hooks gathering each linear's input statistics into a :class:`_Site`, one per
    input tensor: linears that read the very same tensor in a forward (q/k/v) share it."""

    def __init__(self, linears: dict[str, nn.Linear]):
        self.site_of: dict[str, _Site] = {}
        self._owns: set[str] = set()
        self._this_chunk: dict[tuple, tuple[torch.Tensor, _Site]] = {}  # holds the tensors: ids stay unique
        self._handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in linears.items()]

    def _hook(self, name: str):
        def hook(mod, args):
            x = args[0]
            key = (id(x), x._version)
            if name not in self.site_of:  # first time this linear runs (an expert may wait for tokens)
                if key in self._this_chunk:
                    self.site_of[name] = self._this_chunk[key][1]  # reads a tensor another linear already read
                else:
                    self.site_of[name] = _Site(torch.zeros(x.shape[-1], device=x.device), [])
                    self._owns.add(name)
            if name in self._owns:
                self.site_of[name].add(x)
                self._this_chunk[key] = (x, self.site_of[name])
        return hook

    def next_chunk(self) -> None:
        """Call between forwards: a tensor of one forward is never another's."""
        self._this_chunk.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._this_chunk.clear()


@dataclass
class ScaleSearch:
    """The outcome of one scaling group's search."""
    linears: list[str]                      # the quantized linears that read the group's input
    ratio: float | str | None               # the chosen exponent a, or IDENTITY (s = 1); None: not searched
    scales: torch.Tensor | None = None      # s (fp32, on the CPU): 1/s folded into prev, s into the linears
    losses: list[float] = field(default_factory=list)  # one per candidate (the ratios, then the identity)
    reason: str | None = None               # why nothing was searched


@dataclass
class BlockReport:
    scales: dict[str, ScaleSearch] = field(default_factory=dict)  # by the group's prev op
    clipped: list[str] = field(default_factory=list)
    gptq_seconds: float = 0.0  # wall time of the GPTQ step (the rest costs what AWQ costs)


def _first_tensor(out):
    return out[0] if isinstance(out, (tuple, list)) else out


# ----------------------------------------------------------------------------------------------
# input capture: the first block's hidden states and every block's kwargs

class _Stop(Exception):
    pass


@torch.no_grad()
def capture_inputs(model: nn.Module, spec: ArchSpec, tokens: torch.Tensor, chunk_size: int,
                   device: torch.device, offload: torch.device):
    """Run the model's embedding part on ``tokens`` and stop before block 0's compute.

    Every block's forward is swapped for an identity that records its kwargs (masks,
    positions, rotary embeddings differ per block in e.g. Gemma's sliding layers), so
    nothing but the embeddings and the mask/rotary setup is computed.
    Returns (list of hidden-state chunks on ``offload``, [per-block {batch: kwargs}]).
    """
    blocks = get_blocks(model, spec)
    kwargs_per_block: list[dict[int, dict]] = [dict() for _ in blocks]
    hidden: list[torch.Tensor] = []

    def make_identity(i):
        def fwd(hidden_states, *args, **kwargs):
            b = hidden_states.shape[0]
            if b not in kwargs_per_block[i]:
                kw = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "cache")}
                kw["use_cache"] = False
                kwargs_per_block[i][b] = to_device(kw, offload)
            if i == 0:
                hidden.append(hidden_states.to(offload))
            if i == len(blocks) - 1:
                raise _Stop
            return hidden_states
        return fwd

    # An instance-level forward may already be there (accelerate's device hooks wrap it): it is put
    # back afterwards, not deleted, so a dispatched model keeps its hooks.
    saved = [blk.__dict__.get("forward") for blk in blocks]
    for i, blk in enumerate(blocks):
        blk.forward = make_identity(i)
    try:
        for start in range(0, tokens.shape[0], chunk_size):
            ids = tokens[start:start + chunk_size].to(device)
            try:
                model(input_ids=ids, use_cache=False)
            except _Stop:
                pass
    finally:
        for blk, fwd in zip(blocks, saved):
            if fwd is None:
                del blk.forward
            else:
                blk.forward = fwd
    return hidden, kwargs_per_block


# ----------------------------------------------------------------------------------------------
# scale search

def _w_mean(linears: list[nn.Linear], group_size: int) -> torch.Tensor:
    """Mean over all output rows of the linears of |w| normalised by its group's max (AWQ's w_mean)."""
    total, n_rows = 0.0, 0
    for lin in linears:
        w = lin.weight.detach()
        g = effective_group_size(group_size, w.shape[1])
        for r in row_chunks(w):
            wg = w[r].float().view(-1, w.shape[1] // g, g).abs()
            total = total + (wg / (wg.amax(dim=-1, keepdim=True) + 1e-6)).view(-1, w.shape[1]).sum(0)
        n_rows += w.shape[0]
    return total / n_rows


IDENTITY = "identity"  # the scale candidate s = 1 (reported in place of a ratio)


def candidate_ratios(opts: AWQOptions) -> list[float]:
    r = [i / opts.n_grid for i in range(opts.n_grid)]
    return r + [1.0] if opts.grid_includes_one else r


def candidate_scales(ratio: float, x_mean: torch.Tensor, w_mean: torch.Tensor, duo: bool) -> torch.Tensor:
    if duo:
        s = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
    else:
        s = x_mean.pow(ratio).clamp(min=1e-4)
    s = s / (s.max() * s.min()).sqrt()
    s[~torch.isfinite(s)] = 1.0
    return s


def _scaled_fake_quant(w: torch.Tensor, s: torch.Tensor, qcfg: QuantConfig,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    """Q(W diag(s)) diag(s)^-1 (computed in fp32): the weight the block effectively computes with.
    Written into ``out`` (any float dtype; reused across candidates) or a new fp32 tensor."""
    out = torch.empty(w.shape, dtype=torch.float32, device=w.device) if out is None else out
    for r in row_chunks(w):
        out[r] = fake_quantize(w[r].float() * s, qcfg.bits, qcfg.group_size, qcfg.zero_point) / s
    return out


class _Inspected:
    """Recorded calls of one module: inputs (args, kwargs) and fp outputs."""

    def __init__(self):
        self.calls: list[tuple[tuple, dict, torch.Tensor]] = []
        self.site: _Site | None = None  # |x| of the module's input over all calibration tokens

    def rescale(self, s: torch.Tensor) -> None:
        if self.site is not None:
            self.site.rescale(s)
        new = []
        for args, kwargs, out in self.calls:
            if args:
                args = (args[0] / s.to(args[0].dtype),) + tuple(args[1:])
            else:
                kwargs = dict(kwargs, hidden_states=kwargs["hidden_states"] / s.to(kwargs["hidden_states"].dtype))
            new.append((args, kwargs, out))
        self.calls = new

    @torch.no_grad()
    def loss(self, module: nn.Module) -> float:
        total, n = 0.0, 0
        for args, kwargs, ref in self.calls:
            out = _first_tensor(module(*args, **kwargs)).float()
            total += (out - ref.float()).pow(2).sum().item()
            n += ref.numel()
        return total / max(n, 1)


@torch.no_grad()
def search_scale(group: BlockGroup, linears: list[nn.Linear], site: _Site, inspected: _Inspected | None,
                 qcfg: QuantConfig, opts: AWQOptions):
    """Return (best_ratio, best_scales, losses) for one scaling group's quantized ``linears``, scored
    on ``inspected`` calls of ``group.inspect`` (or, without one, on the linears' own outputs
    through ``site``); weights untouched on return."""
    x_mean = site.absum / max(site.count, 1)
    w_mean = _w_mean(linears, qcfg.group_size)
    originals = [l.weight.data for l in linears]
    # candidates' weights go into buffers allocated once per group (never into the originals)
    bufs = [torch.empty_like(w) for w in originals] if inspected is not None else []
    candidates = [(r, candidate_scales(r, x_mean, w_mean, opts.duo_scaling)) for r in candidate_ratios(opts)]
    if opts.duo_scaling:
        # duo's a = 0 is s ~ 1 / w_mean, not the identity (without duo, a = 0 is s = 1): weights that
        # already lie on a 4-bit grid (re-quantized or QAT releases) are best left unscaled, so the
        # identity is always a candidate and AWQ never loses to round-to-nearest on its objective.
        # Last, so that it is chosen only where its loss is strictly lower.
        candidates.append((IDENTITY, torch.ones_like(x_mean)))
    best = (math.inf, None, None)
    losses = []
    try:
        for ratio, s in candidates:
            if inspected is None:  # the linears themselves: tr(E G E^T), every calibration token
                loss = 0.0
                for w in originals:
                    for r in row_chunks(w):
                        e = w[r].float() - _scaled_fake_quant(w[r], s, qcfg)
                        loss += site.quad(e).item()
                loss /= max(site.count, 1)
            else:
                for l, w, b in zip(linears, originals, bufs):
                    l.weight.data = _scaled_fake_quant(w, s, qcfg, out=b)
                loss = inspected.loss(group.inspect)
                for l, w in zip(linears, originals):
                    l.weight.data = w
            losses.append(loss)
            if loss < best[0]:
                best = (loss, ratio, s)
    finally:
        for l, w in zip(linears, originals):
            l.weight.data = w
    if best[1] is None:
        raise FloatingPointError("every scale candidate gave a non-finite loss: the calibration activations "
                                 "contain NaN/inf (check the model dtype; fp16 overflows in some models: use bf16 "
                                 "or fp32)")
    return best[1], best[2], losses


@torch.no_grad()
def apply_scale(group: BlockGroup, s: torch.Tensor) -> None:
    """Fold 1/s into the group's prev op and s into every reader of its output (quantized or not)
    and its scale-only readers: the block computes the same function."""
    prev = group.prev
    if isinstance(prev, nn.Linear):
        rows = group.rows
        sw = s.to(prev.weight.dtype)
        prev.weight.data[rows] = prev.weight.data[rows] / sw[:, None]
        if prev.bias is not None:
            prev.bias.data[rows] = prev.bias.data[rows] / sw
    else:  # a norm: y = (offset + w) * xhat + b
        w = prev.weight.data
        prev.weight.data = ((group.norm_offset + w.float()) / s - group.norm_offset).to(w.dtype)
        if getattr(prev, "bias", None) is not None:
            prev.bias.data = (prev.bias.data.float() / s).to(prev.bias.dtype)
    for reader in (*group.readers.values(), *group.scale_only):
        w = reader.weight.data
        for r in row_chunks(w):  # in place, a chunk at a time
            w[r] = (w[r].float() * s).to(w.dtype)


# ----------------------------------------------------------------------------------------------
# clipping

@torch.no_grad()
def search_clip(w: torch.Tensor, site: _Site, qcfg: QuantConfig,
                opts: AWQOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (row, group) clipping range (lo, hi), each [out, n_groups, 1], minimising the group's
    output error.

    err(row, group) = e G_gg e^T with e = Q(clamp(w, lo, hi)) - w and G_gg the group's diagonal
    block of the Gram matrix: exact over all calibration tokens.  First AWQ's symmetric search
    (clamp to +-m, m shrinking from |w|max); with ``clip_asym`` (zero point only) the top and then
    the bottom of the range are shrunk on their own from there.  Every search starts from the
    unclipped range, so clipping is only chosen where it lowers the error.
    """
    out_f, in_f = w.shape
    g = effective_group_size(qcfg.group_size, in_f)
    ng = in_f // g
    G = site.diag_blocks(g)  # [ng, g, g]
    steps = int(opts.max_shrink * opts.clip_grid)
    los, his = [], []
    for r in row_chunks(w):  # rows are independent
        wg = w[r].float().view(-1, ng, g)
        best_err = torch.full(wg.shape[:2], math.inf, device=w.device)
        best = [None, None]

        def consider(lo, hi):
            nonlocal best_err
            cw = clamp_groups(wg, lo, hi)
            e = fake_quantize(cw.view(-1, in_f), qcfg.bits, qcfg.group_size, qcfg.zero_point).view(wg.shape) - wg
            err = torch.einsum("rng,ngh,rnh->rn", e, G, e)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            for k, v in enumerate((lo, hi)):
                best[k] = v.expand_as(best_err[..., None]) if best[k] is None else \
                    torch.where(better[..., None], v, best[k])

        absmax = wg.abs().amax(dim=-1, keepdim=True)
        for i in range(steps):
            mv = absmax * (1 - i / opts.clip_grid)
            consider(-mv, mv)
        if opts.clip_asym and qcfg.zero_point:
            span = (wg.amax(dim=-1, keepdim=True) - wg.amin(dim=-1, keepdim=True)) / opts.clip_grid
            for side in (1, 0):  # shrink the top, then the bottom, from the best range so far
                start = best[side].clone()
                for i in range(1, steps):
                    lo, hi = (best[0], start - i * span) if side else (start + i * span, best[1])
                    consider(lo, hi)
        los.append(best[0])
        his.append(best[1])
    return torch.cat(los), torch.cat(his)


def apply_clip(linear: nn.Linear, clip: tuple[torch.Tensor, torch.Tensor]) -> None:
    w = linear.weight.data
    lo, hi = clip
    out_f, in_f = w.shape
    for r in row_chunks(w):  # in place, a chunk at a time
        wg = w[r].float().view(-1, lo.shape[1], in_f // lo.shape[1])
        w[r] = clamp_groups(wg, lo[r], hi[r]).view(-1, in_f).to(w.dtype)


# ----------------------------------------------------------------------------------------------
# GPTQ error feedback

# GPTQ's column loop is sequential, so on a GPU its cost is kernel launches per column per row
# chunk: large chunks there; on the CPU the arithmetic dominates and small chunks bound memory.
GPTQ_CHUNK_BYTES = {"cuda": 1 << 30}


@torch.no_grad()
def gptq_linears(linears: dict[str, nn.Linear], site_of: dict[str, _Site],
                 clips: dict[str, tuple[torch.Tensor, torch.Tensor]], qcfg: QuantConfig,
                 opts: AWQOptions) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Replace each calibrated linear's weight by its GPTQ result (fp32, exactly on the grid) and
    return its grid {name: (scale, zero)}.  Linears that read one tensor (q/k/v, gate/up) share
    the site's Hessian factor and are processed as one stacked weight.  Linears no calibration
    token reached are left to round-to-nearest."""
    by_site: dict[int, list[str]] = {}
    for name in linears:
        site = site_of.get(name)
        if site is not None and site.count > 0:
            by_site.setdefault(id(site), []).append(name)
    out = {}
    for names in by_site.values():
        site = site_of[names[0]]
        U, perm, damp = gptq.ordered_factor(site.hessian(), opts.gptq_damp, opts.gptq_act_order)
        ws = [linears[n].weight.data for n in names]
        dev = ws[0].device
        budget = GPTQ_CHUNK_BYTES.get(dev.type, 16 * ROW_CHUNK_BYTES)
        grids = [gptq.static_qparams(w, qcfg.bits, qcfg.group_size, qcfg.zero_point, clips.get(n))
                 for n, w in zip(names, ws)]
        W = torch.cat(ws) if len(ws) > 1 else ws[0]
        scale = torch.cat([g[0] for g in grids])
        zero = torch.cat([g[1] for g in grids])
        wq = torch.empty(W.shape, dtype=torch.float32, device=dev)
        for r in row_chunks(W, chunk_bytes=budget):
            wq[r] = gptq.gptq_quantize(W[r], U, scale[r], zero[r], qcfg.bits, opts.gptq_block, perm)
        if not torch.isfinite(wq).all():
            raise FloatingPointError(f"GPTQ gave non-finite weights for {names}: nothing was written")
        if opts.gptq_refit_rounds:
            Hd = gptq.damped_hessian(site.hessian(), damp)  # the damping U was made with
            # the refit's temporaries are (in/g) x in floats per row
            for r in row_chunks(W, chunk_bytes=max(budget // scale.shape[1], 4 * W.shape[1])):
                wq[r], scale[r] = gptq.refit_rounds(W[r], wq[r], scale[r], zero[r], Hd, U, opts.gptq_refit_rounds,
                                                    qcfg.bits, opts.gptq_block, perm)
            del Hd
        del W, U
        r0 = 0
        for n, w in zip(names, ws):
            rows = slice(r0, r0 + w.shape[0])
            linears[n].weight.data = wq[rows]  # fp32: the codes are recomputed exactly
            out[n] = (scale[rows], zero[rows])
            r0 += w.shape[0]
    return out


def gptq_stages(spec: ArchSpec, linears: dict[str, nn.Linear], run_order: list[str]) -> list[list[str]]:
    """The block's quantized linears (by path in the block) in the order true-sequential GPTQ
    takes them: one stage per scale group of the spec (all experts' gate/up together, all their
    downs together), a linear in no group a stage of its own; stages in the order their first
    linear ran (``run_order``: names in first-call order; linears no token reached come last)."""
    patterns = [[re.compile(re.escape(p).replace(re.escape("{e}"), r"\d+") + "$") for p in g.linears] for g in spec.groups]
    stages: dict[object, list[str]] = {}
    for name in linears:
        key = next((i for i, ps in enumerate(patterns) if any(p.match(name) for p in ps)), name)
        stages.setdefault(key, []).append(name)
    pos = {n: i for i, n in enumerate(run_order)}
    return sorted(stages.values(), key=lambda names: min(pos.get(n, len(pos)) for n in names))


@torch.no_grad()
def recapture_sites(block: nn.Module, linears: dict[str, nn.Linear], inps: list[torch.Tensor],
                    kwargs_by_batch: dict[int, dict], device: torch.device) -> dict[str, _Site]:
    """The input statistics of ``linears`` as the block computes them now (with its earlier
    linears already quantized): one forward over the calibration chunks."""
    sites = _SiteCapture(linears)
    try:
        for x in inps:
            run_block(block, x.to(device), to_device(kwargs_by_batch[x.shape[0]], device))
            sites.next_chunk()
    finally:
        sites.remove()
    return sites.site_of


# ----------------------------------------------------------------------------------------------
# one block

@torch.no_grad()
def capture_block(block: nn.Module, groups: list[BlockGroup], linears: dict[str, nn.Linear],
                  inps: list[torch.Tensor], kwargs_by_batch: dict[int, dict], device: torch.device,
                  opts: AWQOptions, prefix: str = ""):
    """Run the fp block over all calibration chunks.

    Returns (``site_of``: linear name -> statistics of its input, shared by linears that read the
    very same tensor, e.g. q/k/v; ``inspected``: recorded calls of the inspected modules for the
    first ``max_search_tokens`` tokens, and the |x| sums of their inputs over all tokens; the fp
    block outputs, kept only when ``propagate_quantized`` is off)."""
    offload = torch.device(opts.offload_device)
    inspect_modules = {g.group.inspect: g.inspect for g in groups if g.inspect is not None}
    inspected: dict[str, _Inspected] = {path: _Inspected() for path in inspect_modules}
    recording = {"on": False}

    def insp_input(path):
        def hook(mod, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            insp = inspected[path]
            if insp.site is None:
                insp.site = _Site(torch.zeros(x.shape[-1], device=x.device), None)
            insp.site.add(x)
        return hook

    def insp_pre(path):
        def hook(mod, args, kwargs):
            if recording["on"]:
                inspected[path].calls.append([tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args),
                                              dict(kwargs), None])
        return hook

    def insp_post(path):
        def hook(mod, args, kwargs, out):
            if recording["on"]:
                inspected[path].calls[-1][2] = _first_tensor(out).detach()
        return hook

    sites = _SiteCapture(linears)
    handles = []
    for path, m in inspect_modules.items():
        handles.append(m.register_forward_pre_hook(insp_input(path), with_kwargs=True))
        handles.append(m.register_forward_pre_hook(insp_pre(path), with_kwargs=True))
        handles.append(m.register_forward_hook(insp_post(path), with_kwargs=True))

    # 1. capture (fp block), keeping the fp outputs
    fp_outs, seen = [], 0
    try:
        for x in inps:
            recording["on"] = seen < opts.max_search_tokens
            kw = to_device(kwargs_by_batch[x.shape[0]], device)
            y = run_block(block, x.to(device), kw)
            if not torch.isfinite(y).all():
                raise FloatingPointError(
                    f"block {prefix or ''} produced NaN/inf activations on the calibration data; the model is "
                    "unstable in this dtype (try torch_dtype=torch.bfloat16 or float32)")
            seen += x.shape[0] * x.shape[1]
            sites.next_chunk()
            if not opts.propagate_quantized:  # otherwise the next inputs come from the quantized block
                fp_outs.append(y.to(offload))
    finally:
        sites.remove()
        for h in handles:
            h.remove()
    for path, rec in inspected.items():
        rec.calls = [tuple(c) for c in rec.calls]

    return sites.site_of, inspected, fp_outs


@torch.no_grad()
def quantize_block(block: nn.Module, spec: ArchSpec, qcfg: QuantConfig, opts: AWQOptions,
                   inps: list[torch.Tensor], kwargs_by_batch: dict[int, dict], device: torch.device,
                   prefix: str = "") -> tuple[list[torch.Tensor], BlockReport]:
    """AWQ-quantize one decoder block in place; return the next block's inputs and a report."""
    offload = torch.device(opts.offload_device)
    if spec.experts is not None:
        unfuse_experts(block, spec.experts)
    block.to(device)
    linears = quantizable_linears(block, spec, qcfg, prefix)
    groups = resolve_groups(spec, block)
    site_of, inspected, fp_outs = capture_block(block, groups, linears, inps, kwargs_by_batch, device, opts, prefix)

    report = BlockReport()
    # 2-3. search and apply scales, group by group
    for g in groups:
        members = [n for n in g.readers if n in linears]  # readers left unconverted are only scaled
        if not members:
            continue
        insp = inspected.get(g.group.inspect) if g.inspect is not None else None
        member_sites = list({id(site_of[l]): site_of[l] for l in members if l in site_of}.values())
        # the group's input: one shared tensor (q/k/v), or, where the linears see different token
        # subsets of it (MoE experts), the inspected module's input over all tokens
        shared = len(member_sites) == 1 and all(l in site_of for l in members)
        site = member_sites[0] if shared else (insp.site if insp is not None else None)
        if site is None or site.count == 0:  # e.g. an expert that no calibration token reached
            report.scales[g.name] = ScaleSearch(members, None, reason="no calibration tokens")
            continue
        ratio, s, losses = search_scale(g, [linears[l] for l in members], site, insp, qcfg, opts)
        if ratio != IDENTITY:  # (folding s = 1 is not exact for (1 + w) norms: skip it)
            apply_scale(g, s)
            for st in member_sites:  # every reader's statistics now see x / s
                st.rescale(s)
            if insp is not None:
                insp.rescale(s)  # (its site too, if it is not one of the above)
        report.scales[g.name] = ScaleSearch(members, ratio, s.cpu(), losses)

    # 4. clip (with GPTQ the clipping range only sets the grid: the weights stay unclipped, so the
    # clipping error is fed back like any rounding error)
    clips: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    if opts.apply_clip:
        for name, lin in linears.items():
            if any(name.split(".")[-1] == c for c in spec.no_clip):
                continue
            site = site_of.get(name)
            if site is None or site.count == 0:
                continue
            clips[name] = search_clip(lin.weight.data, site, qcfg, opts)
            if not opts.gptq:
                apply_clip(lin, clips.pop(name))
            report.clipped.append(name)
    del inspected

    # 5. quantize: round to nearest, or GPTQ on the same grid (stage by stage with gptq_sequential:
    # each stage's Hessian taken again with the earlier stages' weights already on the grid)
    t0 = time.perf_counter()
    qparams = {}
    if opts.gptq:
        stages = gptq_stages(spec, linears, list(site_of)) if opts.gptq_sequential else [list(linears)]
        dtypes = {n: lin.weight.dtype for n, lin in linears.items()}
        on_grid: dict[str, torch.Tensor] = {}  # GPTQ's fp32 results, while the block runs in its own dtype
        for i, names in enumerate(stages):
            stage = {n: linears[n] for n in names}
            stage_sites = site_of
            if i > 0:  # an expert no token reaches any more keeps the statistics of the first capture
                stage_sites = {**site_of, **recapture_sites(block, stage, inps, kwargs_by_batch, device)}
            qparams |= gptq_linears(stage, stage_sites, clips, qcfg, opts)
            if i + 1 < len(stages):
                for n, lin in stage.items():
                    if lin.weight.dtype != dtypes[n]:
                        on_grid[n] = lin.weight.data
                        lin.weight.data = on_grid[n].to(dtypes[n])
        for n, w in on_grid.items():
            linears[n].weight.data = w  # fp32: WQLinear recomputes the codes exactly
    report.gptq_seconds = time.perf_counter() - t0 if opts.gptq else 0.0
    del site_of, clips
    for name, lin in linears.items():
        replace_module(block, name, WQLinear.from_linear(lin, qcfg.bits, qcfg.group_size, qcfg.zero_point,
                                                         qparams=qparams.get(name)))

    round_to_storage(block)
    # The next block's inputs, computed as the served model computes them: in the kernels' runtime
    # layout, as a resumed block is once moved onto the GPU (WQLinear._apply), so that a resumed run
    # calibrates the next blocks on the same bits as an uninterrupted one.
    repack_for_kernels(block)
    if opts.propagate_quantized:
        nxt = [run_block(block, x.to(device), to_device(kwargs_by_batch[x.shape[0]], device)).to(offload) for x in inps]
    else:
        nxt = fp_outs
    return nxt, report


@torch.no_grad()
def round_to_storage(module: nn.Module) -> None:
    """Round float parameters through fp16, the checkpoint's dtype, so that what the model computes
    after quantization is exactly what save -> load computes."""
    for p in module.parameters():
        if p.is_floating_point() and p.dtype != torch.float16:
            for r in (row_chunks(p.data) if p.dim() == 2 else [slice(None)]):  # in place, bounded temporaries
                p.data[r] = p.data[r].to(torch.float16).to(p.dtype)


@torch.no_grad()
def rtn_quantize_block(block: nn.Module, spec: ArchSpec, qcfg: QuantConfig, prefix: str = "") -> None:
    """Plain round-to-nearest (the baseline AWQ must beat)."""
    if spec.experts is not None:
        unfuse_experts(block, spec.experts)
    for name, lin in quantizable_linears(block, spec, qcfg, prefix).items():
        replace_module(block, name, WQLinear.from_linear(lin, qcfg.bits, qcfg.group_size, qcfg.zero_point))
    round_to_storage(block)
