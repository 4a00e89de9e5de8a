"""AWQ must never lose to round-to-nearest, even on weights that already lie on a 4-bit grid
(re-quantized AWQ/GPTQ/GGUF releases, QAT checkpoints): the identity scale and "no clipping" are
always candidates.  Found on a real Qwen2 model whose public weights were a dequantized AWQ release
(AWQ g64 ppl 43.78 vs RTN g64 39.40)."""

import copy

import pytest
import torch

from awqlib import awq
from awqlib.arch import get_spec
from awqlib.config import QuantConfig
from awqlib.quant import fake_quantize
from conftest import tiny_model


def _on_grid_model(arch):
    """A tiny model whose decoder linears were RTN-quantized at g128 and dequantized."""
    model = tiny_model(arch)
    with torch.no_grad():
        for layer in model.model.layers:
            for m in layer.modules():
                if isinstance(m, torch.nn.Linear):
                    m.weight.copy_(fake_quantize(m.weight, 4, 128, True))
    return model


def _block_inputs(model, spec, ids):
    inps, kws = awq.capture_inputs(model, spec, ids, 8, torch.device("cpu"), torch.device("cpu"))
    return inps, kws[0]


@pytest.mark.parametrize("arch", ["llama_mha", "qwen2"])
@pytest.mark.parametrize("method", ["awq", "awq+gptq"])
def test_never_worse_than_rtn_on_gridded_weights(arch, method):
    model = _on_grid_model(arch)
    spec = get_spec(model.config.model_type)
    gen = torch.Generator().manual_seed(3)
    calib = torch.randint(0, 256, (16, 64), generator=gen)
    held_out = torch.randint(0, 256, (16, 64), generator=gen)
    c_inps, c_kws = _block_inputs(model, spec, calib)
    h_inps, h_kws = _block_inputs(model, spec, held_out)
    block = awq.get_blocks(model, spec)[0]
    qcfg = QuantConfig(group_size=64)

    def out(b):
        return torch.cat([awq.run_block(b, x, h_kws[x.shape[0]]) for x in h_inps])

    ref = out(block)
    rtn = copy.deepcopy(block)
    awq.rtn_quantize_block(rtn, spec, qcfg)
    ours = copy.deepcopy(block)
    awq.quantize_block(ours, spec, qcfg, awq.AWQOptions(**awq.method_options(method)), c_inps, c_kws,
                       torch.device("cpu"))
    err_rtn = (out(rtn) - ref).pow(2).mean().item()
    err_ours = (out(ours) - ref).pow(2).mean().item()
    assert err_ours <= err_rtn, f"{method} block-output error {err_ours:.3e} > RTN's {err_rtn:.3e}"
