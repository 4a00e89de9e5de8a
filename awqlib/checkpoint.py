"""Reading and writing AWQ checkpoints (safetensors only, atomically)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .arch import ArchSpec
from .config import QuantConfig
from .packing import gemv_to_gemm

log = logging.getLogger("awqlib")

SAFE_INDEX = "model.safetensors.index.json"


def parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    s = size.strip().upper()
    for unit, mult in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


def to_checkpoint_name(name: str, spec: ArchSpec) -> str:
    for mod, ckpt in spec.checkpoint_renames:
        name = name.replace(mod, ckpt)
    return name


def from_checkpoint_name(name: str, spec: ArchSpec) -> str:
    for mod, ckpt in spec.checkpoint_renames:
        name = name.replace(ckpt, mod)
    return name


# ---------------------------------------------------------------------------------------------- writing

class AtomicDir:
    """Write into a temporary sibling folder; rename into place only when everything succeeded."""

    def __init__(self, target: str | os.PathLike, overwrite: bool = False):
        self.target = Path(target)
        if self.target.exists() and not overwrite:
            raise FileExistsError(f"{self.target} already exists; pass overwrite=True (CLI: --overwrite) to "
                                  "replace it, or choose another folder")
        if self.target.exists() and not self.target.is_dir():
            raise NotADirectoryError(f"{self.target} exists and is not a folder")
        self.tmp = self.target.parent / f".{self.target.name}.tmp-{uuid.uuid4().hex[:8]}"

    def __enter__(self) -> Path:
        self.tmp.mkdir(parents=True)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        old = None
        if self.target.exists():
            old = self.target.parent / f".{self.target.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(self.target, old)
        os.rename(self.tmp, self.target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return False


def checkpoint_state(model: torch.nn.Module, spec: ArchSpec, skip_prefix: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors to save, checkpoint-named; floats in fp16, tied lm_head left out, and so are the
    tensors of modules marked ``runtime_only`` (a runtime rearrangement of tensors that other modules
    export, e.g. fused linears)."""
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    runtime = tuple(f"{n}." for n, m in model.named_modules() if getattr(m, "runtime_only", False))
    state = {}
    for name, t in model.state_dict().items():
        if (tied and name == "lm_head.weight") or (skip_prefix and name.startswith(skip_prefix)):
            continue
        if runtime and name.startswith(runtime):
            continue
        if t.is_floating_point():
            t = t.to(torch.float16)
        state[to_checkpoint_name(name, spec)] = t.detach().to("cpu").contiguous()
    return state


def write_shards(state: dict[str, torch.Tensor], folder: Path, max_shard_size: int | str = "5GB") -> list[str]:
    limit = parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(state):
        n = state[name].numel() * state[name].element_size()
        if shards[-1] and size + n > limit:
            shards.append({})
            size = 0
        shards[-1][name] = state[name]
        size += n
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for fname, shard in zip(names, shards):
        save_file(shard, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in state.values())
        (folder / SAFE_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                    indent=2, sort_keys=True))
    return names


def legacy_rope_keys(rope_parameters: Any) -> dict[str, Any]:
    """transformers 4.x's ``rope_theta`` / ``rope_scaling`` (and gemma3's ``rope_local_base_freq``,
    ``partial_rotary_factor``) from transformers 5's ``rope_parameters``.  Readers on transformers < 5
    (AutoAWQ, TGI-era tools) ignore ``rope_parameters`` and would silently fall back to theta 10000."""
    if not isinstance(rope_parameters, dict):
        return {}
    per_layer_type = "rope_theta" not in rope_parameters and "rope_type" not in rope_parameters
    main = rope_parameters.get("full_attention", {}) if per_layer_type else rope_parameters
    out: dict[str, Any] = {}
    if not isinstance(main, dict) or "rope_theta" not in main:
        return out
    out["rope_theta"] = main["rope_theta"]
    scaling = {k: v for k, v in main.items() if k not in ("rope_theta", "partial_rotary_factor")}
    out["rope_scaling"] = scaling if scaling.get("rope_type", "default") != "default" else None
    if "partial_rotary_factor" in main:
        out["partial_rotary_factor"] = main["partial_rotary_factor"]
    local = rope_parameters.get("sliding_attention") if per_layer_type else None
    if isinstance(local, dict) and "rope_theta" in local:
        out["rope_local_base_freq"] = local["rope_theta"]
    return out


