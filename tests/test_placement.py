"""Device placement with accelerate: a model placed by ``device_map`` is quantized block by block on
the devices it lives on (hooks intact, same checkpoint as the unplaced run), and a quantized
checkpoint loads over several devices, the CPU and the disk with the same logits.

Hooks on the CPU exercise the whole path here; the multi-GPU cases need two GPUs and skip without."""

import json

import pytest
import torch
from accelerate import dispatch_model

from awqlib import AutoAWQ
from awqlib.arch import get_spec
from awqlib.checkpoint import load_quantized_state, safetensors_files
from awqlib.config import QuantConfig
from awqlib.placement import placer
from conftest import assert_same_checkpoint, tiny_model

QC = {"q_group_size": 64}
KW = dict(n_samples=16, seqlen=64)


def _device_map(devices):
    """Embeddings with the first block, the norm/rotary/head with the last; block i on devices[i]."""
    return {"model.embed_tokens": devices[0], **{f"model.layers.{i}": d for i, d in enumerate(devices)},
            "model.norm": devices[-1], "model.rotary_emb": devices[-1], "lm_head": devices[-1]}


@pytest.fixture(params=["llama"])
def src(tmp_path, request):
    path = tmp_path / f"src-{request.param}"
    tiny_model(request.param).half().save_pretrained(path)
    return path


def _placed(path, device_map, **kw):
    w = AutoAWQ.from_pretrained(str(path))
    dispatch_model(w.model, device_map, force_hooks=True, **kw)
    return w


@pytest.mark.parametrize("src", ["llama", "mixtral"], indirect=True)  # dense, and experts unfused in place
def test_quantize_on_placed_model_equals_unplaced(src, tmp_path, calib_ids):
    plain = AutoAWQ.from_pretrained(str(src))
    plain.quantize(None, QC, calib_data=list(calib_ids), device="cpu", **KW)  # where the placed blocks compute
    plain.save_quantized(tmp_path / "plain")

    placed = _placed(src, _device_map(["cpu", "cpu"]))
    blocks = placed.model.model.layers
    assert all(hasattr(b, "_hf_hook") for b in blocks)
    placed.quantize(None, QC, calib_data=list(calib_ids), **KW)
    # the hooks survive the calibration capture (which swaps every block's forward for a while)
    assert all("forward" in b.__dict__ and hasattr(b, "_hf_hook") for b in blocks)
    placed.save_quantized(tmp_path / "placed")
    assert_same_checkpoint(tmp_path / "plain", tmp_path / "placed")
    with torch.no_grad():
        assert torch.equal(plain(input_ids=calib_ids[:2]).logits, placed(input_ids=calib_ids[:2]).logits)


def test_quantize_refuses_offloaded_blocks(src, tmp_path, calib_ids):
    w = _placed(src, _device_map(["cpu", "disk"]), offload_dir=str(tmp_path / "offload"))
    with pytest.raises(ValueError, match=r"model\.layers\.1 was offloaded.*lazy=True"):
        w.quantize(None, QC, calib_data=list(calib_ids), **KW)


def test_quantize_refuses_device_other_than_placement(src, calib_ids):
    w = _placed(src, _device_map(["cpu", "cpu"]))
    with pytest.raises(ValueError, match="placed by accelerate.*cannot be honoured"):
        w.quantize(None, QC, calib_data=list(calib_ids), device="cuda", **KW)


def test_lazy_refuses_device_map(src):
    with pytest.raises(ValueError, match=r"lazy=True .*\['device_map'\] do not apply"):
        AutoAWQ.from_pretrained(str(src), lazy=True, device_map="auto")


def test_quantize_refuses_split_block(src, calib_ids):
    w = _placed(src, _device_map(["cpu", "cpu"]))
    w.model.model.layers[1].mlp.to(torch.device("meta"))  # stands in for a block cut in two by a custom map
    with pytest.raises(ValueError, match=r"model\.layers\.1 .*(offloaded|split)"):
        w.quantize(None, QC, calib_data=list(calib_ids), **KW)


@pytest.fixture
def quantized(src, tmp_path, calib_ids):
    w = AutoAWQ.from_pretrained(str(src))
    w.quantize(None, QC, method="rtn")
    w.save_quantized(tmp_path / "q")
    return tmp_path / "q"


def test_from_quantized_device_map(quantized, tmp_path, calib_ids):
    ref = AutoAWQ.from_quantized(str(quantized), device="cpu")
    # the CPU alone, also where a GPU is there (which "auto" would fill first)
    cpu_only = {"max_memory": {"cpu": "4GiB"}} if torch.cuda.is_available() else {}
    auto = AutoAWQ.from_quantized(str(quantized), device_map="auto", **cpu_only)
    assert set(auto.model.hf_device_map.values()) == {"cpu"}
    disk = AutoAWQ.from_quantized(str(quantized), device_map=_device_map(["cpu", "disk"]),
                                  offload_folder=str(tmp_path / "offload"))
    # the offloaded block holds nothing until it runs: its quantized buffers come from the disk
    assert all(b.device.type == "meta" for b in disk.model.model.layers[1].buffers())
    fused = AutoAWQ.from_quantized(str(quantized), device_map=_device_map(["cpu", "disk"]),
                                   offload_folder=str(tmp_path / "offload-fused"), fuse_layers=True)
    assert any(".fused_" in n for n in fused.model.state_dict())
    ids = calib_ids[:2]
    with torch.no_grad():
        r = ref(input_ids=ids).logits
        assert torch.equal(auto(input_ids=ids).logits, r)
        assert torch.equal(disk(input_ids=ids).logits, r)
        torch.testing.assert_close(fused(input_ids=ids).logits, r, rtol=1e-4, atol=1e-4)
    g_ref = ref.generate(input_ids=ids[:1, :8], max_new_tokens=4, do_sample=False)
    assert torch.equal(disk.generate(input_ids=ids[:1, :8], max_new_tokens=4, do_sample=False), g_ref)


