"""QuantConfig: one dataclass, AutoAWQ's and HF's key names in, HF's key names on disk."""

from __future__ import annotations

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
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits={self.bits} is not supported; awqlib quantizes to {SUPPORTED_BITS} bits")
        if self.group_size not in SUPPORTED_GROUP_SIZES:
            raise ValueError(f"group_size={self.group_size} is not supported; use one of {SUPPORTED_GROUP_SIZES} "
                             "(-1 means one group per output channel)")
        if self.version not in SUPPORTED_VERSIONS:
            raise ValueError(f"version={self.version!r} is not supported; use 'gemm' (what vLLM, SGLang and "
                             "transformers read) or 'gemv' (read only, converted to gemm at load)")
        if self.modules_to_not_convert is not None and not isinstance(self.modules_to_not_convert, (list, tuple)):
            raise ValueError("modules_to_not_convert must be a list of module-name substrings or None")

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

    def skips(self, module_name: str) -> bool:
        return any(m in module_name for m in (self.modules_to_not_convert or ()))


_FIELDS = frozenset(f for f in QuantConfig.__dataclass_fields__ if f != "extra")
USER_KEYS = frozenset(_FIELDS | set(_ALIASES) | {"quant_method"})