def quantized_config_dict(source: dict[str, Any], qcfg: QuantConfig) -> dict[str, Any]:
    """config.json of the quantized checkpoint: every key of ``source`` with its value, plus
    ``quantization_config`` and the dtype the checkpoint stores (both spellings: ``torch_dtype`` for
    transformers 4.x readers, ``dtype`` for 5.x)."""
    d = dict(source)
    d.pop("quantization_config", None)
    d["quantization_config"] = qcfg.to_hf_dict()
    d["torch_dtype"] = d["dtype"] = "float16"
    return d


def source_config_dict(source_folder: Path | None, model_config) -> dict[str, Any]:
    """The source's own config.json when there is one (transformers 5's ``to_dict`` drops keys that
    older readers need, e.g. ``rope_theta``); else the in-memory config plus the legacy RoPE keys."""
    if source_folder is not None and (Path(source_folder) / "config.json").is_file():
        return json.loads((Path(source_folder) / "config.json").read_text(encoding="utf-8"))
    d = model_config.to_dict()
    d.pop("_name_or_path", None)  # where it was loaded from: a local path is nobody else's business
    for k, v in legacy_rope_keys(d.get("rope_parameters")).items():
        d.setdefault(k, v)
    return d


def write_config(folder: Path, source_folder: Path | None, model_config, qcfg: QuantConfig) -> None:
    cfg = quantized_config_dict(source_config_dict(source_folder, model_config), qcfg)
    (Path(folder) / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str) + "\n")


# Tokenizer files as transformers, sentencepiece and tiktoken tokenizers name them.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt", "merges.txt",
                   "chat_template.jinja", "chat_template.json")
TOKENIZER_GLOBS = ("*.tiktoken", "tokenizer*.model*", "additional_chat_templates/*.jinja")


def tokenizer_files(folder: Path | None) -> list[Path]:
    """The tokenizer files in ``folder`` (relative paths), [] where it has none."""
    if folder is None or not Path(folder).is_dir():
        return []
    folder = Path(folder)
    found = {Path(n) for n in TOKENIZER_FILES if (folder / n).is_file()}
    for pattern in TOKENIZER_GLOBS:
        found |= {p.relative_to(folder) for p in folder.glob(pattern) if p.is_file()}
    return sorted(found)


