"""Where a checkpoint may be written, and how it replaces what was there: no path through awqlib
deletes a file it did not write.

* An output that is, contains or lies inside the source model's folder is refused (paths resolved,
  symlinks followed): replacing it would delete the model being read.
* ``overwrite=True`` replaces only a folder that looks like an awqlib checkpoint (config.json with
  an AWQ ``quantization_config``, nothing but the files a checkpoint holds) or an empty one;
  anything else needs ``overwrite="force"`` (CLI: ``--force-overwrite``).
* A run killed mid-way leaves ``.<name>.tmp-<8 hex>`` (a checkpoint being written, or, after an
  exchange, the one being replaced) or ``.<name>.old-<8 hex>`` (the checkpoint being replaced by two
  renames) beside the target; the run using such a folder holds its ``flock``, so the next run can
  tell a leftover from a live run's folder (:func:`recover_leftovers`).
* The new folder is built beside the target and renamed into place only when complete
  (:class:`AtomicDir`, :func:`swap_into_place`); so an output that is a mount point (or on another
  filesystem than its parent) is refused up front.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import re
import shlex
import shutil
import time
import uuid
from fnmatch import fnmatch
from pathlib import Path
from typing import Union

from .safetensors_io import fsync_path, publish_modes, read_json_object

log = logging.getLogger("awqlib")

Overwrite = Union[bool, str]  # False, True, or "force"

# what a checkpoint folder holds: weights, index, configs, model card, tokenizer files
CHECKPOINT_FILES = frozenset({
    "config.json", "generation_config.json", "model.safetensors.index.json", "README.md", "tokenizer.json",
    "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
    "vocab.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "chat_template.jinja",
    "chat_template.json", "quant_config.json", "quantize_config.json", "preprocessor_config.json",
    "processor_config.json", ".gitattributes", "LICENSE", "LICENSE.md", "LICENSE.txt", "NOTICE", "USE_POLICY.md"})


def _check_overwrite_value(overwrite: Overwrite) -> None:
    if overwrite not in (False, True, "force"):
        raise ValueError(f"overwrite={overwrite!r}: use False, True (replace an awqlib checkpoint) or 'force' "
                         "(replace any folder that is not the source)")


def _relation(a: Path, b: Path) -> str | None:
    if a == b:
        return "is"
    if a in b.parents:
        return "contains"
    if b in a.parents:
        return "is inside"
    return None


def absolute(out: str | os.PathLike) -> Path:
    """``out`` as an absolute, normalized path: every folder derived from it (partial, temporary, old)
    is named from its last part, which '.' or '..' do not have."""
    return Path(os.path.abspath(out))


def check_source_overlap(out: str | os.PathLike, source: str | os.PathLike | None) -> None:
    """Refuse an output (or its partial folder) that is, contains or is inside the source folder."""
    if source is None or not (Path(source) / "config.json").is_file():
        return  # not a model folder (a model built in memory, a name that is no folder)
    src = Path(source).resolve()
    for p in (absolute(out), partial_path(out)):
        rel = _relation(p.resolve(), src)
        if rel:
            raise ValueError(f"the output {p} {rel} the source model folder {Path(source)} (resolved: {src}): "
                             "writing there could destroy the model being read. Choose an output folder "
                             "outside the source.")


def partial_path(out: str | os.PathLike) -> Path:
    out = absolute(out)
    return out.parent / (out.name + ".awqlib-partial")


CHECKPOINT_GLOBS = ("model*.safetensors", "*.tiktoken", "tokenizer*.model*")
CHAT_TEMPLATES = "additional_chat_templates"  # a folder of *.jinja files beside tokenizer_config.json


def json_object_or_empty(path: Path) -> dict:
    """``path`` by :func:`read_json_object`, or {} where it is absent or unreadable: for the rules
    that only look inside a folder's config files (a damaged file is one no reader acts on)."""
    try:
        return read_json_object(path.parent, path.name)
    except (OSError, ValueError):
        return {}


