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

import importlib.util
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
    importlib.util.find_spec("gptqmodel") is None,
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
# what AutoAWQ 0.2.9 and transformers 4.51 both read (AutoAWQ has no gemma3_text, qwen3 is tested
# through qwen3_moe's attention); llama with llama3 RoPE scaling
V4_READER_ARCHS = ["llama", "mistral", "qwen2", "gemma2", "phi3", "mixtral", "qwen3_moe", "opt"]


def _from_transformers5(arch: str, folder: Path) -> Path:
    """A checkpoint of a transformers 5 model built in memory (config in 5.x form, no source folder)."""
    from conftest import tiny_model
    model = tiny_model(arch)
    if arch == "llama":
        from transformers import AutoModelForCausalLM
        cfg = tiny_config("llama")
        cfg.rope_parameters = dict(LLAMA3_ROPE)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg).eval()
    m = AutoAWQ.from_model(model)
    m.quantize(None, {"q_group_size": 64}, method="rtn")
    return m.save_quantized(folder)


def _read_with_autoawq_env(folders: list[Path], tmp_path: Path) -> dict:
    """awqlib's fp32 logits on each folder, and what tests/readers/autoawq_reader.py says of them."""
    from safetensors.torch import save_file
    args = []
    for i, folder in enumerate(folders):
        ids = torch.randint(0, 250, (2, 48), generator=torch.Generator().manual_seed(i))
        ours = AutoAWQ.from_quantized(str(folder), torch_dtype=torch.float32)
        with torch.no_grad():
            logits = ours(input_ids=ids).logits
        ref = tmp_path / f"ref{i}.safetensors"
        save_file({"input_ids": ids, "logits": logits.contiguous()}, str(ref))
        args += [str(folder), str(ref)]
    run = subprocess.run([str(AUTOAWQ_PYTHON), str(ROOT / "tests" / "readers" / "autoawq_reader.py"), *args],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def _agrees(res: dict, what: str, moe: bool = False) -> None:
    # fp16 compute against awqlib's fp32: the same function up to rounding (measured ~1e-3); with
    # experts, fp16 can flip a near-tied top-k choice of a random router, hence the looser bound
    # (a lost RoPE setting alone gives 1.5e-2)
    rel, agree = (1e-2, 0.95) if moe else (5e-3, 0.98)
    for reader in ("autoawq", "transformers"):
        assert "error" not in res[reader], (what, reader, res[reader])
        assert res[reader]["rel"] < rel and res[reader]["argmax"] >= agree, (what, reader, res[reader])
    assert res["transformers"]["version"].startswith("4.")


@needs_autoawq
def test_autoawq_and_transformers4_read_a_transformers4_folder(checkpoint, tmp_path):
    res = _read_with_autoawq_env([checkpoint], tmp_path)[str(checkpoint)]
    _agrees(res, "transformers-4-written source")
    assert res["transformers"]["rope_theta"] == 500000.0 and res["tokenizer"] == "PreTrainedTokenizerFast"


@needs_autoawq
def test_autoawq_and_transformers4_read_transformers5_models(tmp_path):
    """Every family both readers support, quantized from a transformers 5 model in memory: config.json
    must carry what 4.x reads (rope_theta / llama3 rope_scaling, Qwen3-MoE's num_experts) and name
    the unquantized MoE routers, or the readers build the wrong model or empty quantized routers."""
    folders = {arch: _from_transformers5(arch, tmp_path / arch) for arch in V4_READER_ARCHS}
    results = _read_with_autoawq_env(list(folders.values()), tmp_path)
    for arch, folder in folders.items():
        _agrees(results[str(folder)], arch, moe=arch in ("mixtral", "qwen3_moe"))
    assert results[str(folders["llama"])]["transformers"]["rope_theta"] == 500000.0
    assert results[str(folders["llama"])]["transformers"]["rope_scaling"]["rope_type"] == "llama3"
