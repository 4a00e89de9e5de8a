"""QuantConfig: one dataclass, AutoAWQ's and HF's key names in, HF's key names on disk."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

SUPPORTED_BITS = (4,)
SUPPORTED_GROUP_SIZES = (32, 64, 128, -1)
SUPPORTED_VERSIONS = ("gemm", "gemv")

# AutoAWQ spelling -> HF spelling
_ALIASES = {"w_bit": "bits", "q_group_size": "group_size"}


@dataclass
class QuantConfig:
    bits: int = 4
    group_size: int = 128
    zero_point: bool = True
    version: str = "gemm"
    modules_to_not_convert: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def w_bit(self) -> int:  # AutoAWQ name
        return self.bits

    @property
    def q_group_size(self) -> int:  # AutoAWQ name
        return self.group_size

    @classmethod
    def from_user(cls, d: dict[str, Any] | "QuantConfig" | None) -> "QuantConfig":
        """A ``quant_config`` a user wrote: an unknown key (a typo such as ``q_group_sise``) is an
        error naming the accepted ones, never silently ignored."""
        if isinstance(d, QuantConfig):
            return d
        unknown = sorted(set(d or {}) - USER_KEYS)
        if unknown:
            raise ValueError(f"quant_config has unknown key(s) {unknown}; accepted: {sorted(USER_KEYS)}")
        return cls._parse(d)

    @classmethod
    def from_checkpoint(cls, d: dict[str, Any] | "QuantConfig" | None) -> "QuantConfig":
        """A checkpoint's ``quantization_config``: published checkpoints carry keys of their own
        (AutoAWQ's ``backend``, transformers' ``do_fuse``, ...), kept in ``extra``."""
        if isinstance(d, QuantConfig):
            return d
        return cls._parse(d)

    @classmethod
    def _parse(cls, d: dict[str, Any] | None) -> "QuantConfig":
        d = dict(d or {})
        method = d.pop("quant_method", "awq")
        if str(method).lower() != "awq":
            raise ValueError(
                f"quantization_config has quant_method={method!r}; awqlib reads only AWQ checkpoints "
                "(quant_method 'awq'). Load this model with the library that wrote it.")
        kw: dict[str, Any] = {}
        for k, v in d.items():
            k = _ALIASES.get(k, k)
            if k in kw and kw[k] != v:
                raise ValueError(f"quant_config gives {k} twice with different values ({kw[k]} and {v})")
            kw[k] = v
        extra = {k: kw.pop(k) for k in list(kw) if k not in _FIELDS}
        cfg = cls(**kw, extra=extra)
        cfg.version = str(cfg.version).lower()
        cfg.validate()
        return cfg

    def validate(self) -> None:
        _check_types(self)
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits={self.bits} is not supported; awqlib quantizes to {SUPPORTED_BITS} bits")
        if self.group_size not in SUPPORTED_GROUP_SIZES:
            raise ValueError(f"group_size={self.group_size} is not supported; use one of {SUPPORTED_GROUP_SIZES} "
                             "(-1 means one group per output channel)")
        if self.version not in SUPPORTED_VERSIONS:
            raise ValueError(f"version={self.version!r} is not supported; use 'gemm' (what vLLM, SGLang and "
                             "transformers read) or 'gemv' (read only, converted to gemm at load)")

    def to_hf_dict(self) -> dict[str, Any]:
        """What goes into config.json's ``quantization_config``. We always write gemm."""
        return {
            "quant_method": "awq",
            "bits": self.bits,
            "group_size": self.group_size,
            "zero_point": self.zero_point,
            "version": "gemm",
            "modules_to_not_convert": list(self.modules_to_not_convert) if self.modules_to_not_convert else None,
        }

    def naming_unconverted(self, names: list[str]) -> "QuantConfig":
        """This config with ``modules_to_not_convert`` also naming ``names`` (entries naming modules
        left unquantized, see :func:`awqlib.checkpoint.not_convert_entries`) that its own entries
        do not already match."""
        extra = [n for n in names if not self.skips(n)]
        if not extra:
            return self
        return dataclasses.replace(self, modules_to_not_convert=[*(self.modules_to_not_convert or ()), *extra])

    def skips(self, module_name: str) -> bool:
        return any(m in module_name for m in (self.modules_to_not_convert or ()))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_types(cfg: QuantConfig) -> None:
    """Each value's type, before its value is compared with what is supported (``64.0 in (64,)`` is
    True in Python, and a string ``"4"`` would print as a supported 4)."""
    checks = (
        ("bits", cfg.bits, _is_int(cfg.bits), f"an integer, one of {SUPPORTED_BITS}"),
        ("group_size", cfg.group_size, _is_int(cfg.group_size), f"an integer, one of {SUPPORTED_GROUP_SIZES}"),
        ("zero_point", cfg.zero_point, isinstance(cfg.zero_point, bool), "true or false"),
        ("version", cfg.version, isinstance(cfg.version, str), f"one of {SUPPORTED_VERSIONS}"),
        ("modules_to_not_convert", cfg.modules_to_not_convert,
         cfg.modules_to_not_convert is None or (isinstance(cfg.modules_to_not_convert, (list, tuple))
                                                and all(isinstance(m, str) for m in cfg.modules_to_not_convert)),
         "a list of module-name substrings, or null"),
    )
    for key, value, ok, accepted in checks:
        if not ok:
            raise ValueError(f"quantization config: {key}={value!r} ({type(value).__name__}) is not accepted; "
                             f"{key} must be {accepted}")


def checkpoint_quant_config(qc: Any, where: Any) -> QuantConfig:
    """A checkpoint's ``quantization_config`` (a dict, or transformers' config object), validated in
    one pass: the messages name the file, the key, the value and what is accepted."""
    if qc is not None and not isinstance(qc, dict) and callable(getattr(qc, "to_dict", None)):
        qc = qc.to_dict()
    if not isinstance(qc, dict):
        raise ValueError(f"{where}: quantization_config is {qc!r} ({type(qc).__name__}); it must be an object "
                         "such as {\"quant_method\": \"awq\", \"bits\": 4, \"group_size\": 128, \"zero_point\": true}")
    try:
        return QuantConfig.from_checkpoint(qc)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


_FIELDS = frozenset(f for f in QuantConfig.__dataclass_fields__ if f != "extra")
USER_KEYS = frozenset(_FIELDS | set(_ALIASES) | {"quant_method"})
