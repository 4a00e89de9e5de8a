"""Other readers on awqlib checkpoints, on the CPU (what CI installs, see scripts/setup_env.sh):

* transformers 5 + gptqmodel loads a checkpoint with a non-default RoPE theta and a
  PreTrainedTokenizerFast tokenizer, and computes what awqlib computes (gptqmodel's CPU kernel,
  TorchAtenAwqLinear, computes in bfloat16, hence the loose tolerances);
* AutoAWQ 0.2.9 and transformers 4.51 (the last 4.x release AutoAWQ supports), in their own
  environment, read a checkpoint made from a transformers-4-written source and one made from a
  transformers 5 model in memory (llama3 RoPE scaling, no tokenizer), and compute awqlib's logits
  (tests/readers/autoawq_reader.py; fp16 compute).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from awqlib import AutoAWQ
from conftest import make_source, tiny_config

ROOT = Path(__file__).resolve().parents[1]
AUTOAWQ_PYTHON = Path(os.environ.get("AWQLIB_AUTOAWQ_PYTHON") or ROOT / ".venv-autoawq" / "bin" / "python")
needs_gptqmodel = pytest.mark.skipif(
    __import__("importlib").util.find_spec("gptqmodel") is None,
    reason="gptqmodel is not installed (scripts/setup_env.sh installs it)")
needs_autoawq = pytest.mark.skipif(
    not AUTOAWQ_PYTHON.is_file(),
    reason=f"no AutoAWQ environment at {AUTOAWQ_PYTHON} (scripts/setup_env.sh makes .venv-autoawq)")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    src = tmp_path_factory.mktemp("src") / "llama-theta5e5"
    src.mkdir()
    make_source(src, {"rope_theta": 500000.0, "rope_scaling": None})
    m = AutoAWQ.from_pretrained(str(src))
    m.quantize(None, {"q_group_size": 64}, method="rtn")
    return m.save_quantized(tmp_path_factory.mktemp("q") / "llama-awq")


@needs_gptqmodel
def test_transformers_gptqmodel_agrees_with_awqlib(checkpoint):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    hf = AutoModelForCausalLM.from_pretrained(str(checkpoint), device_map="cpu")
    assert hf.config.rope_parameters["rope_theta"] == 500000.0
    tok = AutoTokenizer.from_pretrained(str(checkpoint))
    assert tok("w1 w2 w3", add_special_tokens=False).input_ids == [1, 2, 3]
    ids = torch.randint(0, 253, (4, 32), generator=torch.Generator().manual_seed(0))
    ref = AutoAWQ.from_quantized(str(checkpoint))
    with torch.no_grad():
        a, b = ref(ids).logits.float(), hf(ids).logits.float()
    rel = ((a - b).norm() / a.norm()).item()
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    assert rel < 2e-2 and agree >= 0.95, (rel, agree)


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


def _from_transformers5(folder: Path) -> Path:
    """A checkpoint of a transformers 5 model built in memory (config in 5.x form, no source folder)."""
    from transformers import AutoModelForCausalLM
    cfg = tiny_config("llama")
    cfg.rope_parameters = dict(LLAMA3_ROPE)
    torch.manual_seed(0)
    m = AutoAWQ.from_model(AutoModelForCausalLM.from_config(cfg).eval())
    m.quantize(None, {"q_group_size": 64}, method="rtn")
    return m.save_quantized(folder)


@needs_autoawq
@pytest.mark.parametrize("source", ["transformers4-folder", "transformers5-in-memory"])
def test_autoawq_and_transformers4_agree_with_awqlib(checkpoint, source, tmp_path):
    from safetensors.torch import save_file
    folder = checkpoint if source == "transformers4-folder" else _from_transformers5(tmp_path / "q5")
    ids = torch.randint(0, 250, (2, 48), generator=torch.Generator().manual_seed(0))
    ours = AutoAWQ.from_quantized(str(folder), torch_dtype=torch.float32)
    with torch.no_grad():
        logits = ours(input_ids=ids).logits
    save_file({"input_ids": ids, "logits": logits.contiguous()}, str(tmp_path / "ref.safetensors"))
    run = subprocess.run([str(AUTOAWQ_PYTHON), str(ROOT / "tests" / "readers" / "autoawq_reader.py"), str(folder),
                          str(tmp_path / "ref.safetensors")], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads(run.stdout.strip().splitlines()[-1])
    for reader in ("autoawq", "transformers"):
        assert "error" not in res[reader], (reader, res[reader])
        # fp16 compute against awqlib's fp32: the same function up to rounding
        assert res[reader]["rel"] < 3e-3 and res[reader]["argmax"] >= 0.98, (reader, res[reader])
    assert res["transformers"]["version"].startswith("4.")
    assert res["transformers"]["rope_theta"] == 500000.0
    if source == "transformers5-in-memory":  # llama3 scaling exported in the form 4.x reads
        assert res["transformers"]["rope_scaling"]["rope_type"] == "llama3", res["transformers"]
    else:
        assert res["tokenizer"] == "PreTrainedTokenizerFast"

