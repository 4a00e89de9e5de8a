"""Reading and writing AWQ checkpoints (safetensors only, atomically)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .arch import ArchSpec
from .config import QuantConfig
from .packing import gemv_to_gemm

log = logging.getLogger("awqlib")

SAFE_INDEX = "model.safetensors.index.json"


def parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    s = size.strip().upper()
    for unit, mult in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


def to_checkpoint_name(name: str, spec: ArchSpec) -> str:
    for mod, ckpt in spec.checkpoint_renames:
        name = name.replace(mod, ckpt)
    return name


def from_checkpoint_name(name: str, spec: ArchSpec) -> str:
    for mod, ckpt in spec.checkpoint_renames:
        name = name.replace(ckpt, mod)
    return name


# ---------------------------------------------------------------------------------------------- writing

class AtomicDir:
    """Write into a temporary sibling folder; rename into place only when everything succeeded."""

    def __init__(self, target: str | os.PathLike, overwrite: bool = False):
        self.target = Path(target)
        if self.target.exists() and not overwrite:
            raise FileExistsError(f"{self.target} already exists; pass overwrite=True (CLI: --overwrite) to "
                                  "replace it, or choose another folder")
        if self.target.exists() and not self.target.is_dir():
            raise NotADirectoryError(f"{self.target} exists and is not a folder")
        self.tmp = self.target.parent / f".{self.target.name}.tmp-{uuid.uuid4().hex[:8]}"

    def __enter__(self) -> Path:
        self.tmp.mkdir(parents=True)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        old = None
        if self.target.exists():
            old = self.target.parent / f".{self.target.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(self.target, old)
        os.rename(self.tmp, self.target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return False


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
    limit = parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(state):
        n = state[name].numel() * state[name].element_size()
        if shards[-1] and size + n > limit:
            shards.append({})
            size = 0
        shards[-1][name] = state[name]
        size += n
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for fname, shard in zip(names, shards):
        save_file(shard, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in state.values())
        (folder / SAFE_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                    indent=2, sort_keys=True))
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


def safetensors_files(folder: Path) -> list[Path]:
    idx = folder / SAFE_INDEX
    if idx.exists():
        try:
            wm = json.loads(idx.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise ValueError(f"{idx} is not a valid safetensors index ({e})") from None
        files = sorted({folder / f for f in wm.values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise FileNotFoundError(f"{folder} is incomplete: the index lists {missing} which are missing; "
                                    "re-download or re-save the checkpoint")
        return files
    # prefer the transformers naming: other .safetensors files may sit beside the weights
    files = sorted(folder.glob("model*.safetensors")) or sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = [f.name for f in folder.glob("*.bin")] + [f.name for f in folder.glob("*.pt")]
        hint = (f" It holds {pickles}: awqlib never unpickles weights (arbitrary code execution); convert them to "
                "safetensors first.") if pickles else ""
        raise FileNotFoundError(f"no .safetensors weights in {folder}.{hint}")
    return files


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as fh:
                for k in fh.keys():
                    yield k, fh.get_tensor(k)
        except Exception as e:
            if isinstance(e, (KeyboardInterrupt, MemoryError)):
                raise
            raise ValueError(f"{f} is corrupt or not a safetensors file ({type(e).__name__}: {e}); "
                             "re-download or re-save the checkpoint") from None


def load_quantized_state(files: list[Path], spec: ArchSpec, qcfg: QuantConfig, dtype: torch.dtype | None = None,
                         place: Callable[[str], torch.device] | None = None) -> dict[str, torch.Tensor]:
    """All tensors, module-named, GEMV layouts converted to GEMM.

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

    for k, t in iter_tensors(files):
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
