"""Resumable runs: finished blocks kept on disk in ``<out>.awqlib-partial/``, one file each, so that a
rerun of an interrupted command continues where it stopped; at the end they are consolidated into
the checkpoint's shards.

What keeps a resume from mixing data:

* a fingerprint of everything the blocks depend on, the source's *content* included (each weight
  file's tensor names, shapes, dtypes, size, mtime and a sample of its bytes for a lazy run; every
  tensor's bytes for a model in memory), the settings and the calibration tokens; a rerun
  with another fingerprint is refused, never mixed;
* an exclusive lock (``flock``) on a file in the partial folder, held for the whole run: a second
  run into the same output fails at once, naming the holder's pid; the kernel releases the lock
  when its holder dies, so a killed run never blocks its rerun;
* ``run.json`` written atomically, just before the first block file (a start that failed earlier
  leaves nothing that refuses the corrected command); every finished block file's header is
  checked against its size when resuming, and a damaged one is quantized again;
* a full disk is reported with what is kept and that a rerun resumes.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Callable

import torch

from .checkpoint import remote_code_files
from .outputs import (Overwrite, absolute, check_output, leftover_path, partial_path, recover_leftovers, remove_tree,
                      swap_into_place)
from .safetensors_io import (TensorInfo, copy_tensors, read_json_object, parse_size, plan_shards, read_header, read_tensors,
                             save_tensors, shard_names, weight_files, write_index, write_json_atomic)

log = logging.getLogger("awqlib")

PARTIAL_SUFFIX = ".awqlib-partial"
LOCK_FILE = ".lock"
RUN_FILE = "run.json"
STAGING = "checkpoint.tmp"
SAMPLE_BYTES = 1 << 20


def fingerprint(**parts) -> str:
    h = hashlib.sha256()
    for k in sorted(parts):
        v = parts[k]
        if isinstance(v, torch.Tensor):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        else:
            h.update(f"{k}={v!r};".encode())
    return h.hexdigest()[:16]


# What each part of a run's fingerprint is, as a refusal names it.
PARTS = {"source": "source weights", "config": "model config", "code": "remote code (*.py)",
         "qcfg": "quant config", "opts": "options", "method": "method", "tokens": "calibration tokens",
         "dtype": "compute dtype", "model_dtype": "model dtype", "n_blocks": "number of blocks",
         "awqlib": "awqlib version", "transformers": "transformers version"}


def fingerprint_parts(**parts) -> dict[str, str]:
    """One digest per part, so that a refusal can name the parts that changed."""
    return {k: fingerprint(**{k: v}) for k, v in parts.items()}


def config_identity(config) -> str:
    """A model config as the blocks see it (in-memory overrides included), without its origin path."""
    d = config.to_dict()
    d.pop("_name_or_path", None)
    return json.dumps(d, sort_keys=True, default=str)


def code_identity(folder: Path | None) -> str:
    """The digests of the source folder's remote code (:func:`checkpoint.remote_code_files`: the
    ``*.py`` files of a model whose ``auto_map`` names code); other scripts beside the weights run
    nothing and do not count."""
    return ";".join(f"{rel}:{hashlib.sha256((folder / rel).read_bytes()).hexdigest()}"
                    for rel in remote_code_files(folder) if (folder / rel).is_file())


def folder_identity(folder: Path) -> str:
    """What a source folder's weights are, without reading them all: per weight file its name, size,
    mtime, header (tensor names, shapes, dtypes) and its first and last MiB of data."""
    h = hashlib.sha256()
    for f in weight_files(folder):
        st = os.stat(f)
        header, _ = read_header(f)
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
        h.update(json.dumps({k: [t.dtype, t.shape] for k, t in sorted(header.items())}).encode())
        with open(f, "rb") as fh:
            h.update(fh.read(SAMPLE_BYTES))
            fh.seek(max(0, st.st_size - SAMPLE_BYTES))
            h.update(fh.read(SAMPLE_BYTES))
    return h.hexdigest()


def model_identity(model: torch.nn.Module) -> str:
    """The digest of every tensor of an in-memory model, bytes included. A full hash, not a sample:
    a merged LoRA or an edited layer may change a few values anywhere.  SHA-256 runs at about 1 GB/s
    (0.25 s for a 135M model in fp16, minutes for a 70B one: small beside AWQ's search, not beside
    round-to-nearest).  Tied tensors are hashed once; tensors on the meta device (offloaded to disk by
    accelerate) only by name, dtype and shape."""
    h = hashlib.sha256()
    seen: dict[tuple, str] = {}
    for name, t in model.state_dict().items():
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        if t.device.type == "meta":
            continue
        key = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        if key in seen and t.numel():
            h.update(f"={seen[key]};".encode())  # the same tensor under another name (tied weights)
            continue
        seen[key] = name
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())  # 0-dim too
    return h.hexdigest()


def source_identity(lazy_folder: Path | None, model: torch.nn.Module) -> str:
    """What the blocks are quantized from: the folder a lazy run reads them from, else the tensors in
    memory (never their folder: a model may have been changed since it was loaded)."""
    return folder_identity(lazy_folder) if lazy_folder is not None else model_identity(model)


class OutputLocked(RuntimeError):
    """Another run holds the output's lock."""


