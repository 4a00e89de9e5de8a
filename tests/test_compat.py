"""awqlib.compat: AWQ checkpoints against vLLM's loading rules (headers only; vLLM is not run)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from awqlib import AutoAWQ, WQLinear
from awqlib.compat import RULES, RULES_LIST, format_report, read_safetensors_header, validate_checkpoint
from conftest import ARCHS, FIXTURES, needs_shared, tiny_config, tiny_model

GEMM = FIXTURES / "autoawq-llama-gemm-g64"
GEMV = FIXTURES / "autoawq-llama-gemv-g64"
needs_fixtures = needs_shared("fixtures", "autoawq-llama-gemm-g64")


def _save_rtn(model, path: Path, group: int = 64) -> Path:
    AutoAWQ.from_model(model).quantize(None, {"q_group_size": group}, method="rtn").save_quantized(path)
    return path


@pytest.fixture(scope="module")
def awqlib_ckpt(tmp_path_factory) -> Path:
    """A tiny llama (hidden 128, intermediate 256, 4 heads / 2 KV heads), RTN, group 64, as awqlib writes it."""
    return _save_rtn(tiny_model("llama"), tmp_path_factory.mktemp("ck") / "tiny-awq")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite(folder: Path, fn) -> None:
    f = folder / "model.safetensors"
    state = load_file(str(f))
    fn(state)
    save_file(state, str(f), metadata={"format": "pt"})


def _edit_config(folder: Path, fn) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    fn(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))


def _rules(findings) -> set[str]:
    return {f.rule for f in findings}


def test_every_rule_cites_its_source():
    assert len(RULES) == len(RULES_LIST)
    for r in RULES_LIST:
        assert r.severity in ("error", "warning")
        assert r.repo in ("vllm-project/vllm", "sgl-project/sglang", "ModelCloud/GPTQModel")
        assert r.path and r.where and r.description and r.versions
    # current vLLM's reader is auto_awq.py; rules of the older awq.py / awq_marlin.py say so
    assert "quantization/auto_awq.py" in RULES["config_keys"].path and RULES["marlin"].versions.startswith("current")
    for rid in ("act_dtype", "marlin_legacy"):
        assert RULES[rid].versions.startswith("older") and "awq.py" in RULES[rid].path + RULES[rid].versions


@needs_fixtures
def test_autoawq_gemm_fixture_is_valid():
    rep = validate_checkpoint(GEMM)
    assert rep.ok, format_report(rep)
    assert rep.n_quantized == 14  # 2 layers x 7 linears; expected.safetensors is not read as weights
    # 4 heads / 2 KV heads: TP 8 is rejected by the head count; hidden 256 / intermediate 512 with g64
    # split fine up to 4 (o_proj 64 per shard, down_proj 128 per shard).
    assert rep.valid_tp == [1, 2, 4]
    assert any("num_attention_heads 4" in p for p in rep.tp_problems[8])
    # current vLLM pads Marlin's thread tiles; older awq_marlin needed 128 inputs per shard (o_proj: 64 at TP 4)
    assert rep.marlin_tp == [1, 2, 4] and rep.legacy_marlin_tp == [1, 2]
    assert _rules(rep.warnings) == {"act_dtype"}  # the fixture's config says float32


@needs_fixtures
def test_autoawq_gemv_fixture_fails_with_the_fix():
    rep = validate_checkpoint(GEMV)
    assert not rep.ok and rep.valid_tp == []
    assert _rules(rep.errors) == {"version_gemm"}
    msg = str(rep.errors[0])
    assert "'gemv'" in msg and "only GEMM" in msg
    assert "AutoAWQ.from_quantized(path).save_quantized(out)" in msg
    assert "vllm/model_executor/layers/quantization/auto_awq.py" in msg
    assert "NOT loadable" in format_report(rep)


@needs_fixtures
def test_gemv_fixture_resaved_by_awqlib_is_valid(tmp_path):
    out = tmp_path / "gemm"
    AutoAWQ.from_quantized(str(GEMV)).save_quantized(out)
    rep = validate_checkpoint(out)
    assert rep.ok, format_report(rep)
    assert rep.quant_config["version"] == "gemm" and rep.valid_tp == [1, 2, 4]
    assert rep.warnings == []  # awqlib writes torch_dtype float16


def test_awqlib_checkpoint_is_valid(awqlib_ckpt):
    rep = validate_checkpoint(awqlib_ckpt)
    assert rep.ok and rep.warnings == [], format_report(rep)
    assert rep.n_quantized == 14
    # hidden 128, g64: o_proj has 32 inputs per shard at TP 4 -> not a multiple of 64
    assert rep.valid_tp == [1, 2]
    assert any("o_proj (row-parallel): input per shard 32" in p for p in rep.tp_problems[4])
    assert rep.marlin_tp == [1, 2]  # tiles padded by current vLLM
    assert rep.legacy_marlin_tp == [1]  # at TP 2 o_proj has 64 inputs per shard < 128 (older awq_marlin)
    hdr = read_safetensors_header(awqlib_ckpt / "model.safetensors")
    assert hdr["model.layers.0.self_attn.q_proj.qweight"] == {"dtype": "I32", "shape": [128, 16]}


def test_row_parallel_group_breaks_tp2(tmp_path):
    """intermediate 192 with group 64: down_proj (row-parallel) gets 96 inputs per shard at TP 2."""
    import transformers as T
    cfg = T.LlamaConfig(**{**tiny_config("llama").to_dict(), "intermediate_size": 192})
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    rep = validate_checkpoint(_save_rtn(model, tmp_path / "i192"), tp_sizes=(1, 2))
    assert rep.ok and rep.valid_tp == [1], format_report(rep)
    probs = rep.tp_problems[2]
    assert any("down_proj (row-parallel): input per shard 96 is not a multiple of group_size 64" in p
               for p in probs)
    # gate/up are column-parallel: 96 outputs per shard is fine (multiple of the pack factor 8)
    assert not any("gate_proj" in p or "up_proj" in p for p in probs)
    assert "TP 2 rejected" in format_report(rep)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_scales_dtype_is_rejected(awqlib_ckpt, tmp_path, dtype):
    bad = _copy(awqlib_ckpt, tmp_path / "bad")
    _rewrite(bad, lambda s: s.update({k: v.to(dtype) for k, v in s.items() if k.endswith(".scales")}))
    rep = validate_checkpoint(bad)
    assert not rep.ok and rep.valid_tp == []
    assert _rules(rep.errors) == {"dtypes"}
    assert "expected float16" in str(rep.errors[0]) and str(dtype).split(".")[1] in str(rep.errors[0])


def test_qweight_dtype_is_rejected(awqlib_ckpt, tmp_path):
    bad = _copy(awqlib_ckpt, tmp_path / "bad")
    key = "model.layers.1.mlp.up_proj.qweight"
    _rewrite(bad, lambda s: s.update({key: s[key].to(torch.int64)}))
    rep = validate_checkpoint(bad)
    assert [str(e) for e in rep.errors if key in str(e)] and _rules(rep.errors) == {"dtypes"}


def test_wrong_shape_is_rejected(awqlib_ckpt, tmp_path):
    bad = _copy(awqlib_ckpt, tmp_path / "bad")
    key = "model.layers.0.mlp.down_proj.scales"
    _rewrite(bad, lambda s: s.update({key: s[key][:, :-8].contiguous()}))
    rep = validate_checkpoint(bad)
    assert _rules(rep.errors) == {"shapes"}
    assert "model.layers.0.mlp.down_proj" in str(rep.errors[0]) and "scales [4, 128]" in str(rep.errors[0])


def test_missing_tensor_is_rejected(awqlib_ckpt, tmp_path):
    bad = _copy(awqlib_ckpt, tmp_path / "bad")
    _rewrite(bad, lambda s: s.pop("model.layers.0.self_attn.k_proj.qzeros"))
    rep = validate_checkpoint(bad)
    assert _rules(rep.errors) == {"tensors"} and "qzeros" in str(rep.errors[0])


def test_other_quant_method_is_rejected(awqlib_ckpt, tmp_path):
    bad = _copy(awqlib_ckpt, tmp_path / "bad")
    _edit_config(bad, lambda c: c["quantization_config"].update(quant_method="gptq"))
    rep = validate_checkpoint(bad)
    assert _rules(rep.errors) == {"quant_method"} and "'gptq'" in str(rep.errors[0])


def test_bits_and_missing_keys_are_rejected(awqlib_ckpt, tmp_path):
    bad = _copy(awqlib_ckpt, tmp_path / "bits")
    _edit_config(bad, lambda c: c["quantization_config"].update(bits=8))
    assert _rules(validate_checkpoint(bad).errors) == {"bits"}
    bad = _copy(awqlib_ckpt, tmp_path / "keys")
    _edit_config(bad, lambda c: c["quantization_config"].pop("zero_point"))
    assert _rules(validate_checkpoint(bad).errors) == {"config_keys"}


def test_autoawq_key_spellings_load_but_skip_marlin(awqlib_ckpt, tmp_path):
    ck = _copy(awqlib_ckpt, tmp_path / "aliases")

    def aliases(c):
        q = c["quantization_config"]
        q["w_bit"], q["q_group_size"] = q.pop("bits"), q.pop("group_size")
    _edit_config(ck, aliases)
    rep = validate_checkpoint(ck)
    # current vLLM reads both spellings for its Marlin path; older releases' awq_marlin only the HF names
    assert rep.ok and rep.valid_tp == [1, 2] and rep.marlin_tp == [1, 2] and rep.legacy_marlin_tp == []
    assert _rules(rep.warnings) == {"marlin_legacy"}


def test_unquantized_config_and_missing_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    rep = validate_checkpoint(tmp_path)
    assert _rules(rep.errors) == {"config", "files"}


def test_cli_exit_code(awqlib_ckpt, capsys):
    from awqlib.compat import main
    assert main([str(awqlib_ckpt), "--tp", "1", "2", "4"]) == 0
    out = capsys.readouterr().out
    assert "valid --tensor-parallel-size: [1, 2]" in out
    assert main([str(awqlib_ckpt), "--rules"]) == 0
    assert "vllm/model_executor/layers/quantization/auto_awq.py" in capsys.readouterr().out


def test_per_channel_group_warns_for_transformers_cpu(tmp_path):
    """group_size -1: a warning for SGLang, tensor parallelism and transformers' CPU path (gptqmodel)."""
    rep = validate_checkpoint(_save_rtn(tiny_model("llama"), tmp_path / "g-1", group=-1))
    assert rep.ok and rep.valid_tp == [1], format_report(rep)
    assert _rules(rep.warnings) == {"group_size", "transformers_cpu"}
    assert "32..256" in str(next(f for f in rep.warnings if f.rule == "transformers_cpu"))
    assert "group size -1 may not load" in (tmp_path / "g-1" / "README.md").read_text()  # the card says so too


