"""Reading and writing AWQ checkpoints (safetensors only, atomically)."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, Callable

import torch

from .arch import ArchSpec
from .arch.blocks import find_blocks, unconverted_linears
from .config import QuantConfig
from .outputs import AtomicDir, has_remote_code, json_object_or_empty  # noqa: F401  (AtomicDir re-exported)
from .packing import gemv_shapes, gemv_to_gemm
from .quant import nonfinite_count, pack_factor
from .safetensors_io import (SAFE_INDEX, confined, check_expected, iter_tensors, parse_size,  # noqa: F401
                             plan_shards, read_json_object, save_tensors, shard_names, tag_of, tensor_index, weight_files,
                             write_index)

log = logging.getLogger("awqlib")


def to_checkpoint_name(name: str, spec: ArchSpec) -> str:
    for mod, ckpt in spec.checkpoint_renames:
        name = name.replace(mod, ckpt)
    return name


def from_checkpoint_name(name: str, spec: ArchSpec) -> str:
    for mod, ckpt in spec.checkpoint_renames:
        name = name.replace(ckpt, mod)
    return name


# ---------------------------------------------------------------------------------------------- writing

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
    """``state`` as transformers lays it out: one ``model.safetensors``, or shards of at most
    ``max_shard_size`` plus the index."""
    order = sorted(state)
    shards = plan_shards([(k, state[k].numel() * state[k].element_size()) for k in order], parse_size(max_shard_size))
    names = shard_names(len(shards))
    weight_map = {}
    for fname, shard in zip(names, shards):
        save_tensors({k: state[k] for k in shard}, folder / fname)
        weight_map.update({k: fname for k in shard})
    if len(shards) > 1:
        write_index(folder, weight_map, sum(t.numel() * t.element_size() for t in state.values()))
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


def not_convert_entries(unconverted: list[str], quantized: list[str], blocks: str) -> list[str]:
    """``modules_to_not_convert`` entries naming the ``unconverted`` modules (checkpoint names) and
    no quantized one, for every reader's matching rule: each entry is tested as a substring of a
    linear's name, by transformers 4.x and vLLM on the full path, by AutoAWQ on the path inside the
    decoder block.  So a module inside the blocks is named by its path in the block where that
    matches no quantized linear (``block_sparse_moe.gate``, as AutoAWQ writes), else by its full
    path (matched by transformers and vLLM; AutoAWQ then cannot tell it apart); anything else by
    its full path (``lm_head``)."""
    inner = re.compile(rf"^{re.escape(blocks)}\.\d+\.(.+)$")

    def matches_quantized(entry: str) -> bool:  # (a path in the block is a tail of the full path)
        return any(entry in q for q in quantized)

    out: list[str] = []
    for name in unconverted:
        m = inner.match(name)
        entry = m.group(1) if m and not matches_quantized(m.group(1)) else name
        if entry not in out:
            out.append(entry)
    clash = [e for e in out if matches_quantized(e)]
    if clash:
        raise ValueError(f"modules_to_not_convert entries {clash} would also match quantized linears")
    return out


def config_naming_unconverted(model: torch.nn.Module, spec: ArchSpec, qcfg: QuantConfig) -> QuantConfig:
    """``qcfg`` as config.json must state it for ``model``: ``modules_to_not_convert`` names every
    unquantized linear a reader would otherwise replace by an empty quantized one.  A plain decoder
    whose only unquantized linear is the output head keeps ``null`` (readers leave the head alone
    then, and AutoAWQ writes ``null`` too); once there is a list, transformers 4.x takes it instead
    of its own default, so the head is on it."""
    unconverted, quantized = unconverted_linears(model)
    head = next((n for n, m in model.named_modules() if m is model.get_output_embeddings()), None) \
        if hasattr(model, "get_output_embeddings") else None
    blocks = find_blocks(model, spec)[0]
    entries = not_convert_entries([to_checkpoint_name(n, spec) for n in unconverted],
                                  [to_checkpoint_name(n, spec) for n in quantized], to_checkpoint_name(blocks, spec))
    head_entry = to_checkpoint_name(head, spec) if head else None
    if not qcfg.modules_to_not_convert and all(e == head_entry for e in entries):
        return qcfg
    return qcfg.naming_unconverted(entries)


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
        try:  # by the checkpoint rules: a config.json linked from outside the folder is not the source's own
            return read_json_object(Path(source_folder), "config.json")
        except ValueError as e:  # transformers did read it: the loaded config is the next best thing
            log.warning("awqlib: config.json written from the loaded config, not copied from the source: %s", e)
    d = model_config.to_dict()
    d.pop("_name_or_path", None)  # where it was loaded from: a local path is nobody else's business
    for k, v in legacy_rope_keys(d.get("rope_parameters")).items():
        d.setdefault(k, v)
    # keys transformers 5 renamed keep their old name too (Qwen3-MoE's num_experts is now
    # num_local_experts: a 4.x reader would build 128 experts by default)
    for old, new in getattr(type(model_config), "attribute_map", {}).items():
        if new in d and old not in d:
            d[old] = d[new]
    return d


def write_config(folder: Path, source_folder: Path | None, model_config, qcfg: QuantConfig,
                 remote_code: bool = False) -> None:
    """config.json of the quantized checkpoint. ``remote_code``: the model was loaded with
    trust_remote_code=True; otherwise its weights were produced by transformers' own class, and an
    ``auto_map`` kept would have a trusting reader build the model from code that never ran here."""
    cfg = quantized_config_dict(source_config_dict(source_folder, model_config), qcfg)
    if not remote_code and cfg.pop("auto_map", None) is not None:
        log.warning("awqlib: the source's config.json has an auto_map (remote code) but the model was loaded "
                    "without trust_remote_code=True: auto_map left out of the quantized config.json")
    (Path(folder) / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str) + "\n")


# Tokenizer files as transformers, sentencepiece and tiktoken tokenizers name them.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json", "vocab.txt",
                   "merges.txt", "chat_template.jinja", "chat_template.json")
TOKENIZER_GLOBS = ("*.tiktoken", "tokenizer*.model*", "additional_chat_templates/*.jinja")


def is_tokenizer_file(name: str) -> bool:
    """``name`` (a path relative to a checkpoint folder) is one of the tokenizer's files."""
    return name in TOKENIZER_FILES or any(fnmatch(name, g) for g in TOKENIZER_GLOBS)


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
    folder = Path(folder)
    if not has_remote_code(json_object_or_empty(folder / "config.json"),
                           json_object_or_empty(folder / "tokenizer_config.json")):
        return []
    return sorted(p.relative_to(folder) for p in folder.glob("*.py"))


