"""awqlib: Activation-aware Weight Quantization for HuggingFace causal LMs."""

import logging as _logging

from . import ops  # noqa: F401  (defines torch.ops.awqlib.*)
from .config import QuantConfig
from .loading import NotQuantizedCheckpoint
from .model import AutoAWQ, AutoAWQForCausalLM, AWQModel
from .modules import WQLinear
from .version import __version__

__all__ = ["AutoAWQ", "AutoAWQForCausalLM", "AWQModel", "NotQuantizedCheckpoint", "QuantConfig", "WQLinear", "__version__"]

_logging.getLogger("awqlib").addHandler(_logging.NullHandler())
