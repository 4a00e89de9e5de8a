"""Other readers on awqlib checkpoints, on the CPU: transformers 5 + gptqmodel (what CI installs,
see scripts/setup_env.sh) loads a checkpoint with a non-default RoPE theta and a
PreTrainedTokenizerFast tokenizer, and computes what awqlib computes.

gptqmodel's CPU kernel (TorchAtenAwqLinear) computes in bfloat16, hence the loose tolerances.
"""

from __future__ import annotations

import pytest
import torch

from awqlib import AutoAWQ
from conftest import make_source

gptqmodel = pytest.importorskip("gptqmodel", reason="gptqmodel is not installed (scripts/setup_env.sh installs it)")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    src = tmp_path_factory.mktemp("src") / "llama-theta5e5"
    src.mkdir()
    make_source(src, {"rope_theta": 500000.0, "rope_scaling": None})
    m = AutoAWQ.from_pretrained(str(src))
    m.quantize(None, {"q_group_size": 64}, method="rtn")
    return m.save_quantized(tmp_path_factory.mktemp("q") / "llama-awq")


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