def copy_tokenizer_files(source_folder: Path | None, folder: Path, remote_code: bool = False) -> bool:
    """Copy the source's tokenizer files verbatim (a transformers 5 re-save rewrites
    ``tokenizer_class``, which transformers 4.x refuses), and, for a model loaded with
    trust_remote_code=True (``remote_code``), its code files (its ``auto_map`` stays in config.json:
    :func:`write_config`; otherwise tokenizer_config.json loses its ``auto_map``); False where there
    is no tokenizer to copy."""
    files = [rel for rel in tokenizer_files(source_folder) if copy_source_file(source_folder, rel, folder)]
    code = remote_code_files(source_folder)
    if code and not remote_code:
        log.warning("awqlib: not copying the source's code files %s: the model was loaded without "
                    "trust_remote_code=True", [str(p) for p in code])
    tok_cfg = Path(folder) / "tokenizer_config.json"
    if not remote_code and tok_cfg.is_file():
        # its auto_map would point a trusting reader at code that is not copied (or never ran here);
        # only that key is dropped: everything else stays verbatim
        try:  # by the one JSON reader: a file it refuses must not fail the save at its very end
            d = read_json_object(Path(folder), "tokenizer_config.json")
        except (OSError, ValueError) as e:  # transformers cannot read it either: its auto_map does nothing
            log.warning("awqlib: tokenizer_config.json copied as it is: %s", e)
            d = {}
        if d.pop("auto_map", None) is not None:
            tok_cfg.write_text(json.dumps(d, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            log.warning("awqlib: tokenizer_config.json's auto_map (remote code) left out: the model was loaded "
                        "without trust_remote_code=True")
    for rel in code if remote_code else []:
        copy_source_file(source_folder, rel, folder)
    return bool(files)


def copy_source_file(source_folder: Path, rel: str | os.PathLike, folder: Path) -> bool:
    """Copy ``source_folder/rel`` to ``folder/rel`` if it really lies inside the source folder: a
    symlink pointing elsewhere (``chat_template.jinja -> ~/.ssh/id_rsa`` in a cloned repo) would
    otherwise be copied into the checkpoint and uploaded by push_to_hub.  False (and a warning)
    where it is refused."""
    try:
        src = confined(Path(source_folder), Path(rel).as_posix())
    except (ValueError, FileNotFoundError) as e:
        log.warning("awqlib: not copying %s from the source folder: %s", rel, e)
        return False
    (Path(folder) / rel).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, Path(folder) / rel)
    return True


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


safetensors_files = weight_files  # the name earlier releases exported


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




def _stored_shapes(expect: dict[str, torch.Tensor], qcfg: QuantConfig):
    """(name, shape on disk, tensor) for the model's (meta) state dict ``expect``: its own shapes,
    except that a GEMV checkpoint stores each quantized linear in AutoAWQ's GEMV layout."""
    for k, t in expect.items():
        prefix, _, leaf = k.rpartition(".")
        if qcfg.version == "gemv" and leaf in ("qweight", "qzeros", "scales"):
            kk, npk = expect[f"{prefix}.qweight"].shape  # GEMM: [in, out / pack]
            yield k, gemv_shapes(kk, npk * pack_factor(qcfg.bits), qcfg.group_size, qcfg.bits)[leaf], t
        else:
            yield k, tuple(t.shape), t


def load_quantized_state(files: list[Path], spec: ArchSpec, qcfg: QuantConfig, dtype: torch.dtype | None = None,
                         place: Callable[[str], torch.device] | None = None,
                         expect: dict[str, torch.Tensor] | None = None, optional: tuple[str, ...] = ()
                         ) -> dict[str, torch.Tensor]:
    """All tensors, module-named, GEMV layouts converted to GEMM.

    ``expect``: the model's (meta) state dict; every header is checked against it (names, dtypes,
    GEMM shapes) before any tensor data is read; ``optional``: names that may be absent.

    ``dtype``: floating tensors other than ``scales`` (which the format keeps in fp16) are cast to it.
    ``place(name)``: the device each tensor goes to as soon as it is read, before any cast: safetensors
    maps the file without copying, so a load onto a GPU makes no host copy of the model (a GEMV
    module's three tensors are converted on the host first)."""
    state: dict[str, torch.Tensor] = {}
    pending: dict[str, dict[str, torch.Tensor]] = {}  # GEMV: a module's tensors until all three are read

    folder = files[0].parent if files else "the checkpoint"

    def put(name: str, t: torch.Tensor) -> None:
        bad = nonfinite_count(t)  # as read (on the host: ``place`` may be any device, meta included)
        if bad:  # it would load, and its NaN could vanish in attention: a model silently wrong
            raise ValueError(f"{folder}: checkpoint tensor {to_checkpoint_name(name, spec)} has {bad} NaN/inf "
                             f"value(s) of {t.numel()}: the checkpoint is damaged; re-download or re-quantize it")
        if place is not None:
            t = t.to(place(name))
        if dtype is not None and t.is_floating_point() and not name.endswith(".scales"):
            t = t.to(dtype)
        state[name] = t

    where = tensor_index(files)
    if expect is not None:
        check_expected(where, {to_checkpoint_name(k, spec): (tag_of(t), shape)
                               for k, shape, t in _stored_shapes(expect, qcfg)}, folder,
                       optional=[to_checkpoint_name(k, spec) for k in optional])
    for k, t in iter_tensors(files, where):
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
