"""Bigger than memory: lazy per-block loading gives the same checkpoint as the in-memory path,
and an interrupted run resumes to an identical checkpoint."""

import json

import pytest
import torch

from awqlib import AutoAWQ, awq
from conftest import assert_same_checkpoint, die_on_call, tiny_model

QC = {"q_group_size": 64}


@pytest.fixture
def src(tmp_path):
    def make(arch):
        path = tmp_path / f"src-{arch}"
        tiny_model(arch).half().save_pretrained(path)
        return path
    return make


@pytest.mark.parametrize("arch", ["llama", "mixtral", "qwen2_moe"])  # dense; experts; a shared expert and its fp16 gate
def test_lazy_equals_in_memory(src, tmp_path, calib_ids, arch):
    path = src(arch)
    a = AutoAWQ.from_pretrained(str(path))
    a.quantize(None, QC, calib_data=list(calib_ids), n_samples=16, seqlen=64)
    a.save_quantized(tmp_path / "mem")
    b = AutoAWQ.from_pretrained(str(path), lazy=True)
    assert all(p.device.type == "meta" for p in b.model.parameters())
    b.quantize(None, QC, calib_data=list(calib_ids), n_samples=16, seqlen=64, save_dir=tmp_path / "lazy")
    assert_same_checkpoint(tmp_path / "mem", tmp_path / "lazy")
    q = AutoAWQ.from_quantized(str(tmp_path / "lazy"))
    assert torch.isfinite(q(input_ids=calib_ids[:1]).logits).all()


@pytest.mark.parametrize("lazy", [True, False])
@pytest.mark.parametrize("propagate", [True, False])
def test_resume_after_interruption(src, tmp_path, calib_ids, monkeypatch, lazy, propagate):
    path = src("llama")
    kw = dict(calib_data=list(calib_ids), n_samples=16, seqlen=64, propagate_quantized=propagate)
    full = AutoAWQ.from_pretrained(str(path), lazy=lazy)
    full.quantize(None, QC, save_dir=tmp_path / "full", **kw)

    real = awq.quantize_block
    calls = {"n": 0}

    def dies_on_second_block(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated crash")
        return real(*a, **k)
    monkeypatch.setattr(awq, "quantize_block", dies_on_second_block)
    with pytest.raises(KeyboardInterrupt):
        AutoAWQ.from_pretrained(str(path), lazy=lazy).quantize(None, QC, save_dir=tmp_path / "out", **kw)
    assert not (tmp_path / "out").exists()
    assert len(list((tmp_path / "out.awqlib-partial").glob("*.safetensors"))) == 1

    calls["n"] = -100  # the rerun must only quantize block 1
    again = AutoAWQ.from_pretrained(str(path), lazy=lazy)
    again.quantize(None, QC, save_dir=tmp_path / "out", **kw)
    assert calls["n"] == -99
    assert not (tmp_path / "out.awqlib-partial").exists()
    assert_same_checkpoint(tmp_path / "full", tmp_path / "out")


def test_resume_with_other_settings_is_refused(src, tmp_path, calib_ids, monkeypatch):
    path = src("llama")
    die_on_call(monkeypatch, awq, "quantize_block")
    with pytest.raises(KeyboardInterrupt):  # after block 0 is finished: the settings are committed
        AutoAWQ.from_pretrained(str(path), lazy=True).quantize(None, QC, calib_data=list(calib_ids), n_samples=16,
                                                               seqlen=64, save_dir=tmp_path / "out")
    with pytest.raises(FileExistsError, match="different settings"):
        AutoAWQ.from_pretrained(str(path), lazy=True).quantize(None, {"q_group_size": 32}, calib_data=list(calib_ids),
                                                               n_samples=16, seqlen=64, save_dir=tmp_path / "out")


def test_lazy_needs_save_dir(src):
    with pytest.raises(ValueError, match="save_dir"):
        AutoAWQ.from_pretrained(str(src("llama")), lazy=True).quantize(None, QC, method="rtn")


def test_resume_counts_only_the_models_code(tmp_path):
    """A resume is refused when the model's remote code changed, not when a script that merely sits
    beside the weights did (it runs nothing)."""
    from awqlib import resume
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "convert.py").write_text("# a helper script")
    assert resume.code_identity(tmp_path) == "" == resume.code_identity(None)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "x", "auto_map": {
        "AutoModelForCausalLM": "modeling_x.XForCausalLM"}}))
    (tmp_path / "modeling_x.py").write_text("# v1")
    before = resume.code_identity(tmp_path)
    assert "modeling_x.py:" in before
    (tmp_path / "modeling_x.py").write_text("# v2")
    assert resume.code_identity(tmp_path) != before
