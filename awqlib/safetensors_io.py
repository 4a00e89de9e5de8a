"""Safetensors I/O, in one place: which files of a folder hold the weights, their headers read and
validated without torch, tensors read lazily, files and the index written atomically.

Checkpoints (Hub downloads especially) are untrusted input, so reading is defensive:

* an index entry must name a file inside the folder (no absolute path, no ``..``), and the file it
  resolves to must be a regular file inside the folder (or, for a Hub cache snapshot, in the
  cache's ``blobs`` folder that its symlinks point to): a FIFO would hang the reader, a symlink
  elsewhere would read files the checkpoint does not own;
* a header is checked against the file before any tensor data is read: every tensor's byte range
  must match its dtype and shape and lie inside the file, so a header claiming a 1 TiB tensor
  costs nothing but the error message;
* every JSON file read from a checkpoint folder (index, ``config.json``, ``quant_config.json``) goes
  through :func:`read_json`: the shard rules above, a size bound, UTF-8, and one clear error for
  anything :mod:`json` refuses (a nesting deep enough to exhaust the stack included);
* :func:`check_expected` compares every tensor's dtype and shape with what the model built from the
  config expects, again before any data is read.

Writing: every file is written to a temporary name, flushed to disk and renamed into place
(complete or absent), with the permissions an ordinary file gets (``0666 & ~umask``; safetensors
itself creates files ``0600``, which a serving process running as another user cannot read).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import stat
import struct
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Iterator

from .quant import nonfinite_count

SAFE_INDEX = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 * 2**20

# safetensors dtype tag -> (torch dtype name, bytes per element): the one dtype table
DTYPES: dict[str, tuple[str, int]] = {
    "BOOL": ("bool", 1), "U8": ("uint8", 1), "I8": ("int8", 1), "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1), "I16": ("int16", 2), "U16": ("uint16", 2), "F16": ("float16", 2),
    "BF16": ("bfloat16", 2), "I32": ("int32", 4), "U32": ("uint32", 4), "F32": ("float32", 4),
    "I64": ("int64", 8), "U64": ("uint64", 8), "F64": ("float64", 8),
}
FLOAT_DTYPES = frozenset({"F8_E4M3", "F8_E5M2", "F16", "BF16", "F32", "F64"})
TAG_OF = {name: tag for tag, (name, _) in DTYPES.items()}  # "float16" -> "F16"


def tag_of(t: "torch.Tensor") -> str:  # noqa: F821
    """The safetensors dtype tag of ``t`` ("F16" for torch.float16)."""
    return TAG_OF[str(t.dtype).replace("torch.", "")]


@dataclass(frozen=True)
class TensorInfo:
    """One header entry: ``begin``/``end`` are absolute byte offsets in the file."""
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def _corrupt(path: Path, why: str) -> ValueError:
    return ValueError(f"{path} is corrupt or not a safetensors file ({why}); re-download or re-save the checkpoint")


def parse_json(raw: bytes) -> Any:
    """``raw`` decoded as UTF-8 JSON (what safetensors and transformers require: :func:`json.loads`
    would also accept UTF-16/32); anything it refuses, a nesting deep enough to exhaust the stack
    (RecursionError) included, is one ValueError("not UTF-8 JSON (why)")."""
    try:
        return json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise ValueError(f"not UTF-8 JSON ({why})") from None


def regular_file(path: Path) -> os.stat_result:
    """stat ``path`` (following links) and refuse anything but a regular file (opening a FIFO blocks)."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{path} is not a regular file (a FIFO, device, socket or folder): refused")
    return st


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """({tensor name: TensorInfo}, metadata) of a safetensors file, validated against its size."""
    path = Path(path)
    size = regular_file(path).st_size
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise _corrupt(path, f"{size} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", raw)
        if n > min(MAX_HEADER_BYTES, size - 8):
            raise _corrupt(path, f"header length {n} exceeds the file's {size} bytes or {MAX_HEADER_BYTES}")
        try:
            header = parse_json(fh.read(n))
        except ValueError as e:
            raise _corrupt(path, f"header is {e}") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "header is not a JSON object")
    meta = header.pop("__metadata__", None)
    if meta is None:
        meta = {}
    # safetensors itself refuses any other __metadata__: a validator passing it would promise a file
    # that vLLM cannot open
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise _corrupt(path, f"__metadata__ must be an object of strings, got {str(meta)[:80]}")
    data_len, start = size - 8 - n, 8 + n
    out: dict[str, TensorInfo] = {}
    for name, e in header.items():
        if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= e.keys():
            raise _corrupt(path, f"entry {name!r} lacks dtype/shape/data_offsets")
        dt, shape, offs = e["dtype"], e["shape"], e["data_offsets"]
        if dt not in DTYPES:
            raise _corrupt(path, f"tensor {name!r} has unknown dtype {dt!r}")
        if (not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape)
                or not isinstance(offs, list) or len(offs) != 2 or not all(type(o) is int for o in offs)):
            raise _corrupt(path, f"tensor {name!r}: malformed shape {shape!r} or data_offsets {offs!r}")
        b, end = offs
        want = math.prod(shape) * DTYPES[dt][1]
        if not 0 <= b <= end or end - b != want:
            raise _corrupt(path, f"tensor {name!r} ({dt} {shape}) needs {want} bytes but its data_offsets {offs} "
                                 f"span {end - b}")
        if end > data_len:
            raise _corrupt(path, f"tensor {name!r} ({dt} {shape}, {want} bytes) ends at data byte {end} but the "
                                 f"file holds {data_len} bytes of data: truncated, or a header that lies")
        out[name] = TensorInfo(dt, tuple(shape), start + b, start + end)
    covered = sorted((t.begin, t.end) for t in out.values())
    pos = start
    for b, e in covered:
        if b != pos:
            raise _corrupt(path, "tensor data ranges overlap or leave gaps")
        pos = e
    if pos != size:
        raise _corrupt(path, f"the tensors cover {pos - start} of the file's {data_len} data bytes")
    return out, meta