class RunLock:
    """An exclusive ``flock`` on ``path``, for as long as this object is open."""

    def __init__(self, path: Path, what: Path):
        self.path = path
        try:  # never through a link: the pid is written into the file
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            st = os.fstat(self.fd)
        except OSError as e:
            if e.errno != errno.ELOOP:
                raise
            st = None
        if st is None or not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            if st is not None:
                os.close(self.fd)
            self.fd = None
            raise FileExistsError(f"{path} is not a regular file awqlib made (a link to another file?): remove it, "
                                  "then rerun")
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            raise OutputLocked(f"{what} is being written by another awqlib run (pid {holder}); two runs into one "
                               "output would mix their blocks. Wait for it to finish, stop it, or choose another "
                               "output folder.") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor releases the flock
            self.fd = None


def _disk_full(e: OSError) -> bool:
    return e.errno in (errno.ENOSPC, errno.EDQUOT)


def _refuse_foreign_owner(folder: Path) -> None:
    """An existing partial folder another user made: its blocks would end up in this user's
    checkpoint.  Compared with a file made there now, not with our uid: filesystems that map owners
    (NFS root_squash, CIFS uid=, FAT, rootless containers) give both the same mapped owner."""
    mine, owner = _new_file_owner(folder), folder.stat().st_uid
    if owner != mine:
        raise FileExistsError(f"{folder} belongs to another user (uid {owner}): awqlib only resumes a run of its "
                              "own user; move it away or choose another output folder")


def _new_file_owner(folder: Path) -> int:
    """The owner a file made in ``folder`` now gets."""
    fd, probe = tempfile.mkstemp(dir=folder, prefix=".owner-")
    try:
        return os.fstat(fd).st_uid
    finally:
        os.close(fd)
        os.unlink(probe)


