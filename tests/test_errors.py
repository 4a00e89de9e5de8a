"""Bad input gets a clear error that names the problem and the fix; nothing is left half-written."""

import json
import shutil

import pytest
import torch

from awqlib import AutoAWQ, NotQuantizedCheckpoint, QuantConfig
from awqlib.calib import get_calib_tokens
from conftest import FIXTURES, tiny_model


def test_not_awq_quant_method(tmp_path):
    src = FIXTURES / "autoawq-llama-gemm-g64"
    dst = tmp_path / "m"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"]["quant_method"] = "gptq"
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="quant_method='gptq'"):
        AutoAWQ.from_quantized(str(dst))


def test_not_quantized_checkpoint(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "fp")
    with pytest.raises(NotQuantizedCheckpoint, match="not a quantized checkpoint"):  # a ValueError
        AutoAWQ.from_quantized(str(tmp_path / "fp"))


@pytest.mark.parametrize("cfg,msg", [({"w_bit": 3}, "bits=3"), ({"q_group_size": 96}, "group_size=96"),
                                     ({"version": "marlin"}, "version='marlin'")])
def test_unsupported_config(cfg, msg):
    with pytest.raises(ValueError, match=msg):
        QuantConfig.from_user(cfg)


def test_aliases():
    a = QuantConfig.from_user({"w_bit": 4, "q_group_size": 64, "zero_point": False})
    b = QuantConfig.from_user({"bits": 4, "group_size": 64, "zero_point": False})
    assert a == b and a.to_hf_dict()["group_size"] == 64 and a.w_bit == 4


def test_empty_and_short_calibration(calib_ids):
    with pytest.raises(ValueError, match="empty"):
        get_calib_tokens([], None, 8, 64)
    with pytest.raises(ValueError, match="too short"):
        get_calib_tokens([calib_ids[0, :10]], None, 8, 64)


def test_pileval_offline_message(monkeypatch):
    import builtins
    real = builtins.__import__

    def no_datasets(name, *a, **k):
        if name == "datasets":
            raise ImportError("no datasets")
        return real(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(RuntimeError, match="pass local text instead"):
        get_calib_tokens("pileval", None, 8, 64)


def test_group_size_must_divide_in_features_before_any_work():
    from transformers import LlamaConfig, AutoModelForCausalLM
    cfg = LlamaConfig(hidden_size=96, intermediate_size=192, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=128)
    w = AutoAWQ.from_model(AutoModelForCausalLM.from_config(cfg))
    with pytest.raises(ValueError, match=r"in_features=96.*Group sizes that work for this model: \[32, -1\].*"
                                         r"modules_to_not_convert"):
        w.quantize(None, {"q_group_size": 64}, calib_data="no-such-file-is-read")


def test_output_folder_exists_and_atomic(tmp_path, calib_ids):
    w = AutoAWQ.from_model(tiny_model("llama"))
    w.quantize(None, {"q_group_size": 64}, method="rtn")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        w.save_quantized(out)
    assert (out / "keep.txt").exists()
    w.save_quantized(out, overwrite=True)
    assert (out / "model.safetensors").exists() and not (out / "keep.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary folder left"


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    w = AutoAWQ.from_model(tiny_model("llama"))
    w.quantize(None, {"q_group_size": 64}, method="rtn")
    import awqlib.model as M
    monkeypatch.setattr(M, "write_shards", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        w.save_quantized(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_corrupt_and_missing_safetensors(tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(FIXTURES / "autoawq-llama-gemm-g64", dst)
    (dst / "expected.safetensors").unlink()
    (dst / "model.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="corrupt or not a safetensors file"):
        AutoAWQ.from_quantized(str(dst))
    (dst / "model.safetensors").unlink()
    (dst / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match="never unpickles"):
        AutoAWQ.from_quantized(str(dst))


def test_nan_activations(calib_ids):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[0] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN"):
        AutoAWQ.from_model(model).quantize(None, {"q_group_size": 64}, calib_data=list(calib_ids), n_samples=16,
                                           seqlen=64)


def test_quantize_twice():
    w = AutoAWQ.from_model(tiny_model("llama"))
    w.quantize(None, {"q_group_size": 64}, method="rtn")
    with pytest.raises(RuntimeError, match="already quantized"):
        w.quantize(None, {"q_group_size": 64}, method="rtn")


def test_wrapper_exposes_named_attributes_only():
    """AWQModel forwards what scripts use (config, device, dtype, generation_config) and nothing else:
    a typo is an AttributeError, not a silent read of the wrapped model."""
    w = AutoAWQ.from_model(tiny_model("llama"))
    assert w.config is w.model.config and w.generation_config is w.model.generation_config
    assert w.device == torch.device("cpu") and w.dtype == torch.float32 and w.hf_device_map is None
    assert w.saved_to is None
    with pytest.raises(AttributeError):
        w.get_input_embeddings
