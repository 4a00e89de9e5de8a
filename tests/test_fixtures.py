"""Compatibility proof: checkpoints written by the real AutoAWQ 0.2.9 reproduce its logits."""

import pytest
import torch
from safetensors.torch import load_file

from awqlib import AutoAWQ
from conftest import FIXTURES, needs_shared

pytestmark = needs_shared("fixtures", "autoawq-llama-gemm-g64")


@pytest.mark.parametrize("version", ["gemm", "gemv"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_autoawq_fixture_logits(version, dtype):
    folder = FIXTURES / f"autoawq-llama-{version}-g64"
    if not folder.exists():
        pytest.skip(f"{folder} not present")
    expected = load_file(str(folder / "expected.safetensors"))
    model = AutoAWQ.from_quantized(str(folder), torch_dtype=dtype)
    logits = model(input_ids=expected["input_ids"]).logits.float()
    ref = expected["logits"]
    rel = ((logits - ref).norm() / ref.norm()).item()
    # AutoAWQ computed in fp16: ~1e-3 relative error is fp16 rounding of activations
    assert rel < 2e-3, rel


def test_gemv_and_gemm_fixture_hold_the_same_model():
    a = AutoAWQ.from_quantized(str(FIXTURES / "autoawq-llama-gemm-g64"))
    b = AutoAWQ.from_quantized(str(FIXTURES / "autoawq-llama-gemv-g64"))
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