class BlockStore:
    """Finished blocks, one safetensors file each, in ``<out>.awqlib-partial/`` (see the module docstring).

    Use as ``store = BlockStore(...)`` then ``store.close()`` in a ``finally``: the lock is held in between.
    """

    def __init__(self, out_dir: str | os.PathLike, parts: dict[str, str], n_blocks: int,
                 overwrite: Overwrite = False, source: str | os.PathLike | None = None):
        """``parts``: the run's :func:`fingerprint_parts`."""
        self.out = absolute(out_dir)
        self.dir = partial_path(self.out)
        self.parts = parts
        self.n, self.overwrite, self.source = n_blocks, overwrite, source
        recover_leftovers(self.out)
        check_output(self.out, source, overwrite)
        if self.dir.is_symlink() or (self.dir.exists() and not self.dir.is_dir()):
            raise FileExistsError(f"{self.dir} exists and is not a folder awqlib made: move it away")
        existed = self.dir.exists()
        self.dir.mkdir(parents=True, exist_ok=True)
        if existed:
            _refuse_foreign_owner(self.dir)
        self.lock = RunLock(self.dir / LOCK_FILE, self.out)  # before anything in the folder is read or removed
        try:
            self._adopt_or_clear()
        except BaseException:
            self.close()
            raise
        self.committed = (self.dir / RUN_FILE).exists()

    # -------------------------------------------------------------------------------------- state
    def _finished(self) -> list[Path]:
        return sorted(self.dir.glob("block-*.safetensors"))

    def _adopt_or_clear(self) -> None:
        meta, finished = self.dir / RUN_FILE, self._finished()
        why, resumable = None, True  # resumable: the original settings would resume it
        if meta.exists():
            try:
                old_parts = read_json_object(self.dir, RUN_FILE).get("parts") or {}
            except ValueError:
                old_parts, why = {}, f"its {RUN_FILE} is damaged"
            if old_parts == self.parts:
                return
            changed = [PARTS.get(k, k) for k in self.parts if isinstance(old_parts, dict)
                       and old_parts.get(k) != self.parts[k]]
            if why is None and not old_parts:
                why = "it was started by an earlier awqlib version, which recorded its settings differently"
                resumable = False
            why = why or (f"it was started with different settings (changed: {', '.join(changed)})"
                          if changed else "it was started with different settings (model, quant config, options "
                                          "or calibration data)")
        elif finished:
            why = f"its {RUN_FILE} is missing"
        if finished and self.overwrite:
            log.warning("awqlib: overwrite: discarding the %d finished block(s) of an interrupted run in %s (%s)",
                        len(finished), self.dir, why)
        elif finished:
            retry = " Rerun with the original settings to resume it, or" if resumable else ""
            raise FileExistsError(
                f"{self.dir} holds an interrupted run whose {len(finished)} finished block(s) cannot be resumed: "
                f"{why}.{retry} pass overwrite=True (CLI: --overwrite) to discard it and start over")
        self._clear()

    def _clear(self) -> None:
        """Remove what an earlier run left here (ours only; anything else is refused)."""
        ours = lambda p: (p.name in (RUN_FILE, STAGING, LOCK_FILE) or p.name.endswith(".tmp")  # noqa: E731
                          or (p.name.startswith(("block-", "model-")) and p.name.endswith(".safetensors")))
        foreign = [p.name for p in self.dir.iterdir() if not ours(p)]
        if foreign and self.overwrite != "force":
            raise FileExistsError(f"{self.dir} holds files awqlib did not write ({foreign[:5]}); move them away, or "
                                  "pass overwrite='force' (CLI: --force-overwrite)")
        for p in self.dir.iterdir():
            if p.name == LOCK_FILE:
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()

    def name(self, i: int) -> str:
        return f"block-{i:05d}.safetensors"

    def done(self, i: int) -> bool:
        """Block ``i`` is finished and its file intact (a damaged file is removed: the block is redone)."""
        path = self.dir / self.name(i)
        if not path.exists():
            return False
        try:
            read_header(path)
            return True
        except (OSError, ValueError) as e:
            log.warning("awqlib: %s is damaged (%s); block %d is quantized again", path, e, i)
            path.unlink()
            return False

    def write(self, i: int, tensors: dict[str, torch.Tensor]) -> None:
        try:
            if not self.committed:  # the settings are committed with the first block
                write_json_atomic(self.dir / RUN_FILE, {"parts": self.parts, "n_blocks": self.n})
                self.committed = True
            save_tensors(tensors, self.dir / self.name(i))
        except OSError as e:
            if not _disk_full(e):
                raise
            kept = [j for j in range(self.n) if (self.dir / self.name(j)).exists()]
            raise OSError(e.errno, f"disk full while writing block {i} to {self.dir}: the {len(kept)} finished "
                                   f"block(s) {_ranges(kept)} are kept there. Free some space and rerun the same "
                                   f"command (in Python: load the model again, then quantize): it resumes from "
                                   f"the first unfinished block") from None

    def read(self, i: int) -> dict[str, torch.Tensor]:
        return read_tensors(self.dir / self.name(i))

    # -------------------------------------------------------------------------------------- finish
    def finalize(self, rest: dict[str, torch.Tensor], write_extras: Callable[[Path], None],
                 max_shard_size: int | str = "5GB") -> None:
        """Consolidate the block files and ``rest`` (the tensors outside the blocks) into shards of at
        most ``max_shard_size`` (+ the index), add ``write_extras(folder)`` (config, tokenizer, card),
        and rename the result into place. Tensors are copied file to file: the model is never in memory."""
        limit = parse_size(max_shard_size)
        staging = self.dir / STAGING
        try:
            save_tensors(rest, self.dir / "block-rest.safetensors")
            entries: list[tuple[str, Path, TensorInfo]] = []
            for f in [self.dir / self.name(i) for i in range(self.n)] + [self.dir / "block-rest.safetensors"]:
                header, _ = read_header(f)
                entries += [(k, f, header[k]) for k in sorted(header)]
            by_name = {e[0]: e for e in entries}
            shards = plan_shards([(e[0], e[2].nbytes) for e in entries], limit)
            names = shard_names(len(shards))
            if staging.exists():
                shutil.rmtree(staging)
            staging.mkdir()
            weight_map = {}
            for fname, shard in zip(names, shards):
                copy_tensors([by_name[k] for k in shard], staging / fname)
                weight_map.update({k: fname for k in shard})
            if len(shards) > 1:
                write_index(staging, weight_map, sum(e[2].nbytes for e in entries))
            write_extras(staging)
            check_output(self.out, self.source, self.overwrite)  # the output may have appeared meanwhile
            swap_into_place(staging, self.out)
        except OSError as e:
            remove_tree(staging, "an unfinished checkpoint")
            if not _disk_full(e):
                raise
            raise OSError(e.errno, f"disk full while writing the checkpoint {self.out}: all {self.n} finished "
                                   f"blocks are kept in {self.dir}. Free some space (about the checkpoint's size) "
                                   "and rerun the same command: it resumes and only writes the final files") from None
        # renamed first (one step), so that a kill while deleting leaves a leftover the next run removes;
        # the lock file goes with it, the lock is held until close()
        done = leftover_path(self.out, "tmp")
        try:
            os.rename(self.dir, done)
        except OSError:  # the checkpoint is published: the blocks are only deleted, in place
            done = self.dir
        remove_tree(done, "the finished run's blocks")
        self.close()

    def close(self) -> None:
        self.lock.release()


def _ranges(ids: list[int]) -> str:
    if not ids:
        return "(none)"
    out, start = [], ids[0]
    for a, b in zip(ids, ids[1:] + [None]):
        if b != a + 1:
            out.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return "[" + ", ".join(out) + "]"
