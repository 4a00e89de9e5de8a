"""Loading an AWQ checkpoint for inference (``AutoAWQ.from_quantized``).

The model is built empty (meta device) from its config, its quantizable linears are swapped for
empty :class:`~awqlib.modules.WQLinear` modules, and every tensor is read from the safetensors
shards straight to the device it belongs on (one device, or accelerate's device map).  Then,
optionally, layers are fused, accelerate dispatches the model, and the quantized linears on CUDA
are repacked into the runtime layout the kernels read fastest.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import kernels
from .arch import ArchSpec, get_spec
from .arch.blocks import empty_quantized_linears, find_blocks
from .checkpoint import load_quantized_state, resolve_folder
from .config import QuantConfig, checkpoint_quant_config
from .modules import repack_for_kernels
from .packing import runtime_layout
from .moe import unfuse_experts
from .placement import available_device, dispatch_with_accelerate, plan_device_map, placer
from .safetensors_io import read_json_object, weight_files
from .userargs import download_arguments

log = logging.getLogger("awqlib")


class NotQuantizedCheckpoint(ValueError):
    """``from_quantized`` was given a checkpoint without a ``quantization_config`` (an fp model)."""


def resolve_dtype(torch_dtype, device: torch.device, config=None) -> torch.dtype:
    """The dtype to load in: ``torch_dtype`` as given, or for "auto"/None fp32 on the CPU (fp16
    matmuls on CPUs are slow and imprecise) and the config's bf16/fp16 elsewhere."""
    if isinstance(torch_dtype, torch.dtype):
        return torch_dtype
    if torch_dtype in (None, "auto"):
        if device.type == "cpu":
            return torch.float32
        cfg = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        return torch.bfloat16 if cfg in (torch.bfloat16, "bfloat16") else torch.float16
    return getattr(torch, str(torch_dtype).replace("torch.", ""))


@dataclass
class LoadedCheckpoint:
    model: nn.Module
    spec: ArchSpec
    quant_config: QuantConfig
    tokenizer: Any
    folder: Path  # the local folder it was read from (a Hub id's snapshot)


def checkpoint_config_file_quant(folder: Path) -> QuantConfig | None:
    """``folder``'s ``config.json`` (read by the checkpoint rules, :func:`read_json_object`): its
    ``quantization_config`` as written, validated before transformers parses the file (which fails
    with an AttributeError on, e.g., a string there); None where there is none."""
    cfg = read_json_object(Path(folder), "config.json")
    qc = cfg.get("quantization_config")
    return None if qc is None else checkpoint_quant_config(qc, Path(folder) / "config.json")


def load_quantized(quant_path: str, device: str | torch.device | None = None, torch_dtype: Any = "auto",
                   fuse_layers: bool = False, trust_remote_code: bool = False, revision: str | None = None,
                   token: str | None = None, device_map: str | dict | None = None,
                   max_memory: dict | None = None, offload_folder: str | os.PathLike | None = None,
                   download_kwargs: dict | None = None) -> LoadedCheckpoint:
    """See :meth:`awqlib.AutoAWQ.from_quantized`."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    runtime_layout()  # a bad $AWQLIB_LAYOUT fails before anything is read or placed, not mid-placement
    folder = resolve_folder(quant_path, **download_arguments(download_kwargs, revision, token))
    try:
        qcfg = checkpoint_config_file_quant(folder)
    except FileNotFoundError:
        raise FileNotFoundError(f"{folder} has no config.json: not a transformers checkpoint folder") from None
    if qcfg is None:
        raise NotQuantizedCheckpoint(f"{folder}/config.json has no quantization_config: this is not a quantized "
                                     "checkpoint. Quantize it first with AutoAWQ.from_pretrained(...).quantize(...)")
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # built unquantized; awqlib's WQLinear then replace its linears
    spec = get_spec(config.model_type)
    if device_map is not None and device is not None:
        raise ValueError(f"from_quantized got both device={device!r} and device_map: pass one (device_map "
                         "places the model over several devices, device puts all of it on one)")
    if device_map is None and (max_memory is not None or offload_folder is not None):
        raise ValueError("max_memory / offload_folder only apply with device_map=... (e.g. device_map='auto')")
    device = available_device(device if device is not None else "cpu")
    if device_map is not None:  # the compute dtype follows the fastest device the map can use
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(torch_dtype, device, config)
    files = weight_files(folder)

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    prefix, blocks = find_blocks(model, spec)
    for i, blk in enumerate(blocks):
        if spec.experts is not None:
            unfuse_experts(blk, spec.experts)
        empty_quantized_linears(blk, spec, qcfg, f"{prefix}.{i}.", device="meta")
    place = None
    if device_map is not None:  # planned on the empty model; each tensor goes to its device as it is read
        device_map = plan_device_map(model, device_map, max_memory, dtype, offload_folder)
        place = placer(device_map)
    elif device.type != "cpu":
        place = lambda name: device  # noqa: E731
    tied = bool(getattr(config, "tie_word_embeddings", False))
    state = load_quantized_state(files, spec, qcfg, dtype=dtype, place=place, expect=model.state_dict(),
                                 optional=("lm_head.weight",) if tied else ())
    expected = set(model.state_dict().keys())
    missing = sorted(k for k in expected - set(state) if not (tied and k == "lm_head.weight"))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"{folder} does not match a {config.model_type} model quantized with {qcfg}: "
                         f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    model.load_state_dict(state, strict=False, assign=True)
    del state
    if tied:
        model.tie_weights()
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if p.device.type == "meta":
            raise ValueError(f"{folder}: tensor {name} was not found in the checkpoint")
    try:  # read by the checkpoint's file rules (a link out of the folder is not the checkpoint's)
        gen = read_json_object(folder, "generation_config.json")
    except FileNotFoundError:
        gen = None
    except ValueError as e:  # generation defaults are a convenience, never a reason to fail
        log.warning("awqlib: %s; the model keeps transformers' default generation config", e)
        gen = None
    if gen is not None:
        try:
            model.generation_config = GenerationConfig.from_dict(gen)
        except (TypeError, ValueError) as e:
            log.warning("awqlib: %s/generation_config.json is not a valid generation config (%s); the model keeps "
                        "transformers' default", folder, e)
    model.config.quantization_config = qcfg.to_hf_dict()
    tokenizer = None
    try:
        from transformers import AutoTokenizer
        if (folder / "tokenizer_config.json").exists() or (folder / "tokenizer.json").exists():
            tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as e:  # a tokenizer is a convenience here, never a reason to fail; but it is there and broken
        log.warning("awqlib: the tokenizer in %s did not load, model.tokenizer is None (%s: %s)", folder,
                    type(e).__name__, e)
    if fuse_layers:  # before placement: accelerate then offloads the fused tensors like any other
        from .fuse import fuse_layers as fuse
        fuse(model, spec)
    if device_map is not None:
        dispatch_with_accelerate(model, device_map, offload_folder)
        model.eval()
    else:
        model.to(device).eval()
    used = {t.device for t in (*model.parameters(), *model.buffers()) if t.device.type != "meta"}
    for d in sorted(used, key=str):
        kernels.announce(d)
    repack_for_kernels(model)
    return LoadedCheckpoint(model, spec, qcfg, tokenizer, folder)
