"""User input is strict (an unknown key is an error naming the accepted ones) and takes AutoAWQ's
and transformers' spellings; checkpoint configs are read leniently."""

from __future__ import annotations

import logging

import pytest
import torch

from awqlib import AutoAWQ, QuantConfig
from conftest import tiny_model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    m = AutoAWQ.from_model(tiny_model("llama")).quantize(None, {"q_group_size": 64}, method="rtn")
    return m.save_quantized(tmp_path_factory.mktemp("strict") / "q")


@pytest.mark.parametrize("bad", ["fuse_layerz", "torch_dtyp", "max_new_tokens"])
def test_from_quantized_unknown_keyword(ckpt, bad):
    with pytest.raises(TypeError, match=rf"unknown keyword argument\(s\) \['{bad}'\].*accepted: .*'device_map'"):
        AutoAWQ.from_quantized(str(ckpt), **{bad: True})


def test_from_quantized_dtype_alias(ckpt):
    assert AutoAWQ.from_quantized(str(ckpt), dtype=torch.bfloat16).model.dtype == torch.bfloat16
    assert AutoAWQ.from_quantized(str(ckpt), dtype="float16", torch_dtype="float16").model.dtype == torch.float16
    with pytest.raises(ValueError, match="same argument"):
        AutoAWQ.from_quantized(str(ckpt), dtype="float16", torch_dtype=torch.bfloat16)


def test_from_quantized_autoawq_arguments(ckpt, caplog):
    with caplog.at_level(logging.INFO, logger="awqlib"):
        m = AutoAWQ.from_quantized(str(ckpt), use_exllama=True, use_exllama_v2=False, use_ipex=False, max_seq_len=4096,
                                   batch_size=1, safetensors=True, low_cpu_mem_usage=True, quant_filename="",
                                   download_kwargs={"revision": "main"}, device_map=None)
    assert m.quantized
    assert "from_quantized(use_exllama=True) has no effect" in caplog.text
    assert "from_quantized(max_seq_len=4096) has no effect" in caplog.text
    with pytest.raises(ValueError, match="safetensors=False.*never unpickles"):
        AutoAWQ.from_quantized(str(ckpt), safetensors=False)
    with pytest.raises(ValueError, match="quant_filename='model.pt'"):
        AutoAWQ.from_quantized(str(ckpt), quant_filename="model.pt")


def test_download_kwargs(monkeypatch):
    import functools

    import huggingface_hub
    seen = {}

    @functools.wraps(huggingface_hub.snapshot_download)  # keeps its signature
    def fake_download(repo_id, **kw):
        seen.update(kw, repo_id=repo_id)
        raise OSError("offline")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    with pytest.raises(OSError, match="could not be downloaded"):
        AutoAWQ.from_quantized("org/some-awq", download_kwargs={"revision": "v2", "token": "hf_x", "cache_dir": "/c"})
    assert seen["repo_id"] == "org/some-awq" and seen["revision"] == "v2" and seen["token"] == "hf_x"
    assert seen["cache_dir"] == "/c"
    with pytest.raises(ValueError, match=r"download_kwargs has unknown key\(s\) \['revison'\]"):
        AutoAWQ.from_quantized("org/some-awq", download_kwargs={"revison": "v2"})
    with pytest.raises(ValueError, match="revision is given twice"):
        AutoAWQ.from_quantized("org/some-awq", revision="a", download_kwargs={"revision": "b"})


def test_from_pretrained_autoawq_and_transformers_spellings(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "src")
    m = AutoAWQ.from_pretrained(str(tmp_path / "src"), low_cpu_mem_usage=True, dtype=torch.bfloat16)
    assert m.model.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="same argument"):
        AutoAWQ.from_pretrained(str(tmp_path / "src"), dtype="float16", torch_dtype="bfloat16")


def test_user_quant_config_is_strict():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['q_group_sise'\]; accepted: .*'group_size'.*"
                                         r"'modules_to_not_convert'.*'q_group_size'.*'w_bit'"):
        QuantConfig.from_user({"q_group_sise": 64})
    m = AutoAWQ.from_model(tiny_model("llama"))
    with pytest.raises(ValueError, match="q_group_sise"):
        m.quantize(None, {"q_group_sise": 64}, method="rtn")
    assert QuantConfig.from_user({"quant_method": "awq", "w_bit": 4, "q_group_size": 64, "zero_point": True,
                                  "version": "GEMM", "modules_to_not_convert": ["gate"]}).group_size == 64


def test_checkpoint_quant_config_is_lenient():
    qc = QuantConfig.from_checkpoint({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True,
                                      "version": "gemm", "backend": "autoawq", "do_fuse": False})
    assert qc.group_size == 128 and qc.extra == {"backend": "autoawq", "do_fuse": False}


def test_quantize_unknown_option_names_accepted():
    m = AutoAWQ.from_model(tiny_model("llama"))
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['n_gird'\].*'max_search_tokens'.*'n_grid'"):
        m.quantize(None, {"q_group_size": 64}, method="rtn", n_gird=10)


@pytest.mark.parametrize("option, value, error, message", [
    ("gptq_act_order", "no", TypeError, "gptq_act_order='no': expected bool"),  # a truthy string: it was on
    ("gptq_damp", "0.1", TypeError, "expected float"),
    ("gptq_damp", float("nan"), TypeError, "expected float"),
    ("n_grid", 2.5, TypeError, "expected int"),
    ("clip_grid", True, TypeError, "expected int"),
    ("n_grid", 0, ValueError, "n_grid=0: must be >= 1"),
    ("max_shrink", 1.0, ValueError, r"must be in \[0, 1\)"),
    ("gptq_refit_rounds", -1, ValueError, ">= 0"),
    ("offload_device", "gpux", ValueError, "offload_device='gpux'"),
])
def test_quantize_option_values_are_checked(option, value, error, message):
    m = AutoAWQ.from_model(tiny_model("llama"))
    with pytest.raises(error, match=message):
        m.quantize(None, {"q_group_size": 64}, method="awq+gptq", calib_data=[[1, 2, 3]], **{option: value})


def test_quantize_option_values_accept_ints_for_floats_and_numpy_numbers():
    import numpy as np

    from awqlib import awq
    opts = awq.make_options("awq+gptq", gptq_damp=1, max_shrink=0)
    assert opts.gptq_damp == 1.0 and isinstance(opts.gptq_damp, float) and isinstance(opts.max_shrink, float)
    opts = awq.make_options("awq+gptq", n_grid=np.int64(10), gptq_damp=np.float32(0.25), apply_clip=np.bool_(False))
    assert (opts.n_grid, opts.gptq_damp, opts.apply_clip) == (10, 0.25, False)
    assert type(opts.n_grid) is int and type(opts.gptq_damp) is float and type(opts.apply_clip) is bool
    with pytest.raises(TypeError, match="expected int"):
        awq.make_options("awq", n_grid=np.bool_(True))
    with pytest.raises(ValueError, match="offload_device='meta'"):
        awq.make_options("awq", offload_device="meta")