def test_bf16_torch_dtype_is_fine_for_current_vllm(awqlib_ckpt, tmp_path):
    ck = _copy(awqlib_ckpt, tmp_path / "bf16")
    _edit_config(ck, lambda c: c.update(torch_dtype="bfloat16", dtype="bfloat16"))
    rep = validate_checkpoint(ck)
    assert rep.ok and _rules(rep.warnings) == {"act_dtype"}
    assert "current vLLM serves AWQ in fp16 or bf16" in rep.warnings[0].message


def _qc_to_file(ck: Path, text: str) -> None:
    _edit_config(ck, lambda c: c.pop("quantization_config"))
    (ck / "quant_config.json").write_text(text)


def _empty_linear(s) -> None:
    s.update({"model.layers.0.mlp.extra.qweight": torch.zeros(0, 16, dtype=torch.int32),
              "model.layers.0.mlp.extra.qzeros": torch.zeros(0, 16, dtype=torch.int32),
              "model.layers.0.mlp.extra.scales": torch.zeros(0, 128, dtype=torch.float16)})


@pytest.mark.parametrize("damage,rule,msg", [
    (lambda ck: (ck / "config.json").write_text("[]"), "config", "config.json must hold a JSON object, not list"),
    (lambda ck: _edit_config(ck, lambda c: c.update(quantization_config="awq")), "config",
     "quantization_config is 'awq' (str); it must be an object"),
    (lambda ck: _edit_config(ck, lambda c: c.update(quantization_config=["awq"])), "config",
     "quantization_config is ['awq'] (list); it must be an object"),
    (lambda ck: _qc_to_file(ck, "{bits: 4"), "config", "quant_config.json is not UTF-8 JSON"),
    (lambda ck: _qc_to_file(ck, "4"), "config", "quant_config.json must hold a JSON object, not int"),
    (lambda ck: _edit_config(ck, lambda c: c.update(num_attention_heads="4")), "config",
     "num_attention_heads='4' (str) must be a positive integer"),
    (lambda ck: _edit_config(ck, lambda c: c.update(num_key_value_heads=2.0)), "config",
     "num_key_value_heads=2.0 (float) must be a positive integer"),
    (lambda ck: _edit_config(ck, lambda c: c["quantization_config"].update(modules_to_not_convert="lm_head")),
     "config", "modules_to_not_convert must be a list of module names, got 'lm_head'"),
    (lambda ck: (_edit_config(ck, lambda c: c["quantization_config"].update(group_size=-1)),
                 _rewrite(ck, _empty_linear)), "shapes", "model.layers.0.mlp.extra: qweight [0, 16]"),
])
def test_malformed_configs_are_findings_not_crashes(awqlib_ckpt, tmp_path, capsys, damage, rule, msg):
    """`awqlib check` reports what is wrong with a config as a finding; it never crashes on one."""
    ck = _copy(awqlib_ckpt, tmp_path / "ck")
    damage(ck)
    rep = validate_checkpoint(ck)
    assert not rep.ok and any(f.rule == rule and msg in f.message for f in rep.errors), format_report(rep)
    from awqlib.compat import main
    assert main([str(ck)]) == 1 and msg in capsys.readouterr().out


@pytest.mark.parametrize("arch", ARCHS)
def test_every_family_writes_a_checkpoint_vllm_loads(arch, tmp_path):
    """Each supported family's checkpoint passes every rule: its linears sit in the row/column tables
    (no 'checked both ways' warning), the unquantized ones (routers, gates) are named, none is a
    quantized router."""
    w = AutoAWQ.from_model(tiny_model(arch)).quantize(None, {"q_group_size": 64}, method="rtn")
    n_quantized = sum(isinstance(m, WQLinear) for m in w.model.modules())
    rep = validate_checkpoint(w.save_quantized(tmp_path / "q"))
    assert rep.ok and not rep.warnings, format_report(rep)
    assert rep.n_quantized == n_quantized and 1 in rep.valid_tp