def read_safetensors_header(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """{name: {"dtype": "I32", "shape": [..]}} from a safetensors file's validated header, without its data."""
    return {k: {"dtype": t.dtype, "shape": list(t.shape)} for k, t in read_header(path)[0].items()}


# ---------------------------------------------------------------------------------------------- folders

def _roots(folder: Path) -> list[Path]:
    """Where a checkpoint's files may live: the folder, and for a Hub cache snapshot
    (``models--org--name/snapshots/<rev>``, whose files link to ``../../blobs``) the cache's blobs."""
    real = folder.resolve()
    roots = [real]
    if real.parent.name == "snapshots":
        roots.append(real.parent.parent / "blobs")
    return roots


def confined(folder: Path, name: Any) -> Path:
    """``folder / name`` for a file name taken from untrusted input, refused unless it stays inside
    the folder (see the module docstring); FileNotFoundError when it does not exist."""
    bad = (not isinstance(name, str) or not name or "\\" in name or "\0" in name
           or PurePosixPath(name).is_absolute() or ".." in PurePosixPath(name).parts)
    if bad:
        raise ValueError(f"{folder}: the file name {name!r} points outside the checkpoint folder: refused "
                         "(a checkpoint may only name files inside its own folder)")
    p = folder / name
    if not p.exists():
        raise FileNotFoundError(p)
    real = p.resolve()
    if not any(real == r or r in real.parents for r in _roots(folder)):
        raise ValueError(f"{p} resolves to {real}, outside the checkpoint folder {folder}: refused")
    regular_file(p)
    return p


def read_json(folder: Path, name: str, limit: int = MAX_HEADER_BYTES) -> Any:
    """The JSON file ``folder / name`` of a checkpoint, read by the shard rules (:func:`confined`: a
    FIFO would hang the reader, a link to ``/dev/zero`` would need unbounded memory, a link elsewhere
    is not the checkpoint's), at most ``limit`` bytes (as a safetensors header), as UTF-8; anything
    malformed is a ValueError naming the file. FileNotFoundError where it does not exist."""
    path = confined(Path(folder), name)
    with open(path, "rb") as fh:
        raw = fh.read(limit + 1)
    if len(raw) > limit:
        raise ValueError(f"{path} is over {limit} bytes: not a checkpoint's JSON file, refused")
    try:
        return parse_json(raw)
    except ValueError as e:
        raise ValueError(f"{path} is {e}; re-download or re-save the checkpoint") from None


def read_json_object(folder: Path, name: str) -> dict:
    """:func:`read_json` for the files that must hold a JSON object (config.json,
    tokenizer_config.json, quant_config.json): anything else is a ValueError naming the file."""
    d = read_json(folder, name)
    if not isinstance(d, dict):
        raise ValueError(f"{Path(folder) / name} must hold a JSON object, not {type(d).__name__}")
    return d


def read_index(folder: Path) -> dict[str, str]:
    """The ``weight_map`` of ``folder``'s safetensors index, checked: {tensor name: shard file name}."""
    idx = folder / SAFE_INDEX
    try:
        wm = read_json(folder, SAFE_INDEX)["weight_map"]
    except (KeyError, TypeError) as e:
        raise ValueError(f"{idx} is not a valid safetensors index ({type(e).__name__}: {e})") from None
    if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
        raise ValueError(f"{idx}: weight_map must be an object {{tensor name: shard file name}}, got "
                         f"{type(wm).__name__}")
    return wm


def weight_files(folder: str | os.PathLike) -> list[Path]:
    """The safetensors files holding a checkpoint's weights, by the one rule every reader here uses:
    the shards the index names when there is an index; else ``model*.safetensors`` (transformers'
    names: other ``.safetensors`` files may sit beside the weights); else every ``*.safetensors``."""
    folder = Path(folder)
    if (folder / SAFE_INDEX).exists():
        files, missing, seen = [], [], set()
        for name in sorted(set(read_index(folder).values())):
            try:
                f = confined(folder, name)
            except FileNotFoundError:
                missing.append(name)
                continue
            if f.resolve() not in seen:  # "./model-00001-..." beside "model-00001-...": one file, read once
                seen.add(f.resolve())
                files.append(f)
        if missing:
            raise FileNotFoundError(f"{folder} is incomplete: the index lists {missing} which are missing; "
                                    "re-download or re-save the checkpoint")
        return files
    files = sorted(folder.glob("model*.safetensors")) or sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = [f.name for f in folder.glob("*.bin")] + [f.name for f in folder.glob("*.pt")]
        hint = (f" It holds {pickles}: awqlib never unpickles weights (arbitrary code execution); convert them to "
                "safetensors first.") if pickles else ""
        raise FileNotFoundError(f"no .safetensors weights in {folder}.{hint}")
    return [confined(folder, f.name) for f in files]


def tensor_index(files: Iterable[Path]) -> dict[str, tuple[Path, TensorInfo]]:
    """{tensor name: (file, header entry)} over validated headers; a name in two files is an error."""
    where: dict[str, tuple[Path, TensorInfo]] = {}
    for f in files:
        for k, t in read_header(f)[0].items():
            if k in where:
                raise ValueError(f"tensor {k} is stored twice, in {where[k][0].name} and {f.name}: ambiguous checkpoint")
            where[k] = (f, t)
    return where


def check_expected(where: dict[str, tuple[Path, TensorInfo]], expected: dict[str, tuple[str, tuple[int, ...] | None]],
                   folder: Path | str, optional: Iterable[str] = ()) -> None:
    """Refuse, before reading any data, a checkpoint whose tensors are not the ones the model expects:
    ``expected`` is {name: (dtype tag, shape or None)}; a floating dtype accepts any floating tag
    (tensors are cast when loaded), an integer one only itself. ``optional`` names may be absent."""
    missing = sorted(set(expected) - set(where) - set(optional))
    unexpected = sorted(set(where) - set(expected))
    wrong = []
    for name, (dt, shape) in expected.items():
        if name not in where:
            continue
        f, t = where[name]
        ok_dtype = t.dtype in FLOAT_DTYPES if dt in FLOAT_DTYPES else t.dtype == dt
        if not ok_dtype or (shape is not None and tuple(shape) != t.shape):
            want = f"{'a floating dtype' if dt in FLOAT_DTYPES else dt}" + (f" {list(shape)}" if shape else "")
            wrong.append(f"{f.name}: tensor {name} is {t.dtype} {list(t.shape)}, expected {want}")
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append(f"{len(wrong)} tensor(s) with the wrong dtype or shape: " + "; ".join(wrong[:5]))
        if missing:
            parts.append(f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
        raise ValueError(f"{folder} does not match the model its config.json describes: " + "; ".join(parts)
                         + ". Nothing was read; re-download or re-save the checkpoint")


def iter_tensors(files: list[Path], where: dict[str, tuple[Path, TensorInfo]] | None = None
                 ) -> Iterator[tuple[str, "torch.Tensor"]]:  # noqa: F821
    """Every tensor of ``files``, file by file, after all headers were validated (``where``: the
    :func:`tensor_index` already built for them)."""
    where = where if where is not None else tensor_index(files)
    for f in files:
        with _opened(f) as fh:
            for k in fh.keys():
                yield k, fh.get_tensor(k)


def read_tensors(path: Path, names: Iterable[str] | None = None) -> dict[str, "torch.Tensor"]:  # noqa: F821
    """Tensors of one file (all, or ``names``), copied out of the mapping: a shard kept mapped would
    count every page read from it towards the process's memory."""
    with _opened(path) as fh:
        return {k: fh.get_tensor(k).clone() for k in (fh.keys() if names is None else names)}


@contextlib.contextmanager
def _opened(path: Path):
    """safetensors' ``safe_open`` of a file whose header was validated here; whatever safetensors
    still refuses (its own rules are stricter in places) is the one "corrupt" error naming the file."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as fh:
            yield fh
    except Exception as e:
        if isinstance(e, MemoryError):
            raise
        raise _corrupt(path, f"{type(e).__name__}: {e}") from None


# ---------------------------------------------------------------------------------------------- writing

def umask() -> int:
    old = os.umask(0o022)
    os.umask(old)
    return old


def file_mode() -> int:
    """What ``open(path, "w")`` gives a new file: 0666 & ~umask (0644 with the usual umask)."""
    return 0o666 & ~umask()


def dir_mode() -> int:
    return 0o777 & ~umask()


def publish_modes(folder: Path) -> None:
    """Give every file and folder under ``folder`` (ours: just written) the ordinary permissions, and
    fsync them all (config, tokenizer and card files are written without): it is about to replace a
    checkpoint that is deleted at once."""
    fm, dm = file_mode(), dir_mode()
    os.chmod(folder, dm)
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            os.chmod(os.path.join(root, d), dm)
        for f in files:
            os.chmod(os.path.join(root, f), fm)
            fsync_path(Path(root, f))
        fsync_path(Path(root))


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a read-only descriptor is enough on Linux): a folder's fsync makes
    the renames and creations in it durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit(tmp: Path, path: Path) -> None:
    """fsync ``tmp``, give it ordinary permissions, rename it to ``path`` (atomic), fsync the folder."""
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.chmod(tmp, file_mode())
    os.replace(tmp, path)
    fsync_path(path.parent)


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_bytes_atomic(path: Path, data: bytes) -> None:
    tmp = _tmp(path)
    try:
        tmp.write_bytes(data)
        _commit(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: Path, obj: Any) -> None:
    write_bytes_atomic(path, json.dumps(obj, indent=2, sort_keys=True).encode())


def assert_finite(tensors: dict[str, "torch.Tensor"], where: str | os.PathLike) -> None:  # noqa: F821
    """A checkpoint never stores NaN or inf: refuse, naming the tensor (and so the layer)."""
    for name, t in tensors.items():
        n = nonfinite_count(t)
        if n:
            raise FloatingPointError(
                f"{name} has {n} NaN/inf value(s) of {t.numel()}: not written to {where}. The source weights of "
                "that layer are not finite (or quantizing them overflowed); fix the model, or keep the layer in "
                "fp16 with quant_config['modules_to_not_convert']")


def _write_file(path: Path, items: list[tuple[str, str, tuple[int, ...], int, Any]]) -> None:
    """Write a safetensors file from (name, dtype tag, shape, nbytes, write(out)) items, atomically.
    Written here rather than by safetensors' writer so that a full disk is a plain OSError (ENOSPC)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, dt, shape, nbytes, _ in items:
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + nbytes]}
        off += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    tmp = _tmp(path)
    try:
        with open(tmp, "wb") as out:
            out.write(struct.pack("<Q", len(raw)))
            out.write(raw)
            for *_, write in items:
                write(out)
        _commit(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_tensors(tensors: dict[str, "torch.Tensor"], path: Path) -> None:  # noqa: F821
    """One safetensors file, atomically, after checking every tensor is finite."""
    import torch
    assert_finite(tensors, path)
    items = []
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        items.append((name, tag_of(t), tuple(t.shape), t.numel() * t.element_size(),
                      lambda out, t=t: out.write(t.reshape(-1).view(torch.uint8).numpy().data)))
    _write_file(path, items)


COPY_CHUNK = 16 << 20


def _copier(src: Path, t: TensorInfo):
    def write(out) -> None:
        with open(src, "rb") as fh:
            fh.seek(t.begin)
            left = t.nbytes
            while left:
                chunk = fh.read(min(COPY_CHUNK, left))
                if not chunk:
                    raise _corrupt(src, "shorter than its header says")
                out.write(chunk)
                left -= len(chunk)
    return write


def copy_tensors(entries: list[tuple[str, Path, TensorInfo]], path: Path) -> None:
    """Write a safetensors file holding ``entries`` (name, source file, header entry), copying each
    tensor's bytes from its source file in chunks: memory stays one chunk, whatever the file size."""
    _write_file(path, [(name, t.dtype, t.shape, t.nbytes, _copier(f, t)) for name, f, t in entries])


def parse_size(size: int | str) -> int:
    """Bytes from 5000000, "5GB" (10^9) or "4GiB" (2^30), as transformers' ``max_shard_size``."""
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise ValueError(f"max_shard_size={size!r}: give bytes (an int) or a string such as '5GB' or '500MiB'")
    if isinstance(size, int):
        n = size
    else:
        s = size.strip().upper()
        n = None
        for unit, mult in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6),
                           ("KB", 10**3), ("B", 1)):
            if s.endswith(unit):
                try:
                    n = int(float(s[: -len(unit)]) * mult)
                except ValueError:
                    pass
                break
        else:
            n = int(s) if s.isdigit() else None
        if n is None:
            raise ValueError(f"max_shard_size={size!r}: give bytes or a size such as '5GB', '500MB', '2GiB'")
    if n <= 0:
        raise ValueError(f"max_shard_size={size!r} must be positive")
    return n


def plan_shards(sizes: list[tuple[str, int]], limit: int) -> list[list[str]]:
    """Tensor names, in order, cut into shards of at most ``limit`` bytes (a bigger tensor alone)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, n in sizes:
        if shards[-1] and used + n > limit:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += n
    return shards


def shard_names(n: int) -> list[str]:
    """transformers' file names: one file ``model.safetensors``, else ``model-0000i-of-0000n`` + index."""
    return ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


_SHARD_OF = re.compile(r"model-[0-9]{5}-of-([0-9]{5})\.safetensors")


def is_shard_name(name: str) -> bool:
    """``name`` is one that :func:`shard_names` gives for some number of files."""
    m = _SHARD_OF.fullmatch(name)
    return name in shard_names(int(m.group(1)) if m else 1)


def write_index(folder: Path, weight_map: dict[str, str], total_size: int) -> None:
    """The standard ``model.safetensors.index.json`` (transformers / vLLM / the Hub read it)."""
    write_json_atomic(folder / SAFE_INDEX, {"metadata": {"total_size": total_size}, "weight_map": weight_map})