def is_awq_config(cfg: dict) -> bool:
    """``cfg`` (a parsed config.json) is an AWQ checkpoint's."""
    qc = cfg.get("quantization_config")
    return isinstance(qc, dict) and str(qc.get("quant_method", "")).lower() == "awq"


def checkpoint_file_name(name: str, code: bool) -> bool:
    """``name`` (a top-level file) is of a kind a checkpoint folder holds; ``code``: the config has an
    ``auto_map``, so its ``*.py`` files travel along."""
    return (name in CHECKPOINT_FILES or any(fnmatch(name, g) for g in CHECKPOINT_GLOBS)
            or (code and name.endswith(".py")))


def has_remote_code(cfg: dict, tokenizer_cfg: dict) -> bool:
    """A folder whose config.json or tokenizer_config.json (parsed) has an ``auto_map`` uses code
    files of its own: transformers imports its ``*.py`` files for a trusting reader."""
    return "auto_map" in cfg or "auto_map" in tokenizer_cfg


def foreign_entries(folder: Path) -> list[str]:
    """Entries of an existing output folder that awqlib would not have written ([]: safe to replace)."""
    entries = sorted(os.listdir(folder))
    if not entries:
        return []
    cfg = json_object_or_empty(folder / "config.json")
    code = has_remote_code(cfg, json_object_or_empty(folder / "tokenizer_config.json"))

    def ours(name: str) -> bool:
        p = folder / name
        if p.is_symlink():
            return False
        if p.is_dir():
            return name == CHAT_TEMPLATES and all(c.suffix == ".jinja" and c.is_file() and not c.is_symlink()
                                                  for c in p.iterdir())
        return p.is_file() and checkpoint_file_name(name, code)
    foreign = [e for e in entries if not ours(e)]
    if not is_awq_config(cfg):
        foreign.insert(0, "(no config.json with an AWQ quantization_config: not an AWQ checkpoint)")
    return foreign


def check_output(out: str | os.PathLike, source: str | os.PathLike | None, overwrite: Overwrite) -> None:
    """Everything that must hold before anything is written to ``out`` (see the module docstring)."""
    _check_overwrite_value(overwrite)
    out = absolute(out)
    check_source_overlap(out, source)
    if out.is_symlink():
        raise ValueError(f"{out} is a symbolic link: write to the folder it points to, or remove the link")
    if not out.exists():
        return
    if not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a folder")
    if os.path.ismount(out):  # true too where it is on another filesystem than its parent
        raise ValueError(f"{out} is a mount point (or on another filesystem than {out.parent}): awqlib publishes a "
                         "checkpoint by renaming a finished folder into place, which a mount point does not allow. "
                         f"Write to a new folder inside it instead, e.g. {out / 'model'}")
    if not os.listdir(out):
        return  # an empty folder: nothing to lose
    if not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True (CLI: --overwrite) to replace it, or "
                              "choose another folder")
    foreign = foreign_entries(out)
    if foreign and overwrite != "force":
        raise FileExistsError(
            f"{out} does not look like an awqlib checkpoint, so overwrite=True will not delete it: it holds "
            f"{foreign[:6]}{'...' if len(foreign) > 6 else ''}. Choose another folder, or, to delete it and "
            "everything in it, pass overwrite='force' (CLI: --force-overwrite).")


def leftover_path(target: Path, kind: str) -> Path:
    """A new hidden name beside ``target`` that :func:`recover_leftovers` knows (``kind``: 'tmp', 'old')."""
    return target.parent / f".{target.name}.{kind}-{uuid.uuid4().hex[:8]}"


