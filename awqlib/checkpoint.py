"""Reading and writing AWQ checkpoints (safetensors only, atomically)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable

import torch

from .arch import ArchSpec
from .config import QuantConfig
from .outputs import AtomicDir  # noqa: F401  (re-exported: its home was here)
from .packing import gemv_to_gemm
from .safetensors_io import (SAFE_INDEX, TAG_OF, check_expected, iter_tensors, parse_size, plan_shards,  # noqa: F401
                             save_tensors, shard_names, tensor_index, weight_files, write_index)

log = logging.getLogger("awqlib")


def to_checkpoint_name(name: str, spec: ArchSpec) -> str:
    for mod, ckpt in spec.checkpoint_renames:
        name = name.replace(mod, ckpt)
    return name


def from_checkpoint_name(name: str, spec: ArchSpec) -> str:
    for mod, ckpt in spec.checkpoint_renames:
        name = name.replace(ckpt, mod)
    return name


# ---------------------------------------------------------------------------------------------- writing

def checkpoint_state(model: torch.nn.Module, spec: ArchSpec, skip_prefix: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors to save, checkpoint-named; floats in fp16, tied lm_head left out, and so are the
    tensors of modules marked ``runtime_only`` (a runtime rearrangement of tensors that other modules
    export, e.g. fused linears)."""
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    runtime = tuple(f"{n}." for n, m in model.named_modules() if getattr(m, "runtime_only", False))
    state = {}
    for name, t in model.state_dict().items():
        if (tied and name == "lm_head.weight") or (skip_prefix and name.startswith(skip_prefix)):
            continue
        if runtime and name.startswith(runtime):
            continue
        if t.is_floating_point():
            t = t.to(torch.float16)
        state[to_checkpoint_name(name, spec)] = t.detach().to("cpu").contiguous()
    return state


def write_shards(state: dict[str, torch.Tensor], folder: Path, max_shard_size: int | str = "5GB") -> list[str]:
    """``state`` as transformers lays it out: one ``model.safetensors``, or shards of at most
    ``max_shard_size`` plus the index."""
    order = sorted(state)
    shards = plan_shards([(k, state[k].numel() * state[k].element_size()) for k in order], parse_size(max_shard_size))
    names = shard_names(len(shards))
    weight_map = {}
    for fname, shard in zip(names, shards):
        save_tensors({k: state[k] for k in shard}, folder / fname)
        weight_map.update({k: fname for k in shard})
    if len(shards) > 1:
        write_index(folder, weight_map, sum(t.numel() * t.element_size() for t in state.values()))
    return names


def quantized_config_dict(config, qcfg: QuantConfig) -> dict[str, Any]:
    d = config.to_dict()
    d.pop("quantization_config", None)
    d["quantization_config"] = qcfg.to_hf_dict()
    d["torch_dtype"] = "float16"
    if "dtype" in d:
        d["dtype"] = "float16"
    d["use_cache"] = True
    return d


# ---------------------------------------------------------------------------------------------- reading

def resolve_folder(path_or_id: str | os.PathLike, revision: str | None = None, token: str | None = None) -> Path:
    p = Path(path_or_id)
    if p.is_dir():
        return p
    if p.exists():
        raise NotADirectoryError(f"{p} is a file; pass the checkpoint folder")
    if str(path_or_id).count("/") == 1 and not str(path_or_id).startswith((".", "/")):
        from huggingface_hub import snapshot_download
        try:
            return Path(snapshot_download(str(path_or_id), revision=revision, token=token,
                                          allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
        except Exception as e:
            raise OSError(f"{path_or_id!r} is not a local folder and could not be downloaded from the Hugging Face "
                          f"Hub ({type(e).__name__}: {e})") from None
    raise FileNotFoundError(f"checkpoint folder {p} does not exist")


safetensors_files = weight_files  # the name earlier releases exported


def load_quantized_state(files: list[Path], spec: ArchSpec, qcfg: QuantConfig, dtype: torch.dtype | None = None,
                         place: Callable[[str], torch.device] | None = None,
                         expect: dict[str, torch.Tensor] | None = None, optional: tuple[str, ...] = ()
                         ) -> dict[str, torch.Tensor]:
    """All tensors, module-named, GEMV layouts converted to GEMM.

    ``expect``: the model's (meta) state dict; every header is checked against it (names, dtypes,
    GEMM shapes) before any tensor data is read; ``optional``: names that may be absent.

    ``dtype``: floating tensors other than ``scales`` (which the format keeps in fp16) are cast to it.
    ``place(name)``: the device each tensor goes to as soon as it is read, before any cast: safetensors
    maps the file without copying, so a load onto a GPU makes no host copy of the model (a GEMV
    module's three tensors are converted on the host first)."""
    state: dict[str, torch.Tensor] = {}
    pending: dict[str, dict[str, torch.Tensor]] = {}  # GEMV: a module's tensors until all three are read

    def put(name: str, t: torch.Tensor) -> None:
        if place is not None:
            t = t.to(place(name))
        if dtype is not None and t.is_floating_point() and not name.endswith(".scales"):
            t = t.to(dtype)
        state[name] = t

    where = tensor_index(files)
    if expect is not None:
        gemv = qcfg.version == "gemv"
        check_expected(where, {to_checkpoint_name(k, spec): (
            TAG_OF[str(t.dtype).replace("torch.", "")],
            None if gemv and k.endswith((".qweight", ".qzeros", ".scales")) else tuple(t.shape))
            for k, t in expect.items()}, files[0].parent if files else "the checkpoint",
            optional=[to_checkpoint_name(k, spec) for k in optional])
    for k, t in iter_tensors(files, where):
        name = from_checkpoint_name(k, spec)
        prefix, _, leaf = name.rpartition(".")
        if qcfg.version != "gemv" or leaf not in ("qweight", "qzeros", "scales"):
            put(name, t)
            continue
        parts = pending.setdefault(prefix, {})
        parts[leaf] = t
        if len(parts) == 3:
            del pending[prefix]
            converted = gemv_to_gemm(parts["qweight"], parts["qzeros"], parts["scales"], qcfg.group_size, qcfg.bits)
            for leaf, t in zip(("qweight", "qzeros", "scales"), converted):
                put(f"{prefix}.{leaf}", t)
    if pending:
        name = next(iter(pending))
        raise ValueError(f"GEMV checkpoint: {name} lacks {sorted({'qweight', 'qzeros', 'scales'} - set(pending[name]))}")
    return state