def test_from_quantized_device_map_errors(quantized):
    with pytest.raises(ValueError, match="both device="):
        AutoAWQ.from_quantized(str(quantized), device="cpu", device_map="auto")
    with pytest.raises(ValueError, match="offload_folder"):
        AutoAWQ.from_quantized(str(quantized), device_map=_device_map(["cpu", "disk"]))
    with pytest.raises(ValueError, match="device_map='fastest'"):
        AutoAWQ.from_quantized(str(quantized), device_map="fastest")
    with pytest.raises(ValueError, match="only apply with device_map"):
        AutoAWQ.from_quantized(str(quantized), max_memory={"cpu": "1GiB"})


# ------------------------------------------------------------------------------------------------ GPUs

one_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")


@pytest.mark.gpu
@two_gpus
def test_quantize_across_two_gpus_equals_one(src, tmp_path, calib_ids):
    one = _placed(src, _device_map([0, 0]))
    one.quantize(None, QC, calib_data=list(calib_ids), **KW)
    one.save_quantized(tmp_path / "one")
    two = AutoAWQ.from_pretrained(str(src), device_map=_device_map([0, 1]))
    assert {p.device.index for p in two.model.parameters()} == {0, 1}
    two.quantize(None, QC, calib_data=list(calib_ids), **KW)
    assert two.model.model.layers[1].mlp.down_proj.qweight.device == torch.device("cuda", 1)
    two.save_quantized(tmp_path / "two")
    assert_same_checkpoint(tmp_path / "one", tmp_path / "two")


@pytest.mark.gpu
@two_gpus
def test_from_quantized_across_two_gpus(quantized, calib_ids):
    one = AutoAWQ.from_quantized(str(quantized), device="cuda:0", torch_dtype=torch.float16)
    two = AutoAWQ.from_quantized(str(quantized), device_map=_device_map([0, 1]), torch_dtype=torch.float16)
    assert two.model.model.layers[1].mlp.down_proj.qweight.device == torch.device("cuda", 1)
    with torch.no_grad():
        a = one(input_ids=calib_ids[:2].cuda()).logits.float().cpu()
        b = two(input_ids=calib_ids[:2].cuda()).logits.float().cpu()
    assert torch.equal(a, b)


@pytest.mark.gpu
@one_gpu
def test_from_quantized_gpu_with_cpu_offload(quantized, calib_ids):
    """A block offloaded to the CPU runs on the GPU with its buffers brought over per forward."""
    gpu = AutoAWQ.from_quantized(str(quantized), device="cuda", torch_dtype=torch.float16)
    mixed = AutoAWQ.from_quantized(str(quantized), device_map=_device_map([0, "cpu"]), torch_dtype=torch.float16)
    assert all(b.device.type == "meta" for b in mixed.model.model.layers[1].buffers())
    with torch.no_grad():
        a = gpu(input_ids=calib_ids[:2].cuda()).logits.float().cpu()
        b = mixed(input_ids=calib_ids[:2].cuda()).logits.float().cpu()
    # the offloaded block's linears keep the GEMM layout (another kernel than the tiled one): close, not equal
    assert ((a - b).norm() / a.norm()).item() < 1e-2


@pytest.mark.gpu
@one_gpu
def test_quantize_on_placed_gpu_model(src, tmp_path, calib_ids):
    w = _placed(src, _device_map([0, 0]))
    w.quantize(None, QC, calib_data=list(calib_ids), **KW)
    assert all(hasattr(b, "_hf_hook") for b in w.model.model.layers)
    assert all(t.is_cuda for t in w.model.model.layers[1].buffers())
    with torch.no_grad():
        assert torch.isfinite(w(input_ids=calib_ids[:2].cuda()).logits).all()


def test_loader_places_each_tensor_as_it_is_read(quantized):
    """from_quantized's loader hands every tensor to ``place`` right after reading it (the host never
    holds the whole model): sent to the meta device here, nothing stays behind, dtypes are cast."""
    cfg = json.loads((quantized / "config.json").read_text())
    seen = []

    def place(name):
        seen.append(name)
        return torch.device("meta")

    state = load_quantized_state(safetensors_files(quantized), get_spec(cfg["model_type"]),
                                 QuantConfig.from_checkpoint(cfg["quantization_config"]), dtype=torch.bfloat16, place=place)
    assert sorted(seen) == sorted(state) and all(t.device.type == "meta" for t in state.values())
    assert state["model.norm.weight"].dtype == torch.bfloat16
    assert state["model.layers.0.mlp.up_proj.scales"].dtype == torch.float16  # the format's dtype, kept
    assert state["model.layers.0.mlp.up_proj.qweight"].dtype == torch.int32


def test_placer_resolves_module_prefixes():
    place = placer({"model.embed_tokens": 0, "model.layers.0": "cuda:1", "model.layers.1": "disk", "": "cpu"})
    assert place("model.embed_tokens.weight") == torch.device("cuda:0")
    assert place("model.layers.0.mlp.up_proj.qweight") == torch.device("cuda:1")
    assert place("model.layers.1.self_attn.q_proj.scales") == torch.device("cpu")  # offloaded at dispatch
    assert place("lm_head.weight") == torch.device("cpu")
    with pytest.raises(ValueError, match="places no module containing lm_head.weight"):
        placer({"model": 0})("lm_head.weight")
