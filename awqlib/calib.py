"""Calibration data: many spellings in, one LongTensor [n_sequences, seqlen] out.

Semantics follow AutoAWQ so that ported scripts calibrate on the same tokens:
take up to ``n_samples`` texts, tokenize each, concatenate, and cut the stream
into sequences of ``seqlen`` tokens (the remainder is dropped).
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

import torch

PILEVAL = "mit-han-lab/pile-val-backup"


def bundled_text_path(name: str = "tinyshakespeare.txt") -> Path:
    """Public-domain calibration text shipped inside the package (no network needed)."""
    return Path(str(resources.files("awqlib") / "data" / name))


class Paragraphs(list):
    """The paragraphs of one text file (a list of str), remembering the file's base name so that
    the model card can say where the calibration text came from (never the local path)."""

    def __init__(self, paragraphs, source: str):
        super().__init__(paragraphs)
        self.source = source


def read_text_file(path: str | os.PathLike, min_chars: int = 0) -> Paragraphs:
    """Paragraphs (blank-line separated) of a text file, longer than ``min_chars``."""
    text = Path(path).read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
    paras = [p.strip() for p in text.split("\n\n")]
    return Paragraphs([p for p in paras if p and len(p) > min_chars], Path(path).name)


def _load_pileval(split: str, text_column: str) -> list[str]:
    try:
        import datasets  # optional dependency, imported lazily
    except ImportError:
        raise RuntimeError(
            "calib_data='pileval' needs the optional package `datasets` (pip install datasets) and network "
            "access to the Hugging Face Hub. Offline, pass local text instead: calib_data='path/to/file.txt', "
            "a list of strings, or awqlib.calib.bundled_text_path() (public-domain Shakespeare shipped with "
            "awqlib).") from None
    try:
        ds = datasets.load_dataset(PILEVAL, split=split)
    except Exception as e:  # offline, hub down, ...
        raise RuntimeError(
            f"could not load the calibration dataset {PILEVAL!r} ({type(e).__name__}: {e}). Offline, pass local "
            "text instead: calib_data='path/to/file.txt', a list of strings, or "
            "awqlib.calib.bundled_text_path().") from None
    return list(ds[text_column])


def _texts_or_ids(calib_data: Any, split: str, text_column: str) -> list[str] | list[torch.Tensor]:
    if isinstance(calib_data, str):
        if calib_data == "pileval":
            return _load_pileval(split, text_column)
        if os.path.isfile(calib_data):
            return read_text_file(calib_data)
        raise ValueError(f"calib_data={calib_data!r} is neither 'pileval' nor an existing text file")
    if isinstance(calib_data, os.PathLike):
        return read_text_file(calib_data)
    if hasattr(calib_data, "column_names"):  # a datasets.Dataset
        if text_column not in calib_data.column_names:
            raise ValueError(f"the calibration Dataset has no column {text_column!r} "
                             f"(columns: {calib_data.column_names}); pass text_column=...")
        return list(calib_data[text_column])
    if isinstance(calib_data, torch.Tensor):
        return list(calib_data) if calib_data.dim() == 2 else [calib_data]
    if isinstance(calib_data, Iterable):
        items = list(calib_data)
        if all(isinstance(x, str) for x in items) or all(isinstance(x, torch.Tensor) for x in items):
            return items
    raise TypeError("calib_data must be 'pileval', a path to a text file, a list of strings, a list of token-id "
                    f"tensors or a datasets.Dataset; got {type(calib_data).__name__}")


def describe(calib_data: Any, split: str = "validation") -> str:
    """What the calibration data was, for the model card: a dataset name, a file's base name, or
    "custom text, N chars"; never a local path."""
    if isinstance(calib_data, str) and calib_data == "pileval":
        return f"{PILEVAL} ({split} split)"
    if isinstance(calib_data, (str, os.PathLike)):
        return f"text file {Path(calib_data).name}"
    if hasattr(calib_data, "column_names"):
        name = getattr(getattr(calib_data, "info", None), "dataset_name", None)
        return f"dataset {name} ({len(calib_data)} rows)" if name else f"a datasets.Dataset ({len(calib_data)} rows)"
    if isinstance(calib_data, Paragraphs):
        return f"text file {calib_data.source} ({len(calib_data)} paragraphs)"
    if isinstance(calib_data, torch.Tensor):
        return f"custom token ids, {calib_data.numel()} tokens"
    if isinstance(calib_data, Iterable):
        items = list(calib_data)
        if all(isinstance(x, str) for x in items):
            return f"custom text, {sum(len(x) for x in items)} chars"
        return f"custom token ids, {sum(int(x.numel()) for x in items if isinstance(x, torch.Tensor))} tokens"
    return type(calib_data).__name__


def get_calib_tokens(calib_data: Any, tokenizer=None, n_samples: int = 128, seqlen: int = 512,
                     split: str = "validation", text_column: str = "text") -> torch.Tensor:
    items = _texts_or_ids(calib_data, split, text_column)
    ids: list[torch.Tensor] = []
    used = 0
    for item in items:
        if used >= n_samples:
            break
        if isinstance(item, str):
            if not item.strip():
                continue
            if tokenizer is None:
                raise ValueError("text calibration data needs a tokenizer: model.quantize(tokenizer, ...)")
            t = torch.tensor(tokenizer(item.strip(), add_special_tokens=False)["input_ids"], dtype=torch.long)
        else:
            t = item.reshape(-1).to(torch.long)
        if t.numel() == 0:
            continue
        ids.append(t)
        used += 1
    if not ids:
        raise ValueError("calibration data is empty: no non-empty text or token ids found")
    stream = torch.cat(ids)
    n_seq = stream.numel() // seqlen
    if n_seq == 0:
        raise ValueError(f"calibration data is too short: {stream.numel()} tokens from {used} samples, but one "
                         f"sequence needs seqlen={seqlen}. Pass more text, a larger n_samples, or a smaller seqlen.")
    return stream[: n_seq * seqlen].view(n_seq, seqlen)
