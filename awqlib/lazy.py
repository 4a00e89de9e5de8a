"""Quantize models bigger than memory: weights are read from the safetensors shards one block at a
time, and quantized blocks are written to disk as they finish (which also makes runs resumable).

Peak memory is about one block (in the compute dtype) plus the calibration activations, not the
model: the model is built on the meta device and a module's tensors are materialised only while
it is being worked on.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .arch import ArchSpec
from .checkpoint import SAFE_INDEX, safetensors_files, to_checkpoint_name


class ShardReader:
    """Tensor-by-tensor access to a folder of safetensors shards (nothing is read up front)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.where: dict[str, Path] = {}
        for f in safetensors_files(self.folder):
            with safe_open(str(f), framework="pt") as fh:
                for k in fh.keys():
                    self.where[k] = f

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str) -> torch.Tensor:
        return self.get_many([name])[name]

    def get_many(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Read tensors, opening each shard once and closing it after: a shard kept open stays
        memory-mapped, and every page read from it would count towards the process's memory."""
        missing = [n for n in names if n not in self.where]
        if missing:
            raise KeyError(f"tensors {missing[:3]} are not in the checkpoint {self.folder}")
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.where[n], []).append(n)
        out = {}
        for f, keys in by_file.items():
            with safe_open(str(f), framework="pt") as fh:
                for k in keys:
                    out[k] = fh.get_tensor(k).clone()  # detach from the mapping
        return out


def materialize(module: nn.Module, prefix: str, reader: ShardReader, spec: ArchSpec, dtype: torch.dtype) -> None:
    """Load ``module``'s persistent tensors (checkpoint names ``prefix + name``) from ``reader``."""
    wanted = {}
    for name, t in module.state_dict(keep_vars=True).items():
        ckpt = to_checkpoint_name(prefix + name, spec)
        if t.device.type == "meta" and ckpt in reader:
            wanted[ckpt] = name
    state = {}
    for ckpt, v in reader.get_many(list(wanted)).items():
        state[wanted[ckpt]] = v.to(dtype) if v.is_floating_point() else v
    module.load_state_dict(state, strict=False, assign=True)


def free(module: nn.Module) -> None:
    """Drop a module's tensors (back to the meta device)."""
    for mod in module.modules():
        for n, p in list(mod._parameters.items()):
            if p is not None:
                mod._parameters[n] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
        for n, b in list(mod._buffers.items()):
            if b is not None and n in mod.state_dict(keep_vars=True) and n not in mod._non_persistent_buffers_set:
                mod._buffers[n] = torch.empty_like(b, device="meta")


_libc = None


def _get_libc():
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        except OSError:
            _libc = False
    return _libc or None


def release_memory() -> None:
    """Give freed heap memory back to the OS.  glibc keeps the pages of freed tensors for reuse, so
    without this the process's RSS stays at the largest block's peak plus fragmentation, block
    after block; with it, RSS between blocks follows what is actually live.  A no-op where libc
    has no ``malloc_trim`` (musl, macOS, Windows).

    Within a block glibc's heap still fragments (its mmap threshold adapts upwards to the tensor
    sizes it sees); starting the process with ``MALLOC_MMAP_THRESHOLD_=8388608`` makes every
    allocation of 8 MB or more its own mapping, returned on free: measured 42% -> 33% of the model
    size at peak for a 3.96 GB model, ~30% more wall time (benchmarks/RESULTS.md).  Setting it with
    mallopt() at run time did not have that effect (measured), so it is an environment variable."""
    gc.collect()
    libc = _get_libc()
    trim = getattr(libc, "malloc_trim", None) if libc else None
    if trim is not None:
        trim(0)


# ---------------------------------------------------------------------------------------------- output

PARTIAL_SUFFIX = ".awqlib-partial"


def fingerprint(**parts) -> str:
    h = hashlib.sha256()
    for k in sorted(parts):
        v = parts[k]
        if isinstance(v, torch.Tensor):
            h.update(k.encode())
            h.update(v.cpu().numpy().tobytes())
        else:
            h.update(f"{k}={v!r};".encode())
    return h.hexdigest()[:16]


class BlockStore:
    """Finished blocks, one safetensors file each, in ``<out>.awqlib-partial/``.

    A rerun with the same output folder and the same settings (fingerprint) picks up where the
    last one stopped; different settings are refused rather than mixed.
    """

    def __init__(self, out_dir: str | os.PathLike, fp: str, n_blocks: int, overwrite: bool):
        self.out = Path(out_dir)
        if self.out.exists() and not overwrite:
            raise FileExistsError(f"{self.out} already exists; pass overwrite=True to replace it")
        self.dir = self.out.parent / (self.out.name + PARTIAL_SUFFIX)
        self.n = n_blocks
        self.fp = fp
        meta = self.dir / "run.json"
        if self.dir.exists() and meta.exists():
            old = json.loads(meta.read_text())
            if old.get("fingerprint") != fp:
                if not overwrite:
                    raise FileExistsError(
                        f"{self.dir} holds an interrupted run with different settings (model, quant config, "
                        "options or calibration data); pass overwrite=True to discard it and start over")
                import shutil
                shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        meta.write_text(json.dumps({"fingerprint": fp, "n_blocks": n_blocks}))

    def name(self, i: int) -> str:
        return f"model-{i + 1:05d}-of-{self.n + 1:05d}.safetensors"

    def done(self, i: int) -> bool:
        return (self.dir / self.name(i)).exists()

    def write(self, i: int, tensors: dict[str, torch.Tensor]) -> None:
        tmp = self.dir / (self.name(i) + ".tmp")
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"format": "pt"})
        os.replace(tmp, self.dir / self.name(i))  # atomic: a block file is complete or absent

    def read(self, i: int) -> dict[str, torch.Tensor]:
        out = {}
        with safe_open(str(self.dir / self.name(i)), framework="pt") as fh:
            for k in fh.keys():
                out[k] = fh.get_tensor(k)
        return out

    def finalize(self, rest: dict[str, torch.Tensor], write_extras) -> None:
        """Write the non-block tensors, the index and ``write_extras(folder)`` (config, tokenizer,
        card), then rename the folder into place."""
        last = self.dir / self.name(self.n)
        save_file({k: v.contiguous() for k, v in rest.items()}, str(last), metadata={"format": "pt"})
        weight_map, total = {}, 0
        for i in range(self.n + 1):
            with safe_open(str(self.dir / self.name(i)), framework="pt") as fh:
                for k in fh.keys():
                    weight_map[k] = self.name(i)
                    sl = fh.get_slice(k)
                    n = 1
                    for d in sl.get_shape():
                        n *= d
                    total += n * {"I32": 4, "F16": 2, "BF16": 2, "F32": 4}.get(sl.get_dtype(), 4)
        (self.dir / SAFE_INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                                       "weight_map": weight_map}, indent=2, sort_keys=True))
        write_extras(self.dir)
        (self.dir / "run.json").unlink()
        if self.out.exists():
            import shutil
            shutil.rmtree(self.out)
        os.rename(self.dir, self.out)
