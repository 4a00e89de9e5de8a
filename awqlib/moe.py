"""Per-expert linears in place of transformers 5's fused 3-D expert parameters.

transformers 5 stores experts as ``gate_up_proj`` [E, 2I, H] and ``down_proj``
[E, H, I] parameters.  AWQ quantizes linears, and the published AWQ MoE
checkpoints (and vLLM) name them per expert (``experts.3.w1``), so we unfuse
into a ModuleList with the same forward signature.
"""

from __future__ import annotations

import torch
from torch import nn

from .arch import ExpertSpec


class _Expert(nn.Module):
    def __init__(self, spec: ExpertSpec, hidden: int, inter: int, act, device=None, dtype=None):
        super().__init__()
        self._names = (spec.gate, spec.up, spec.down)
        setattr(self, spec.gate, nn.Linear(hidden, inter, bias=False, device=device, dtype=dtype))
        setattr(self, spec.up, nn.Linear(hidden, inter, bias=False, device=device, dtype=dtype))
        setattr(self, spec.down, nn.Linear(inter, hidden, bias=False, device=device, dtype=dtype))
        self.act_fn = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self._names)
        return down(self.act_fn(gate(x)) * up(x))


class UnfusedExperts(nn.ModuleList):
    """Drop-in for ``*Experts(hidden_states, top_k_index, top_k_weights)``."""

    def __init__(self, spec: ExpertSpec, num_experts: int, hidden: int, inter: int, act, device=None, dtype=None):
        super().__init__(_Expert(spec, hidden, inter, act, device, dtype) for _ in range(num_experts))

    @classmethod
    def from_fused(cls, fused: nn.Module, spec: ExpertSpec) -> "UnfusedExperts":
        gate_up, down = fused.gate_up_proj, fused.down_proj          # [E, 2I, H], [E, H, I]
        e, two_i, h = gate_up.shape
        meta = gate_up.device.type == "meta"
        m = cls(spec, e, h, two_i // 2, fused.act_fn, device=gate_up.device, dtype=gate_up.dtype)
        if not meta:
            with torch.no_grad():
                for i, ex in enumerate(m):
                    g, u = gate_up[i].chunk(2, dim=0)
                    getattr(ex, spec.gate).weight.copy_(g)
                    getattr(ex, spec.up).weight.copy_(u)
                    getattr(ex, spec.down).weight.copy_(down[i])
        return m

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        # The (token, slot) pairs grouped by expert with one stable sort, and the group sizes read with
        # one host sync: a decode step runs only the k experts it routes to, where asking every expert
        # for its tokens (E compares and E syncing nonzeros: 256 ops for Qwen3-MoE's 128 experts)
        # would cost more than the experts.  Within an expert the pairs keep their (token, slot) order,
        # and the experts add in index order, as a loop over all of them would.
        out = torch.zeros_like(hidden_states)
        k = top_k_index.shape[-1]
        flat = top_k_index.reshape(-1)
        order = torch.argsort(flat, stable=True)
        tokens, slots = order // k, order % k
        start = 0
        # an index == E is transformers' placeholder for an expert on another rank (expert parallel):
        # it sorts last and runs nowhere
        for i, n in enumerate(torch.bincount(flat, minlength=len(self))[:len(self)].tolist()):
            if n == 0:
                continue
            token, slot = tokens[start:start + n], slots[start:start + n]
            start += n
            y = self[i](hidden_states[token]) * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out


def unfuse_experts(block: nn.Module, spec: ExpertSpec) -> None:
    """Replace the block's fused experts module (if fused) by UnfusedExperts, in place."""
    parent_path, _, name = spec.path.rpartition(".")
    parent = block.get_submodule(parent_path) if parent_path else block
    fused = getattr(parent, name)
    if isinstance(fused, UnfusedExperts) or not hasattr(fused, "gate_up_proj"):
        return
    setattr(parent, name, UnfusedExperts.from_fused(fused, spec))
