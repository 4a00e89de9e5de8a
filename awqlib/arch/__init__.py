"""Architecture knowledge as data: one small spec per family, one registry.

A spec says where the decoder blocks are and, inside a block, which linears
share an input (and so share one AWQ scale), which op produces that input
(the scale is folded into it), and which module's output the scale search
compares.  Everything else is generic code in :mod:`awqlib.awq`.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ScaleGroup:
    prev: str                       # op whose output feeds `linears` (a norm or a linear), relative to the block
    linears: tuple[str, ...]        # linears that read it: they get W * s and are quantized
    inspect: str | None = None      # module whose output scores a candidate; None = the linears themselves
    prev_rows: tuple[int, int] | None = None  # (chunk, n_chunks): only this slice of a fused prev's rows feeds us
    scale_only: tuple[str, ...] = ()  # read the same input but stay unquantized (MoE router): W * s only


@dataclass(frozen=True)
class ExpertSpec:
    """Mixture-of-experts: transformers 5 fuses experts into 3-D parameters; we unfuse them
    into per-expert linears named as in the published checkpoints."""
    path: str                       # the fused experts module, relative to the block
    gate: str
    up: str
    down: str


@dataclass(frozen=True)
class GatedMLP:
    """A dense MLP computing ``down(act(gate(x)) * up(x))``, relative to the block; ``gate_up``: gate and
    up as one linear whose output halves are [gate, up] (Phi-3).  ``fuse_layers`` runs act * up as one op."""
    path: str = "mlp"
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    act: str = "act_fn"             # the attribute holding the activation module
    gate_up: str | None = None


@dataclass(frozen=True)
class ArchSpec:
    name: str
    groups: tuple[ScaleGroup, ...]
    blocks: str = "model.layers"
    norm_offset: float = 0.0        # gemma: the norm multiplies by (offset + w)
    norm_scale_in_fp32: bool = False  # gemma: the RMSNorm scales in fp32 and rounds once; llama: rounds, then scales
    mlp: GatedMLP | None = GatedMLP()  # the block's dense gated MLP; None: none (MoE, OPT's fc1/fc2)
    rotate_half: bool = True        # the attention's rotary is transformers' rotate_half one (fuse_layers' op)
    no_clip: tuple[str, ...] = ("q_proj", "k_proj", "qkv_proj")  # error seen through softmax: skip clipping
    experts: ExpertSpec | None = None
    # module-path prefix -> checkpoint-name prefix, for names transformers 5 renames at load
    checkpoint_renames: tuple[tuple[str, str], ...] = field(default=())

    @property
    def unquantized(self) -> frozenset[str]:
        """Linears (paths in a block) kept in fp16 whatever the config says: the groups' scale-only
        readers, which the serving engines build without a quantization config."""
        return frozenset(n for g in self.groups for n in g.scale_only)


_ATTN = ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn")
_VO = ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",))  # skipped automatically under GQA (shapes differ)
_MLP_IN = ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp")
_MLP_OUT = ScaleGroup("mlp.up_proj", ("mlp.down_proj",))

LLAMA = ArchSpec("llama", (_ATTN, _VO, _MLP_IN, _MLP_OUT))

# Gemma 1: llama's block with (1 + w) norms (the gelu between gate and down changes nothing: down
# reads act(gate) * up, linear in up)
GEMMA1 = ArchSpec("gemma1", LLAMA.groups, norm_offset=1.0, norm_scale_in_fp32=True)

GEMMA = ArchSpec("gemma", (
    _ATTN, _VO,
    ScaleGroup("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
    _MLP_OUT,
), norm_offset=1.0, norm_scale_in_fp32=True)

PHI3 = ArchSpec("phi3", (
    ScaleGroup("input_layernorm", ("self_attn.qkv_proj",), "self_attn"),
    ScaleGroup("post_attention_layernorm", ("mlp.gate_up_proj",), "mlp"),
    ScaleGroup("mlp.gate_up_proj", ("mlp.down_proj",), prev_rows=(1, 2)),  # down reads act(gate) * up
), mlp=GatedMLP(gate_up="gate_up_proj", act="activation_fn"))

OPT = ArchSpec("opt", (
    ScaleGroup("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
    ScaleGroup("self_attn.v_proj", ("self_attn.out_proj",)),
    ScaleGroup("final_layer_norm", ("fc1",)),
    ScaleGroup("fc1", ("fc2",)),  # ReLU is positively homogeneous: relu(x / s) = relu(x) / s
), blocks="model.decoder.layers", mlp=None)

# StarCoder2: LayerNorms with a bias (folding divides it too, as for OPT); the MLP is c_fc -> gelu ->
# c_proj, and gelu is not homogeneous (gelu(x / s) != gelu(x) / s), so c_proj gets no scale of its own
STARCODER2 = ArchSpec("starcoder2", (
    _ATTN, _VO,
    ScaleGroup("post_attention_layernorm", ("mlp.c_fc",), "mlp"),
), mlp=None)

# Cohere (Command R): parallel attention, one LayerNorm (no bias) feeds q/k/v and the MLP's gate/up
# (block output = x + attn(norm(x)) + mlp(norm(x))), so all five share one scale. No submodule
# computes both branches, so the search scores the five linears' own outputs (no inspect).
COHERE = ArchSpec("cohere", (
    ScaleGroup("input_layernorm", (*_ATTN.linears, *_MLP_IN.linears)),
    _VO, _MLP_OUT,
), rotate_half=False)  # its rotary rotates interleaved pairs


def _moe(name: str, e: ExpertSpec, renames=()) -> ArchSpec:
    x = f"{e.path}.{{e}}."
    return ArchSpec(name, (
        _ATTN, _VO,
        ScaleGroup("post_attention_layernorm", (x + e.gate, x + e.up), "mlp", scale_only=("mlp.gate",)),
        ScaleGroup(x + e.up, (x + e.down,)),
    ), experts=e, checkpoint_renames=renames, mlp=None)


MIXTRAL = _moe("mixtral", ExpertSpec("mlp.experts", "w1", "w3", "w2"), renames=((".mlp.", ".block_sparse_moe."),))
QWEN3_MOE = _moe("qwen3_moe", ExpertSpec("mlp.experts", "gate_proj", "up_proj", "down_proj"))

# Qwen1.5-MoE / Qwen2-MoE: qwen3_moe's experts plus a shared expert (a llama MLP every token goes
# through) scaled by sigmoid(shared_expert_gate(x)). The shared expert and both gates read the
# experts' input, so they share its scale; the two gates ([E, hidden] and [1, hidden]) stay in fp16,
# as vLLM builds them (ReplicatedLinear / nn.Linear without a quant config).
QWEN2_MOE = ArchSpec("qwen2_moe", (
    _ATTN, _VO,
    ScaleGroup("post_attention_layernorm", ("mlp.experts.{e}.gate_proj", "mlp.experts.{e}.up_proj",
                                            "mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"), "mlp",
               scale_only=("mlp.gate", "mlp.shared_expert_gate")),
    ScaleGroup("mlp.experts.{e}.up_proj", ("mlp.experts.{e}.down_proj",)),
    ScaleGroup("mlp.shared_expert.up_proj", ("mlp.shared_expert.down_proj",)),
), experts=QWEN3_MOE.experts, mlp=GatedMLP(path="mlp.shared_expert"))

REGISTRY: dict[str, ArchSpec] = {
    "llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA, "qwen3": LLAMA,
    "granite": LLAMA,  # its multipliers (embeddings, attention, residual branches, logits) lie outside every fold
    "gemma": GEMMA1, "gemma2": GEMMA, "gemma3_text": GEMMA, "gemma3": GEMMA,
    "phi3": PHI3,
    "mixtral": MIXTRAL, "qwen2_moe": QWEN2_MOE, "qwen3_moe": QWEN3_MOE,
    "opt": OPT, "starcoder2": STARCODER2, "cohere": COHERE, "cohere2": COHERE,
}


def get_spec(model_type: str) -> ArchSpec:
    try:
        return REGISTRY[model_type]
    except KeyError:
        raise ValueError(f"model_type {model_type!r} is not supported by awqlib; supported: "
                         f"{', '.join(sorted(REGISTRY))}. Adding one is a spec in awqlib/arch/__init__.py.") from None