def hold(folder: Path) -> tuple[int, bool | None]:
    """Open ``folder`` and try an exclusive ``flock`` on it: (its descriptor, True) where held until
    the descriptor is closed, False where another process holds it, None where the filesystem cannot
    lock. The caller closes the descriptor in every case."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd, True
    except BlockingIOError:
        return fd, False
    except OSError:  # ENOLCK, or NFS refusing an exclusive lock on a read-only descriptor
        return fd, None


# make_held's folder before it is held: younger than this, it may be another run's in the making
NEW_FOLDER_GRACE_S = 600


def make_held(folder: Path) -> int:
    """Create ``folder`` already held (see :func:`hold`), and return the descriptor: it is made under a
    name :func:`recover_leftovers` ignores and renamed once held, so another run never takes it for a
    leftover in between (the lock follows the folder)."""
    staging = folder.with_name(folder.name + ".new")
    staging.mkdir(parents=True)
    fd = hold(staging)[0]
    try:
        os.rename(staging, folder)
    except BaseException:
        os.close(fd)
        os.rmdir(staging)
        raise
    return fd


def remove_tree(path: Path, what: str) -> None:
    """Delete ``path`` (a folder awqlib wrote); what cannot be removed is reported, never silently kept."""
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("awqlib: could not remove %s (%s, %s): delete it by hand", path, what, e)


def recover_leftovers(target: str | os.PathLike) -> None:
    """Before a run writes ``target``: what a killed run left beside it (only the names awqlib makes,
    and only folders no live run holds). Where ``target`` is missing, the checkpoint a swap had moved
    aside is put back; the other leftovers are removed; each is reported."""
    target = absolute(target)
    if not target.parent.is_dir():
        return
    name = re.compile(rf"\.{re.escape(target.name)}\.(tmp|old)-[0-9a-f]{{8}}(\.new)?")
    found = [p for p in target.parent.iterdir() if name.fullmatch(p.name) and p.is_dir() and not p.is_symlink()
             and not (p.name.endswith(".new") and time.time() - p.lstat().st_mtime < NEW_FOLDER_GRACE_S)]
    found.sort(key=lambda p: p.lstat().st_ctime, reverse=True)  # the newest old checkpoint first
    holds: list[tuple[Path, int, bool | None]] = []
    try:
        for p in found:
            try:
                holds.append((p, *hold(p)))
            except OSError as e:
                log.warning("awqlib: %s (left by an awqlib run?) cannot be opened (%s): left as it is", p, e)
        # where it cannot exchange them, swap_into_place renames target -> .old, then .tmp -> target,
        # and deletes .old only after that: an .old is whole where a .tmp no run holds is still beside
        # it (killed between the renames).  Without one it may be half deleted, or the user removed
        # target on purpose.
        between_renames = any(held and ".tmp-" in p.name and not p.name.endswith(".new") for p, _, held in holds)
        for p, _, held in holds:
            if not held:
                log.warning("awqlib: %s is %s: left as it is", p, "in use by another awqlib run" if held is False
                            else "a leftover of an awqlib run or in use by one (this filesystem cannot tell)")
            elif ".old-" in p.name and between_renames and not os.path.lexists(target):
                os.rename(p, target)
                log.warning("awqlib: %s was missing (a run was stopped while replacing it): the checkpoint it "
                            "had moved aside to %s is back in place", target, p)
            else:
                log.warning("awqlib: removing %s, left by an interrupted awqlib run", p)
                remove_tree(p, "left by an interrupted run")
    finally:
        for _, fd, _ in holds:
            os.close(fd)


def swap_into_place(new: Path, target: Path) -> None:
    """Rename the finished folder ``new`` to ``target``. An old ``target`` (already checked by
    :func:`check_output`; held, so that no other run takes it for a leftover) is exchanged with
    ``new`` in one step where the filesystem can (:func:`exchange_paths`), else moved aside first;
    either way it is deleted only once the new one is in place.  A process working inside the old
    ``target`` is moved into the new one as soon as it is in place (:func:`_reenter`)."""
    publish_modes(new)
    fd, replacing, old = None, target.exists(), None
    cwd_below = _cwd_below(target) if replacing else None
    if replacing:
        try:
            fd, held = hold(target)
        except OSError:  # a folder this user cannot open for reading can still be renamed
            fd, held = None, None
        if held is False:
            os.close(fd)
            raise FileExistsError(f"{target} is being replaced by another awqlib run: wait for it to finish")
    try:
        if replacing and exchange_paths(new, target):
            # one step: target never missing; the old checkpoint is now under new's (.tmp) name, which
            # the next run removes if this one is killed before it does
            old = new
        else:
            if replacing:
                old = leftover_path(target, "old")
                os.rename(target, old)
            try:
                os.rename(new, target)
            except OSError:
                if old is not None:
                    os.rename(old, target)  # the old checkpoint back under its own name
                raise
        fsync_path(target.parent)  # the new name on disk before the old checkpoint goes
        if cwd_below is not None:
            _reenter(target, cwd_below)
        if old is not None:
            remove_tree(old, "the checkpoint replaced")
    finally:
        if fd is not None:
            os.close(fd)


def _cwd_below(folder: Path) -> Path | None:
    """Where the process works relative to ``folder`` (``.`` for ``awqlib quantize model .`` or a
    notebook's ``save_quantized(".")``), or None where it works outside it."""
    try:
        cwd = Path(os.getcwd())
    except FileNotFoundError:
        return None
    real = Path(os.path.realpath(folder))
    return cwd.relative_to(real) if cwd == real or real in cwd.parents else None


def _reenter(target: Path, below: Path) -> None:
    """The new checkpoint is in place while the process worked in the old ``target`` (at ``below``
    inside it), which is about to be deleted: relative paths (``from_quantized(".")``) would fail,
    or read the old checkpoint.  Work at the same place in the new one (its root where the new one
    lacks that folder), and say so: a shell or another process still sits in the old folder."""
    dest = target / below if (target / below).is_dir() else target
    try:
        os.chdir(dest)
    except OSError as e:  # the checkpoint is published: a failed chdir must not undo that
        log.warning("awqlib: the output %s replaced the folder this process worked in, and entering the new "
                    "one failed (%s): relative paths now point into the deleted folder", target, e)
        return
    where = "was the current directory" if below == Path(".") else f"held the current directory ({below})"
    moved = "" if dest == target / below else f"; the new checkpoint has no {below}, so it works in {target}"
    log.warning("awqlib: the output %s %s and has been replaced by the new checkpoint: this process now works "
                "in the new one%s. A shell or another process working there still sits in the deleted folder "
                "and sees it empty: run `cd %s` there", target, where, moved, shlex.quote(str(dest)))


_AT_FDCWD = -100        # <fcntl.h>: paths relative to the working directory
_RENAME_EXCHANGE = 2    # <linux/fs.h>: renameat2 swaps the two entries atomically


def exchange_paths(a: Path, b: Path) -> bool:
    """Swap the two existing paths ``a`` and ``b`` in one atomic step (Linux ``renameat2`` with
    RENAME_EXCHANGE, glibc >= 2.28); False where the platform or filesystem cannot, and the caller
    falls back to two renames."""
    fn = getattr(_libc(), "renameat2", None)
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(str(a)), _AT_FDCWD, os.fsencode(str(b)), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


class AtomicDir:
    """Write into a temporary sibling folder (held while in use); rename into place only when
    everything succeeded."""

    def __init__(self, target: str | os.PathLike, overwrite: Overwrite = False,
                 source: str | os.PathLike | None = None):
        self.target = absolute(target)
        recover_leftovers(self.target)
        check_output(self.target, source, overwrite)
        self.overwrite, self.source = overwrite, source
        self.tmp = leftover_path(self.target, "tmp")
        self.fd = None

    def __enter__(self) -> Path:
        self.fd = make_held(self.tmp)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is not None:
                remove_tree(self.tmp, "an unfinished save")
                if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise OSError(exc.errno, f"disk full while saving {self.target}: nothing was written"
                                  + (" and the existing folder is untouched" if self.target.exists() else "")
                                  + "; free some space and save again") from None
                return False
            try:
                check_output(self.target, self.source, self.overwrite)  # it may have appeared meanwhile
                swap_into_place(self.tmp, self.target)
            except BaseException:
                remove_tree(self.tmp, "an unfinished save")
                raise
            return False
        finally:
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None
