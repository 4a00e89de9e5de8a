"""Quantize models bigger than memory: weights are read from the safetensors shards one block at a
time, and quantized blocks are written to disk as they finish (:mod:`awqlib.resume`).

Peak memory is about one block (in the compute dtype) plus the calibration activations, not the
model: the model is built on the meta device and a module's tensors are materialised only while
it is being worked on.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import os
from pathlib import Path

import torch
from torch import nn

from .arch import ArchSpec
from .checkpoint import to_checkpoint_name
from .safetensors_io import check_expected, read_tensors, tag_of, tensor_index, weight_files

log = logging.getLogger("awqlib")


class ShardReader:
    """Tensor-by-tensor access to a folder of safetensors shards (nothing is read up front)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.index = tensor_index(weight_files(self.folder))  # validated headers: {name: (file, entry)}
        self.where: dict[str, Path] = {k: f for k, (f, _) in self.index.items()}

    def check_against(self, model: nn.Module, spec: ArchSpec) -> None:
        """Refuse, before any work, a source whose tensors are not the (meta) ``model``'s: a missing
        tensor, or one of the wrong dtype or shape, would otherwise fail only when its block is
        reached, or write a checkpoint that does not load. Tensors the model does not have are left
        out of the output (transformers ignores them too): logged."""
        expected = {to_checkpoint_name(k, spec): (tag_of(t), tuple(t.shape))
                    for k, t in model.state_dict().items()}
        unused = sorted(set(self.index) - set(expected))
        if unused:
            log.warning("awqlib: %s holds %d tensor(s) the model does not use, left out of the output: %s",
                        self.folder, len(unused), unused[:5])
        tied = bool(getattr(model.config, "tie_word_embeddings", False))
        check_expected({k: v for k, v in self.index.items() if k in expected}, expected, self.folder,
                       optional=[to_checkpoint_name("lm_head.weight", spec)] if tied else [])

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
            out.update(read_tensors(f, keys))
        return out


def materialize(module: nn.Module, prefix: str, reader: ShardReader, spec: ArchSpec, dtype: torch.dtype,
                on_cast=None) -> None:
    """Load ``module``'s persistent tensors (checkpoint names ``prefix + name``) from ``reader``.
    ``on_cast(prefix + name, tensor)`` sees each floating tensor stored in a dtype other than ``dtype``,
    as stored, before its cast."""
    wanted = {}
    for name, t in module.state_dict(keep_vars=True).items():
        ckpt = to_checkpoint_name(prefix + name, spec)
        if t.device.type == "meta" and ckpt in reader:
            wanted[ckpt] = name
    state = {}
    for ckpt, v in reader.get_many(list(wanted)).items():
        if v.is_floating_point() and v.dtype != dtype and on_cast is not None:
            on_cast(prefix + wanted[ckpt], v)
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