def remote_code_files(folder: Path | None) -> list[Path]:
    """The ``*.py`` files a trust_remote_code model's ``auto_map`` points at (config or tokenizer)."""
    if folder is None or not Path(folder).is_dir():
        return []
    uses_code = False
    for name in ("config.json", "tokenizer_config.json"):
        try:
            uses_code = uses_code or "auto_map" in json.loads((Path(folder) / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
    return sorted(p.relative_to(folder) for p in Path(folder).glob("*.py")) if uses_code else []


def copy_tokenizer_files(source_folder: Path | None, folder: Path) -> bool:
    """Copy the source's tokenizer files verbatim (a transformers 5 re-save rewrites
    ``tokenizer_class``, which transformers 4.x refuses), and the code files of a trust_remote_code
    model (its ``auto_map`` stays in config.json); False where there is no tokenizer to copy."""
    files = tokenizer_files(source_folder)
    for rel in files + remote_code_files(source_folder):
        (Path(folder) / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(source_folder) / rel, Path(folder) / rel)
    return bool(files)


# ---------------------------------------------------------------------------------------------- reading

def resolve_folder(path_or_id: str | os.PathLike, revision: str | None = None, token: str | None = None,
                   **download: Any) -> Path:
    """A local folder as is; a Hub id downloaded (``download``: more ``snapshot_download`` arguments)."""
    p = Path(path_or_id)
    if p.is_dir():
        return p
    if p.exists():
        raise NotADirectoryError(f"{p} is a file; pass the checkpoint folder")
    if str(path_or_id).count("/") == 1 and not str(path_or_id).startswith((".", "/")):
        from huggingface_hub import snapshot_download
        try:
            patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "README.md"]
            download = {"allow_patterns": patterns, **download}
            return Path(snapshot_download(str(path_or_id), revision=revision, token=token, **download))
        except Exception as e:
            raise OSError(f"{path_or_id!r} is not a local folder and could not be downloaded from the Hugging Face "
                          f"Hub ({type(e).__name__}: {e})") from None
    raise FileNotFoundError(f"checkpoint folder {p} does not exist")


def local_source_folder(name_or_path: str | os.PathLike | None, revision: str | None = None) -> Path | None:
    """The local folder a model was read from: the folder itself, or its Hub snapshot where the Hub
    cache already holds it (never downloads); None for anything else."""
    if not name_or_path:
        return None
    p = Path(name_or_path)
    if p.is_dir():
        return p
    if str(name_or_path).count("/") == 1 and not str(name_or_path).startswith((".", "/")):
        from huggingface_hub import snapshot_download
        try:
            return Path(snapshot_download(str(name_or_path), revision=revision, local_files_only=True))
        except Exception:  # not in the cache: config and tokenizer are then written from memory
            return None
    return None


def safetensors_files(folder: Path) -> list[Path]:
    idx = folder / SAFE_INDEX
    if idx.exists():
        try:
            wm = json.loads(idx.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise ValueError(f"{idx} is not a valid safetensors index ({e})") from None
        files = sorted({folder / f for f in wm.values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise FileNotFoundError(f"{folder} is incomplete: the index lists {missing} which are missing; "
                                    "re-download or re-save the checkpoint")
        return files
    # prefer the transformers naming: other .safetensors files may sit beside the weights
    files = sorted(folder.glob("model*.safetensors")) or sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = [f.name for f in folder.glob("*.bin")] + [f.name for f in folder.glob("*.pt")]
        hint = (f" It holds {pickles}: awqlib never unpickles weights (arbitrary code execution); convert them to "
                "safetensors first.") if pickles else ""
        raise FileNotFoundError(f"no .safetensors weights in {folder}.{hint}")
    return files


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as fh:
                for k in fh.keys():
                    yield k, fh.get_tensor(k)
        except Exception as e:
            if isinstance(e, (KeyboardInterrupt, MemoryError)):
                raise
            raise ValueError(f"{f} is corrupt or not a safetensors file ({type(e).__name__}: {e}); "
                             "re-download or re-save the checkpoint") from None


def load_quantized_state(files: list[Path], spec: ArchSpec, qcfg: QuantConfig, dtype: torch.dtype | None = None,
                         place: Callable[[str], torch.device] | None = None) -> dict[str, torch.Tensor]:
    """All tensors, module-named, GEMV layouts converted to GEMM.

    ``dtype``: floating tensors other than ``scales`` (which the format keeps in fp16) are cast to it.
    ``place(name)``: the device each tensor goes to as soon as it is read, before any cast: safetensors
    maps the file without copying, so a load onto a GPU makes no host copy of the model (a GEMV
    module's three tensors are converted on the host first)."""
    state: dict[str, torch.Tensor] = {}
    pending: dict[str, dict[str, torch.Tensor]] = {}  # GEMV: a module's tensors until all three are read

    def put(name: str, t: torch.Tensor) -> None:
        if place is not None:
            t = t.to(place(name))
        if dtype is not None and t.is_floating_point() and not name.endswith(".scales"):
            t = t.to(dtype)
        state[name] = t

    for k, t in iter_tensors(files):
        name = from_checkpoint_name(k, spec)
        prefix, _, leaf = name.rpartition(".")
        if qcfg.version != "gemv" or leaf not in ("qweight", "qzeros", "scales"):
            put(name, t)
            continue
        parts = pending.setdefault(prefix, {})
        parts[leaf] = t
        if len(parts) == 3:
            del pending[prefix]
            converted = gemv_to_gemm(parts["qweight"], parts["qzeros"], parts["scales"], qcfg.group_size, qcfg.bits)
            for leaf, t in zip(("qweight", "qzeros", "scales"), converted):
                put(f"{prefix}.{leaf}", t)
    if pending:
        name = next(iter(pending))
        raise ValueError(f"GEMV checkpoint: {name} lacks {sorted({'qweight', 'qzeros', 'scales'} - set(pending[name]))}")
    return state
