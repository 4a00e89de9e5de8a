"""Model structure: where a model's decoder blocks are, which linears a block quantizes, and the
generic operations on them (run a block, move its inputs, swap a module).

Generic code over :mod:`awqlib.arch`'s specs; the algorithm (:mod:`awqlib.awq`), the driver, the
loader and layer fusion all read model structure through here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import QuantConfig
from ..modules import WQLinear
from ..quant import effective_group_size, pack_factor
from . import ArchSpec, ScaleGroup

# transformers' multimodal wrappers (Gemma 3, ...) keep the text decoder's blocks here
_FALLBACK_BLOCKS = ("model.language_model.layers",)


def find_submodule(module: nn.Module, path: str) -> nn.Module | None:
    """The submodule at the dotted ``path``, or None where there is none."""
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def find_blocks(model: nn.Module, spec: ArchSpec) -> tuple[str, nn.ModuleList]:
    """(module path, the decoder blocks) of ``model``."""
    for path in (spec.blocks, *_FALLBACK_BLOCKS):
        blocks = find_submodule(model, path)
        if blocks is not None:
            return path, blocks
    raise ValueError(f"cannot find the decoder blocks of this {spec.name} model at {spec.blocks!r}")


def get_blocks(model: nn.Module, spec: ArchSpec) -> nn.ModuleList:
    """The decoder blocks of ``model`` (see :func:`find_blocks` for their path too)."""
    return find_blocks(model, spec)[1]


def to_device(obj, device):
    """``obj`` with every tensor inside (nested tuples, lists, dicts) moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def run_block(block: nn.Module, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """A decoder block's hidden-state output (blocks return a tuple or a tensor)."""
    out = block(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def expand_groups(spec: ArchSpec, block: nn.Module) -> list[ScaleGroup]:
    """Expand ``{e}`` (per expert) placeholders against the block's actual experts."""
    n_exp = 0
    if spec.experts is not None:
        n_exp = len(block.get_submodule(spec.experts.path))
    out = []
    for g in spec.groups:
        if "{e}" in g.prev:
            out += [ScaleGroup(g.prev.format(e=e), tuple(l.format(e=e) for l in g.linears), g.inspect,
                               g.prev_rows, g.scale_only) for e in range(n_exp)]
        elif any("{e}" in l for l in g.linears):  # (a shared expert's linears, without {e}, once)
            lin = tuple(dict.fromkeys(l.format(e=e) for e in range(n_exp) for l in g.linears))
            out.append(ScaleGroup(g.prev, lin, g.inspect, g.prev_rows, g.scale_only))
        else:
            out.append(g)
    return out


@dataclass(frozen=True, eq=False)
class BlockGroup:
    """A scaling group resolved against one block: the modules themselves, so the algorithm
    never looks a name up again (the names stay in :attr:`group`, for reports)."""
    group: ScaleGroup                  # the spec's group, with ``{e}`` expanded
    prev: nn.Module                    # a norm or a linear; 1/s is folded into it
    rows: slice                        # rows of ``prev`` whose output the readers read
    readers: dict[str, nn.Linear]      # linears that read that output (name -> module), in spec order
    scale_only: tuple[nn.Module, ...]  # read it too but stay unquantized (MoE router): W * s only
    inspect: nn.Module | None          # module whose output scores a candidate; None: the readers
    norm_offset: float                 # a norm prev multiplies by (norm_offset + w): the spec's

    @property
    def name(self) -> str:
        """The group's key in reports: its prev op's path in the block."""
        return self.group.prev


def _prev_rows(prev: nn.Module, group: ScaleGroup) -> slice:
    if not isinstance(prev, nn.Linear):
        return slice(None)
    if group.prev_rows is None:
        return slice(0, prev.out_features)
    i, n = group.prev_rows
    step = prev.out_features // n
    return slice(i * step, (i + 1) * step)


def resolve_groups(spec: ArchSpec, block: nn.Module) -> list[BlockGroup]:
    """The block's scaling groups whose scale can be folded, with their modules.

    A group is left out where nothing produces its input (``prev`` empty) or where a linear prev's
    rows do not match the readers' columns (o_proj after v_proj under grouped-query attention)."""
    out = []
    for g in expand_groups(spec, block):
        if not g.prev:
            continue
        prev = block.get_submodule(g.prev)
        rows = _prev_rows(prev, g)
        readers = {n: block.get_submodule(n) for n in g.linears}
        if isinstance(prev, nn.Linear) and any(r.in_features != rows.stop - rows.start for r in readers.values()):
            continue
        out.append(BlockGroup(g, prev, rows, readers, tuple(block.get_submodule(n) for n in g.scale_only),
                              block.get_submodule(g.inspect) if g.inspect else None, spec.norm_offset))
    return out


def quantizable_linears(block: nn.Module, spec: ArchSpec, qcfg: QuantConfig,
                        prefix: str = "") -> dict[str, nn.Linear]:
    """The block's nn.Linear modules that ``qcfg`` converts and ``spec`` does not keep in fp16
    (``prefix``: the block's path + '.')."""
    kept = spec.unquantized  # built from the groups: once, not per linear
    return {n: m for n, m in block.named_modules()
            if isinstance(m, nn.Linear) and n not in kept and not qcfg.skips(f"{prefix}{n}")}


def unconverted_linears(model: nn.Module) -> tuple[list[str], list[str]]:
    """(the unquantized linear-like modules, the quantized linears) of ``model``, as module paths.

    Unquantized: every module holding its own 2-D weight (not an embedding, not a norm) that is not a
    ``WQLinear``: the output head, MoE routers (transformers 5 makes them their own class), linears
    kept in fp16 by ``modules_to_not_convert``, a vision tower.  A subtree without any quantized
    linear is named once, by its root (``model.vision_tower``), not module by module."""
    quantized = [n for n, m in model.named_modules() if isinstance(m, WQLinear)]
    holds_quantized = {".".join(q.split(".")[:k]) for q in quantized for k in range(1, q.count(".") + 2)}

    def linear_like(m: nn.Module) -> bool:  # (only asked of subtrees without a WQLinear)
        w = m._parameters.get("weight")  # (a norm's weight can be 2-D too: Cohere's per-head q/k norms)
        is_norm = "norm" in type(m).__name__.lower()
        return w is not None and w.dim() == 2 and not isinstance(m, nn.Embedding) and not is_norm

    out: list[str] = []

    def visit(path: str, mod: nn.Module) -> None:
        if path and path not in holds_quantized:
            if any(linear_like(m) for m in mod.modules()):
                out.append(path)
            return
        for name, child in mod.named_children():
            visit(f"{path}.{name}" if path else name, child)

    visit("", model)
    return out, quantized


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at the dotted path ``name`` under ``root``."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def check_quantizable(model: nn.Module, spec: ArchSpec, qcfg: QuantConfig) -> None:
    """Fail before any work if a linear cannot be stored in the AWQ format with this group size."""
    bad, in_sizes = [], set()
    blocks = get_blocks(model, spec)
    pf = pack_factor(qcfg.bits)
    if spec.experts is not None:
        dense = [i for i, blk in enumerate(blocks) if find_submodule(blk, spec.experts.path) is None]
        if dense:
            raise ValueError(
                f"decoder blocks {dense} of this {spec.name} model have no experts at {spec.experts.path!r}: models "
                f"that mix dense and mixture-of-experts blocks (e.g. mlp_only_layers, decoder_sparse_step > 1) are "
                f"not supported yet")
    for i, blk in enumerate(blocks):
        # every nn.Linear the block quantizes (attention, a shared expert, unfused experts) ...
        entries = [(n, l.in_features, l.out_features)
                   for n, l in quantizable_linears(blk, spec, qcfg, f"{spec.blocks}.{i}.").items()]
        if spec.experts is not None and hasattr(blk.get_submodule(spec.experts.path), "gate_up_proj"):
            # ... and transformers 5's fused 3-D experts, which become linears only when unfused
            fused = blk.get_submodule(spec.experts.path)
            entries += [("experts.gate/up", fused.gate_up_proj.shape[-1], fused.gate_up_proj.shape[-2] // 2),
                        ("experts.down", fused.down_proj.shape[-1], fused.down_proj.shape[-2])]
        for n, k, o in entries:
            in_sizes.add(k)
            if k % effective_group_size(qcfg.group_size, k) or o % pf:
                bad.append((f"{spec.blocks}.{i}.{n}", k, o))
    if bad:
        ok = [g for g in (32, 64, 128) if all(k % g == 0 for k in in_sizes)] + [-1]
        name, k, o = bad[0]
        raise ValueError(
            f"{len(bad)} linear(s) cannot be stored in the AWQ GEMM format with group_size={qcfg.group_size}: "
            f"e.g. {name} has in_features={k} (must be a multiple of the group size) and out_features={o} "
            f"(must be a multiple of {pf}). Group sizes that work for this model: {ok}. "
            f"Or keep those layers in fp16 with quant_config['modules_to_not_convert'] = [...] "
            f"(substrings of module names, e.g. {name.split('.')[-1]!r}).")


def empty_quantized_linears(block: nn.Module, spec: ArchSpec, qcfg: QuantConfig, prefix: str, device) -> None:
    """Swap the block's quantizable nn.Linear modules for empty WQLinear modules (to be loaded)."""
    for name, lin in quantizable_linears(block, spec, qcfg, prefix).items():
        replace_module(block, name, WQLinear(lin.in_features, lin.out_features, qcfg.bits, qcfg.group_size,
                                             lin.bias is not None, device=device))
