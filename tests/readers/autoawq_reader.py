"""Run under transformers 4.x + AutoAWQ 0.2.9 (their own environment, see scripts/setup_env.sh):
read awqlib checkpoints with AutoAWQ's ``from_quantized`` and with transformers 4.x's AWQ
integration, compute the logits of each reference input, and print one JSON line comparing them
with the logits awqlib computed ({folder: {reader: result}}).

    python autoawq_reader.py CHECKPOINT_FOLDER REFERENCE.safetensors [FOLDER REFERENCE ...]

REFERENCE holds ``input_ids`` and ``logits`` (awqlib's, fp32).  Everything is the readers' own code
path except two environment checks that have nothing to do with the format: both readers send a
CPU load to Intel's IPEX kernels (not installable here), so AutoAWQ is told its best device is a
GPU and transformers' environment check is skipped; both then build the model from config.json,
swap in AutoAWQ's ``WQLinear_GEMM`` and load the tensors by name, and the forward runs AutoAWQ's
CPU path (its own unpacking, ``dequantize_gemm``, then a matmul): the path its quantizer uses.
"""

import json
import sys
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402


def compare(out: torch.Tensor, ref: torch.Tensor) -> dict:
    out, ref = out.float(), ref.float()
    return {"rel": ((out - ref).norm() / ref.norm()).item(), "argmax": (out.argmax(-1) == ref.argmax(-1)).float().mean().item()}


def read(folder: str, reference: str) -> dict:
    ref = load_file(reference)
    ids, logits = ref["input_ids"], ref["logits"]
    import awq.models.base as awq_base
    import awq.modules.linear.gemm as awq_gemm
    awq_base.get_best_device = lambda: "cuda:0"  # not "cpu": that would select IPEX
    awq_gemm.TRITON_AVAILABLE = False            # AutoAWQ's CPU path, not its Triton GPU kernels
    res = {}
    try:
        from awq import AutoAWQForCausalLM
        m = AutoAWQForCausalLM.from_quantized(folder, fuse_layers=False, device_map={"": "cpu"},
                                              torch_dtype=torch.float16)
        with torch.no_grad():
            res["autoawq"] = compare(m.model(input_ids=ids).logits, logits)
    except Exception as e:  # noqa: BLE001 -- reported to the test, which fails on it
        res["autoawq"] = {"error": f"{type(e).__name__}: {e}"}
    try:
        import transformers
        from transformers import AutoModelForCausalLM
        from transformers.quantizers.quantizer_awq import AwqQuantizer
        AwqQuantizer.validate_environment = lambda self, *a, **k: None  # demands CUDA or IPEX
        m = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float16)
        with torch.no_grad():
            res["transformers"] = compare(m(input_ids=ids).logits, logits)
        res["transformers"].update(version=transformers.__version__, rope_theta=getattr(m.config, "rope_theta", None),
                                   rope_scaling=getattr(m.config, "rope_scaling", None))
    except Exception as e:  # noqa: BLE001
        res["transformers"] = {"error": f"{type(e).__name__}: {e}"}
    try:
        from transformers import AutoTokenizer
        res["tokenizer"] = type(AutoTokenizer.from_pretrained(folder)).__name__
    except Exception as e:  # noqa: BLE001 -- a checkpoint written without a tokenizer has none
        res["tokenizer"] = f"{type(e).__name__}"
    return res


if __name__ == "__main__":
    args = sys.argv[1:]
    print(json.dumps({folder: read(folder, ref) for folder, ref in zip(args[::2], args[1::2])}))
