"""End to end on CUDA (skipped without a GPU): the kernels serve a quantized model whose logits
match the reference path's, fused or not; AWQ itself runs on the GPU."""

import pytest
import torch

from awqlib import AutoAWQ

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _tiny_llama(dtype=torch.float32):
    """Built in ``dtype`` (not ``.half()`` after: that rounds the rotary inv_freq buffer to fp16, which
    a loaded checkpoint keeps in fp32, so the two would differ in every position but the first)."""
    from transformers import AutoModelForCausalLM, LlamaConfig
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512)
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()


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
        for n in (40, 1):  # prefill-sized (dequantize + cuBLAS) and decode-sized (stream / skinny) calls
            g = gpu(input_ids=ids[:, :n].cuda()).logits.float().cpu()
            rel = ((g - r[:, :n]).norm() / r[:, :n].norm()).item()
            assert rel < (1e-2 if dtype == torch.float16 else 3e-2), (n, rel)


def test_a_model_loaded_on_the_cpu_and_moved_runs_like_one_loaded_on_cuda(tmp_path, monkeypatch):
    """``.cuda()`` on a model loaded on the CPU repacks its quantized linears (WQLinear._apply) as a
    load onto CUDA does: the same layout, the same kernels, the same logits bit for bit; a cast on
    the GPU keeps the buffers; moved back, it holds (and saves) the checkpoint's tensors."""
    from awqlib.modules import WQLinear
    from awqlib.ops import gemm_kernel_name
    monkeypatch.delenv("AWQLIB_LAYOUT", raising=False)
    w = AutoAWQ.from_model(_tiny_llama())
    w.quantize(None, {"q_group_size": 64}, method="rtn", device="cpu")
    w.save_quantized(tmp_path / "q")
    direct = AutoAWQ.from_quantized(str(tmp_path / "q"), device="cuda", torch_dtype=torch.float16)
    moved = AutoAWQ.from_quantized(str(tmp_path / "q"), device="cpu", torch_dtype=torch.float16)
    on_disk = {k: v.clone() for k, v in moved.model.state_dict().items()}
    moved.model.cuda()
    lin = [m for m in moved.model.modules() if isinstance(m, WQLinear)]
    assert lin and all(m.layout == "stream" for m in lin)
    x = torch.randn(1, lin[0].in_features, device="cuda", dtype=torch.float16)
    assert "stream" in gemm_kernel_name(x, lin[0].qweight, lin[0].qzeros, lin[0].scales, lin[0].group_size)
    ids = torch.randint(0, 512, (2, 24), device="cuda")
    with torch.no_grad():
        assert torch.equal(moved(input_ids=ids).logits, direct(input_ids=ids).logits)
    kept = [m.qweight for m in lin]
    moved.model.half().to("cuda")
    assert all(m.qweight is q for m, q in zip(lin, kept))
    moved.model.cpu()
    assert all(m.layout == "gemm" for m in lin)
    sd = moved.model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in on_disk.items())


def _awq(model, ids, device, out):
    """AWQ-quantize ``model`` on ``device``, save it to ``out``; return (per-group ratios, folder)."""
    w = AutoAWQ.from_model(model)
    w.quantize(None, {"q_group_size": 64}, calib_data=list(ids), n_samples=16, seqlen=64, device=device)
    w.save_quantized(out)
    return {(i, prev): r.ratio for i, rep in enumerate(w.reports) for prev, r in rep.scales.items()}, out


def test_awq_quantize_on_gpu(tmp_path):
    """AWQ on the GPU (fp16 compute) is as good as on the CPU (fp32 compute): most scale groups pick
    the same ratio, and the GPU model's error is the CPU model's within 10 %.  The two models are
    not close to each other: on random weights the clip search is an argmin over a flat landscape,
    fp16 activations flip its near-ties, and each flip moves a whole group's scale by a grid step
    (a CPU run with fp16 compute: the same 6 of 6 ratios, errors 0.1227 and 0.1250, the models
    0.070 apart; 0.047 without clipping)."""
    import copy
    model = _tiny_llama(torch.float16)
    ids = torch.randint(0, 512, (16, 64), generator=torch.Generator().manual_seed(0))
    ratios_cpu, cpu_dir = _awq(copy.deepcopy(model), ids, "cpu", tmp_path / "cpu")
    ratios_gpu, gpu_dir = _awq(copy.deepcopy(model), ids, "cuda", tmp_path / "gpu")
    assert ratios_gpu.keys() == ratios_cpu.keys()
    same = sum(ratios_gpu[k] == ratios_cpu[k] for k in ratios_cpu)
    assert same >= 0.75 * len(ratios_cpu), (ratios_cpu, ratios_gpu)

    def logits(folder):  # both evaluated the same way: the reference path, fp32 on the CPU
        q = AutoAWQ.from_quantized(str(folder), device="cpu", torch_dtype=torch.float32)
        with torch.no_grad():
            return q(input_ids=ids[:2]).logits

    with torch.no_grad():
        fp = model.float()(input_ids=ids[:2]).logits
    on_cpu, on_gpu = logits(cpu_dir), logits(gpu_dir)
    assert torch.isfinite(on_gpu).all()
    cpu_err = ((on_cpu - fp).norm() / fp.norm()).item()
    gpu_err = ((on_gpu - fp).norm() / fp.norm()).item()
    between = ((on_gpu - on_cpu).norm() / on_cpu.norm()).item()
    assert gpu_err <= 1.1 * cpu_err, (gpu_err, cpu_err, between)
    assert between < cpu_err, (between, cpu_err)  # still far nearer each other than a broken search
    # and the GPU-quantized model runs on the kernels like the CPU one does on the reference
    q = AutoAWQ.from_quantized(str(gpu_dir), device="cuda")
    with torch.no_grad():
        g = q(input_ids=ids[:2].cuda()).logits.float().cpu()
    rel = ((g - on_gpu).norm() / on_gpu.norm()).item()
    assert rel < 1e-2, rel


