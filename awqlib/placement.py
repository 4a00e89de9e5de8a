"""accelerate placement: planning a device map, sending each tensor where the map puts it, dispatching,
and checking that a placed model's decoder blocks can be quantized where they are."""

from __future__ import annotations

import logging
import os
from collections import Counter
from typing import Callable

import torch
from torch import nn

log = logging.getLogger("awqlib")

DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def plan_device_map(model: nn.Module, device_map: str | dict, max_memory: dict | None, dtype: torch.dtype,
                    offload_folder: str | os.PathLike | None = None) -> dict:
    """accelerate's placement of ``model`` (may be on the meta device): ``infer_auto_device_map`` with
    the model's ``_no_split_modules``, so a decoder block is never cut; a dict is taken as given."""
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    no_split = sorted(getattr(model, "_no_split_modules", None) or [])
    if isinstance(device_map, str):
        if device_map not in DEVICE_MAP_STRATEGIES:
            raise ValueError(f"device_map={device_map!r}: use one of {list(DEVICE_MAP_STRATEGIES)} or a dict "
                             "{module name: device}")
        if device_map != "sequential":
            max_memory = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=no_split,
                                             dtype=dtype, low_zero=device_map == "balanced_low_0")
        device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split,
                                           dtype=dtype)
    device_map = dict(device_map)
    if "disk" in device_map.values() and offload_folder is None:
        raise ValueError("the device_map offloads modules to disk "
                         f"({[k for k, v in device_map.items() if v == 'disk'][:3]}...): pass "
                         "offload_folder=... (a folder for the offloaded tensors), or give max_memory more room")
    log.info("awqlib: placed by accelerate: %s", ", ".join(
        f"{d}: {n} modules" for d, n in Counter(map(str, device_map.values())).items()))
    return device_map


def placer(device_map: dict) -> Callable[[str], torch.device]:
    """name -> the device its tensor is loaded to: the entry of its longest module prefix in the map
    (cpu/disk entries load to the CPU; accelerate offloads them when it dispatches)."""
    def place(name: str) -> torch.device:
        for prefix in _prefixes(name):
            if prefix in device_map:
                d = device_map[prefix]
                return torch.device("cpu") if d in ("cpu", "disk") else torch.device(
                    d if not isinstance(d, int) else f"cuda:{d}")
        raise ValueError(f"the device_map places no module containing {name}; add an entry for it "
                         "(or '' for a default)")
    return place


def _prefixes(name: str):
    parts = name.split(".")
    for i in range(len(parts), -1, -1):
        yield ".".join(parts[:i])


def dispatch_with_accelerate(model: nn.Module, device_map: dict, offload_folder: str | os.PathLike | None) -> None:
    """accelerate's ``dispatch_model`` on a planned map.  Quantized linears hold their tensors as
    buffers, so offloaded modules offload buffers too."""
    from accelerate import dispatch_model
    dispatch_model(model, device_map, offload_dir=offload_folder, offload_buffers=True,
                   skip_keys=getattr(model, "_skip_keys_device_placement", None))


def dispatched(model: nn.Module) -> bool:
    """True where accelerate placed the model (``device_map=...``): device hooks on its modules."""
    return getattr(model, "hf_device_map", None) is not None and any(
        hasattr(m, "_hf_hook") for m in model.modules())


def placed_block_device(block: nn.Module, name: str) -> torch.device:
    """The one device a dispatched model's decoder block lives on (it is quantized there)."""
    devices = {t.device for t in list(block.parameters()) + list(block.buffers())}
    if any(d.type == "meta" for d in devices):
        raise ValueError(
            f"{name} was offloaded to cpu/disk by accelerate (its weights are loaded only during forward), so "
            "it cannot be quantized in place. Load the model with lazy=True instead "
            "(AutoAWQ.from_pretrained(path, lazy=True), then quantize(save_dir=...)): it reads one block at a "
            "time from the safetensors files, with less memory than offloading; or use a device_map that keeps "
            "every decoder block on a GPU.")
    if len(devices) > 1:
        raise ValueError(
            f"{name} is split across devices {sorted(map(str, devices))}: keep each decoder block on one device "
            "(accelerate's no_split_module_classes; transformers' device_map='auto' does that).")
    return devices.pop()
