"""What a quantized checkpoint keeps of its source: config.json key for key (transformers 4.x readers
take rope_theta from it), the tokenizer files byte for byte, on the in-memory and the lazy path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from awqlib import AutoAWQ
from conftest import LLAMA3_SCALING, make_source, tiny_config, tiny_tokenizer

ROPES = {"theta5e5": {"rope_theta": 500000.0, "rope_scaling": None},
         "llama3_scaling": {"rope_theta": 500000.0, "rope_scaling": LLAMA3_SCALING}}


@pytest.fixture(scope="module", params=sorted(ROPES))
def source(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("src") / "llama-src"
    folder.mkdir()
    return folder, make_source(folder, ROPES[request.param])


def _assert_source_kept(out: Path, src_cfg: dict, src: Path) -> None:
    cfg = json.loads((out / "config.json").read_text())
    changed = {k for k in src_cfg if cfg.get(k, "<absent>") != src_cfg[k]}
    assert changed == {"torch_dtype"}, {k: (src_cfg[k], cfg.get(k)) for k in changed}
    assert cfg["torch_dtype"] == cfg["dtype"] == "float16"
    assert cfg["quantization_config"]["quant_method"] == "awq"
    assert set(cfg) - set(src_cfg) == {"quantization_config", "dtype"}
    # the tokenizer files are the source's, byte for byte (no TokenizersBackend, no is_local)
    assert (out / "tokenizer_config.json").read_bytes() == (src / "tokenizer_config.json").read_bytes()
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (out / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()


def test_config_and_tokenizer_survive_save_quantized(source, tmp_path):
    src, src_cfg = source
    m = AutoAWQ.from_pretrained(str(src), tokenizer=tiny_tokenizer())
    assert m.model.config.rope_parameters["rope_theta"] == 500000.0
    m.quantize(None, {"q_group_size": 64}, method="rtn")
    out = m.save_quantized(tmp_path / "q")
    _assert_source_kept(out, src_cfg, src)
    # and again after a load: from_quantized -> save_quantized keeps them too
    out2 = AutoAWQ.from_quantized(str(out)).save_quantized(tmp_path / "q2")
    _assert_source_kept(out2, src_cfg, src)


def test_config_and_tokenizer_survive_lazy_and_resumed_runs(source, tmp_path):
    src, src_cfg = source
    out = tmp_path / "lazy"
    AutoAWQ.from_pretrained(str(src), lazy=True).quantize(None, {"q_group_size": 64}, method="rtn", save_dir=out)
    _assert_source_kept(out, src_cfg, src)


def test_config_from_memory_carries_legacy_rope_keys(tmp_path):
    """Without a source folder (from_model), transformers 5's rope_parameters are also written as
    4.x's rope_theta / rope_scaling."""
    import transformers as T
    cfg = T.LlamaConfig(**{**tiny_config("llama").to_dict(), "rope_theta": 500000.0,
                                                         "rope_scaling": dict(LLAMA3_SCALING)})  # transformers edits it
    model = T.AutoModelForCausalLM.from_config(cfg)
    m = AutoAWQ.from_model(model, tokenizer=tiny_tokenizer()).quantize(None, {"q_group_size": 64}, method="rtn")
    out = m.save_quantized(tmp_path / "q")
    saved = json.loads((out / "config.json").read_text())
    assert saved["rope_theta"] == 500000.0 and saved["rope_scaling"] == LLAMA3_SCALING
    assert saved["torch_dtype"] == saved["dtype"] == "float16"
    # nothing to copy: the tokenizer object is saved
    assert (out / "tokenizer.json").exists()


