"""End to end on CUDA (skipped without a GPU): the kernels serve a quantized model whose logits
match the reference path's, fused or not; AWQ itself runs on the GPU."""

import pytest
import torch

from awqlib import AutoAWQ

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _tiny_llama():
    from transformers import AutoModelForCausalLM, LlamaConfig
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


@pytest.mark.parametrize("layout", ["tiled", "stream"])  # the runtime layout from_quantized repacks to
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fuse", [False, True])
def test_cuda_logits_match_reference(tmp_path, monkeypatch, dtype, fuse, layout):
    from awqlib import kernels
    monkeypatch.setenv("AWQLIB_LAYOUT", layout)
    w = AutoAWQ.from_model(_tiny_llama())
    w.quantize(None, {"q_group_size": 64}, method="rtn", device="cpu")
    w.save_quantized(tmp_path / "q")
    ids = torch.randint(0, 512, (3, 40))
    ref = AutoAWQ.from_quantized(str(tmp_path / "q"), device="cpu", torch_dtype=torch.float32)
    gpu = AutoAWQ.from_quantized(str(tmp_path / "q"), device="cuda", torch_dtype=dtype, fuse_layers=fuse)
    assert kernels.load(), "CUDA kernels must build on a GPU machine with nvcc"
    from awqlib.modules import WQLinear
    assert all(m.layout == layout for m in gpu.model.modules() if isinstance(m, WQLinear)), \
        "from_quantized must repack on CUDA"
    with torch.no_grad():
        r = ref(input_ids=ids).logits
        for n in (40, 1):  # prefill (GEMM) and decode-sized (GEMV) calls
            g = gpu(input_ids=ids[:, :n].cuda()).logits.float().cpu()
            rel = ((g - r[:, :n]).norm() / r[:, :n].norm()).item()
            assert rel < (1e-2 if dtype == torch.float16 else 3e-2), (n, rel)


def test_awq_quantize_on_gpu():
    model = _tiny_llama()
    ids = torch.randint(0, 512, (16, 64))
    with torch.no_grad():
        fp = model(input_ids=ids[:2]).logits
    w = AutoAWQ.from_model(model.half())
    w.quantize(None, {"q_group_size": 64}, calib_data=list(ids), n_samples=16, seqlen=64, device="cuda")
    with torch.no_grad():
        q = w.model.cuda()(input_ids=ids[:2].cuda()).logits.float().cpu()
    assert torch.isfinite(q).all()
    assert ((q - fp).norm() / fp.norm()).item() < 0.5
