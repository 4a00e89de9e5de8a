"""Keyword arguments users pass to the entry points: strict (an unknown key is an error naming the
accepted ones), with the spellings of AutoAWQ and transformers that port scripts unchanged."""

from __future__ import annotations

import inspect
import logging
from typing import Any

log = logging.getLogger("awqlib")

# AutoAWQ's from_quantized arguments that change nothing in awqlib, accepted so that AutoAWQ
# scripts run, with why they have no effect.  The result is the same model either way.
NO_EFFECT = {
    "use_exllama": "awqlib runs its own kernels (CUDA) or PyTorch (CPU), with the same results",
    "use_exllama_v2": "awqlib runs its own kernels (CUDA) or PyTorch (CPU), with the same results",
    "use_ipex": "awqlib's CPU path is plain PyTorch, with the same results",
    "max_seq_len": "awqlib's fused modules use transformers' KV cache, which grows as needed",
    "batch_size": "awqlib's fused modules use transformers' KV cache, sized per call",
    "low_cpu_mem_usage": "awqlib always builds the model empty and reads each tensor once",
}
# AutoAWQ arguments accepted only with the value that matches what awqlib does (anything else
# would be silently ignored): the accepted value and why.
ONLY_VALUE = {
    "safetensors": (True, "awqlib reads only safetensors weights (it never unpickles .bin files)"),
    "quant_filename": ("", "awqlib reads every safetensors shard of the folder (or its index)"),
}


def check_kwargs(fn, kwargs: dict[str, Any]) -> None:
    """Consume AutoAWQ's no-effect arguments from ``kwargs`` (the ``**kwargs`` of ``fn``), logging
    that they have no effect; anything else left is an error that names ``fn``'s arguments."""
    name = fn.__name__
    for key in [k for k in kwargs if k in NO_EFFECT or k in ONLY_VALUE]:
        value = kwargs.pop(key)
        if key in ONLY_VALUE and value != ONLY_VALUE[key][0]:
            raise ValueError(f"{name}({key}={value!r}) is not supported: {ONLY_VALUE[key][1]}; "
                             f"leave it out (or pass {key}={ONLY_VALUE[key][0]!r})")
        why = NO_EFFECT[key] if key in NO_EFFECT else ONLY_VALUE[key][1]
        log.info("awqlib: %s(%s=%r) has no effect: %s", name, key, value, why)
    if kwargs:
        named = [p.name for p in inspect.signature(fn).parameters.values()
                 if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
        allowed = sorted(set(named) | set(NO_EFFECT) | set(ONLY_VALUE))
        raise TypeError(f"{name}() got unknown keyword argument(s) {sorted(kwargs)}; accepted: {allowed}")


def pick_dtype(torch_dtype: Any, dtype: Any, default: Any = "auto") -> Any:
    """``dtype`` (transformers 5's name) and ``torch_dtype`` (AutoAWQ's and transformers 4's) are
    one argument; giving both with different values is an error."""
    if dtype is None:
        return torch_dtype
    if torch_dtype != default and str(torch_dtype).replace("torch.", "") != str(dtype).replace("torch.", ""):
        raise ValueError(f"got torch_dtype={torch_dtype!r} and dtype={dtype!r}: they are the same argument "
                         "(dtype is transformers 5's name for it); pass one")
    return dtype


def download_arguments(download_kwargs: dict | None, revision: str | None, token: str | None) -> dict[str, Any]:
    """AutoAWQ's ``download_kwargs`` (passed to huggingface_hub's ``snapshot_download``) merged with
    the ``revision`` / ``token`` arguments; unknown keys and contradictions are errors."""
    from huggingface_hub import snapshot_download
    if download_kwargs is not None and not isinstance(download_kwargs, dict):
        raise TypeError(f"download_kwargs must be a dict of snapshot_download arguments, not "
                        f"{type(download_kwargs).__name__}")
    kw = dict(download_kwargs or {})
    accepted = sorted(set(inspect.signature(snapshot_download).parameters) - {"repo_id"})
    unknown = sorted(set(kw) - set(accepted))
    if unknown:
        raise ValueError(f"download_kwargs has unknown key(s) {unknown}; huggingface_hub.snapshot_download "
                         f"accepts {accepted}")
    for name, value in (("revision", revision), ("token", token)):
        if value is not None:
            if kw.get(name, value) != value:
                raise ValueError(f"{name} is given twice with different values ({name}= and download_kwargs)")
            kw[name] = value
    return kw