def test_legacy_rope_keys():
    from awqlib.checkpoint import legacy_rope_keys
    assert legacy_rope_keys({"rope_type": "default", "rope_theta": 1e6}) == {"rope_theta": 1e6, "rope_scaling": None}
    assert legacy_rope_keys({**LLAMA3_SCALING, "rope_theta": 5e5}) == {"rope_theta": 5e5, "rope_scaling": LLAMA3_SCALING}
    gemma3 = {"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
              "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}}
    assert legacy_rope_keys(gemma3) == {"rope_theta": 1e6, "rope_scaling": {"rope_type": "linear", "factor": 8.0},
                                        "rope_local_base_freq": 1e4}
    assert legacy_rope_keys({"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}) == {
        "rope_theta": 1e4, "rope_scaling": None, "partial_rotary_factor": 0.5}
    assert legacy_rope_keys(None) == {}


def test_tokenizer_files(tmp_path):
    from awqlib.checkpoint import tokenizer_files
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "merges.txt", "vocab.json",
                 "chat_template.jinja", "qwen.tiktoken", "config.json", "model.safetensors"):
        (tmp_path / name).write_text("x")
    assert [p.as_posix() for p in tokenizer_files(tmp_path)] == [
        "chat_template.jinja", "merges.txt", "qwen.tiktoken", "special_tokens_map.json", "tokenizer.json",
        "tokenizer_config.json", "vocab.json"]
    assert tokenizer_files(None) == [] and tokenizer_files(tmp_path / "absent") == []


def test_remote_code_files_travel_with_auto_map(tmp_path):
    from awqlib.checkpoint import copy_tokenizer_files, remote_code_files
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    (src / "modeling_x.py").write_text("# code")
    (src / "config.json").write_text(json.dumps({"model_type": "x"}))
    assert remote_code_files(src) == []  # plain model: its stray .py files are not copied
    (src / "config.json").write_text(json.dumps({"auto_map": {"AutoModelForCausalLM": "modeling_x.X"}}))
    (src / "tokenizer.json").write_text("{}")
    assert copy_tokenizer_files(src, out) and not (out / "modeling_x.py").exists()  # the code was not trusted
    assert copy_tokenizer_files(src, out, remote_code=True) and (out / "modeling_x.py").read_text() == "# code"


def test_hub_id_source_is_read_from_the_cache_only(monkeypatch, tmp_path):
    """A Hub id resolves to its snapshot folder only when the cache already has it: no download."""
    import functools

    import huggingface_hub

    from awqlib.checkpoint import local_source_folder
    calls = []

    @functools.wraps(huggingface_hub.snapshot_download)
    def cached_only(repo_id, **kw):
        calls.append(kw)
        if repo_id != "org/cached":
            raise FileNotFoundError("not in the cache")
        return str(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", cached_only)
    assert local_source_folder("org/cached", revision="main") == tmp_path
    assert local_source_folder("org/absent") is None
    assert all(kw["local_files_only"] for kw in calls) and calls[0]["revision"] == "main"
    assert local_source_folder(str(tmp_path)) == tmp_path and local_source_folder(None) is None


@pytest.mark.parametrize("arch,expected", [
    ("llama", None),                                   # only the output head: readers skip it themselves
    ("cohere", None),                                  # its q/k norms hold 2-D weights: not linears
    ("mixtral", ["block_sparse_moe.gate", "lm_head"]),  # the routers, by their path in the block
    ("qwen3_moe", ["mlp.gate", "lm_head"]),
    ("qwen2_moe", ["mlp.gate", "mlp.shared_expert_gate", "lm_head"]),  # the router and the shared expert's gate
])
def test_unquantized_linears_are_named_for_readers(arch, expected, tmp_path):
    """Readers that build the model from config.json (transformers 4.x, AutoAWQ, vLLM) put a quantized
    linear on every linear modules_to_not_convert does not name, then find no tensors for it: the
    routers awqlib keeps in fp16 must be named (and, once there is a list, transformers 4.x no longer
    adds the head by itself).  Renamed keys keep their 4.x name (Qwen3-MoE's num_experts)."""
    from conftest import tiny_model
    w = AutoAWQ.from_model(tiny_model(arch))
    w.quantize(None, {"q_group_size": 64}, method="rtn")
    cfg = json.loads((w.save_quantized(tmp_path / "q") / "config.json").read_text())
    assert cfg["quantization_config"]["modules_to_not_convert"] == expected
    if arch == "qwen3_moe":
        assert cfg["num_experts"] == cfg["num_local_experts"] == 4
    # a user's own list keeps its entries and gains the head
    w = AutoAWQ.from_model(tiny_model(arch))
    w.quantize(None, {"q_group_size": 64, "modules_to_not_convert": ["down_proj"]}, method="rtn")
    cfg = json.loads((w.save_quantized(tmp_path / "q2") / "config.json").read_text())
    assert cfg["quantization_config"]["modules_to_not_convert"] == ["down_proj", *(expected or ["lm_head"])]


def test_not_convert_entries_never_match_a_quantized_linear():
    from awqlib.checkpoint import not_convert_entries
    blocks = "model.layers"
    quantized = ["model.layers.0.mlp.experts.0.gate_proj", "model.layers.1.mlp.gate_proj"]  # layer 1 is dense
    # "mlp.gate" would also match layer 1's gate_proj: the router is named by its full path instead
    assert not_convert_entries(["model.layers.0.mlp.gate", "lm_head"], quantized, blocks) == \
        ["model.layers.0.mlp.gate", "lm_head"]
    assert not_convert_entries(["model.layers.0.mlp.gate", "model.layers.2.mlp.gate"], quantized[:1], blocks) == \
        ["mlp.gate"]
    assert not_convert_entries(["model.vision_tower"], quantized, blocks) == ["model.vision_tower"]