@pytest.mark.parametrize("source", [torch.float16, torch.float32])  # float32: cast to float16 to compute
@pytest.mark.parametrize("layout", ["tiled", "stream"])
def test_in_process_quantize_serves_the_runtime_layout(tmp_path, monkeypatch, layout, source):
    """A model quantized on the GPU in this process reaches the kernels in the same runtime layout as
    a loaded checkpoint (one layout for the kernels), and computes what its saved checkpoint does,
    also when it was cast from float32 for computing (the rotary inv_freq stays float32)."""
    from awqlib.modules import WQLinear
    monkeypatch.setenv("AWQLIB_LAYOUT", layout)
    w = AutoAWQ.from_model(_tiny_llama(source).cuda())
    w.quantize(None, {"q_group_size": 64}, method="rtn")
    assert all(m.layout == layout for m in w.model.modules() if isinstance(m, WQLinear))
    w.save_quantized(tmp_path / "q")
    loaded = AutoAWQ.from_quantized(str(tmp_path / "q"), device="cuda", torch_dtype=torch.float16)
    ids = torch.randint(0, 512, (2, 24), device="cuda")
    with torch.no_grad():
        assert torch.equal(w(input_ids=ids).logits, loaded(input_ids=ids).logits)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3", "phi3"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_block_op_kernels_pass_the_fuse_probes(arch, dtype):
    """On a GPU the fuse probes run the CUDA kernels of the block ops against transformers' code:
    every norm, MLP activation and rotary is replaced (each kernel agreed), the residual add before
    each layer's second norm joins it (but in Phi-3), and the model computes
    what transformers' code computes, up to the kernels' own rounding order."""
    from conftest import tiny_model

    from awqlib import kernels
    from awqlib.arch import get_spec
    from awqlib.fuse import fuse_block_ops
    assert kernels.load(), "CUDA kernels must build on a GPU machine with nvcc"
    plain, fused = (tiny_model(arch).to("cuda", dtype).eval() for _ in range(2))
    counts = fuse_block_ops(fused, get_spec(fused.config.model_type))
    assert counts["rms_norm"] > 0 and counts["gated_mlp"] == 2 and counts["rotary"] == 2, counts
    assert counts["add_rms_norm"] == (0 if arch == "phi3" else 2), counts  # Phi-3: dropout around the add
    ids = torch.randint(0, fused.config.vocab_size, (3, 33), device="cuda")
    with torch.no_grad():
        a, b = plain(input_ids=ids).logits.float(), fused(input_ids=ids).logits.float()
    assert ((a - b).norm() / a.norm()).item() < (2e-3 if dtype == torch.float16 else 2e-2)


def test_block_op_kernel_that_disagrees_is_refused_loudly(monkeypatch, caplog):
    import logging
    from conftest import tiny_model

    from awqlib import blockops
    from awqlib.arch import get_spec
    from awqlib.fuse import fuse_block_ops
    real = blockops.rms_norm
    monkeypatch.setattr(blockops, "rms_norm", lambda x, *a: real(x, *a) * (1.01 if x.is_cuda else 1.0))
    model = tiny_model("llama").to("cuda", torch.float16).eval()
    with caplog.at_level(logging.WARNING, logger="awqlib"):
        counts = fuse_block_ops(model, get_spec("llama"))
    assert counts["rms_norm"] == 0 and counts["rotary"] == 2
    assert "the CUDA kernel of rms_norm disagrees with transformers' code" in caplog.text
