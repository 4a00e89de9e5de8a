"""``fuse_layers=True``: linears that read the same input become one quantized GEMM.

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
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .arch.blocks import expand_groups, get_blocks
from .modules import WQLinear
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
        self.linear.qweight = torch.cat([p.gemm_qweight() for p in parts], dim=1)
        self.linear.qzeros = torch.cat([p.qzeros for p in parts], dim=1)
        self.linear.scales = torch.cat([p.scales for p in parts], dim=1)
        if any(p.tiled for p in parts):  # keep the runtime layout the parts had
            self.linear.tile_for_kernels()
        if self.linear.bias is not None:
            self.linear.bias = torch.cat([p.bias if p.bias is not None else
                                          torch.zeros(p.out_features, dtype=torch.float16, device=p.scales.device)
                                          for p in parts])
        self._key = None
        self._outs: tuple[torch.Tensor, ...] = ()
        self._pending = 0

    def part(self, x: torch.Tensor, idx: int) -> torch.Tensor:
        key = (id(x), x._version)
        if self._pending == 0 or key != self._key:
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
        out = {"qweight": lin.gemm_qweight()[:, a // pf: b // pf], "qzeros": lin.qzeros[:, a // pf: b // pf],
               "scales": lin.scales[:, a:b]}
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
