"""Model card and Hugging Face Hub upload for awqlib checkpoints.

``write_model_card(folder, model, perplexity=...)`` is called by ``AWQModel.save_quantized`` once the shards,
config.json, generation config and tokenizer are in ``folder``; it writes README.md with the
Hub's YAML metadata, the quantization settings, the tensor-parallel sizes vLLM accepts
(from :func:`awqlib.compat.validate_checkpoint`) and how to load the checkpoint in awqlib,
vLLM, SGLang and transformers.

``push_to_hub(model, repo_id, ...)`` saves into a local folder and uploads exactly
:func:`staged_files` with huggingface_hub's public API (``HfApi.create_repo`` + one
``HfApi.create_commit``).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("awqlib")

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_TEMP_SUFFIXES = (".tmp", ".lock", ".part", ".incomplete", "~", ".swp")
REPO_PLACEHOLDER = "<this-repo-or-folder>"
# Kinds of checkpoint files (awqlib.outputs.CHECKPOINT_FILES) that a push never deletes: the repo's
# own licence and git attributes, which an awqlib upload does not carry.
KEPT_ON_PUSH = frozenset({".gitattributes", "LICENSE", "LICENSE.md", "LICENSE.txt", "NOTICE", "USE_POLICY.md"})
# what push_to_hub passes on to HfApi.create_commit
COMMIT_ARGUMENTS = ("revision", "create_pr", "commit_description", "parent_commit", "num_threads")
_DEFAULT = object()


@dataclass(frozen=True)
class Perplexity:
    """Measured quality for the model card (e.g. from :func:`awqlib.eval.perplexity`)."""
    awq: float                      # the quantized model's perplexity
    fp: float | None = None         # the original model's, on the same text and windows
    dataset: str | None = None      # what it was measured on
    windows: int | None = None      # how many seqlen-token windows

    @classmethod
    def of(cls, value: "Perplexity | dict | None") -> "Perplexity | None":
        """A :class:`Perplexity` from itself, None, or a dict of its fields (unknown keys are errors)."""
        if value is None or isinstance(value, cls):
            return value
        unknown = set(value) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"perplexity: unknown keys {sorted(unknown)}; use {list(cls.__dataclass_fields__)}")
        return cls(**value)


def looks_like_hub_id(name: str | None) -> bool:
    """``org/name`` that is not an existing local path (what the Hub's ``base_model`` accepts)."""
    if not name or not _HUB_ID.match(str(name)) or ".." in str(name):
        return False
    return not Path(str(name)).exists()


def _yaml_str(s: str) -> str:
    return json.dumps(str(s))  # a JSON string is a valid YAML scalar


def read_front_matter(folder: Path | None) -> dict[str, Any]:
    """The YAML metadata of ``folder/README.md`` (a Hub model card), {} where there is none."""
    card = Path(folder) / "README.md" if folder is not None else None
    if card is None or not card.is_file():
        return {}
    try:
        from huggingface_hub import metadata_load
        return metadata_load(card) or {}
    except Exception as e:  # a malformed card is the source's problem, not a reason to fail the save
        log.warning("awqlib: could not read the metadata of %s (%s: %s)", card.name, type(e).__name__, e)
        return {}


def snapshot_repo_id(folder: Path | None) -> str | None:
    """``org/name`` of a Hub cache snapshot folder (``.../models--org--name/snapshots/<sha>``)."""
    if folder is None:
        return None
    parts = Path(folder).resolve().parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        repo = parts[-3][len("models--"):].replace("--", "/", 1)
        return repo if _HUB_ID.match(repo) else None
    return None


def card_metadata(model, base_model: str | list | None = None, license: str | None = None) -> dict[str, Any]:
    """``base_model``, ``license`` (+ ``license_name`` / ``license_link``) for the card's front matter.

    Explicit arguments win.  Otherwise: a model quantized here has the Hub id it was loaded from as
    its base (a local folder only when it is a Hub cache snapshot); a checkpoint that was loaded
    quantized (``from_quantized``) keeps the base_model of its own card, never itself.  The license
    is carried over from the source's card."""
    source = getattr(model, "source_folder", None)
    meta = read_front_matter(source)
    if getattr(model, "loaded_quantized", False):
        base = meta.get("base_model")
    else:
        name = getattr(model, "name_or_path", None)
        base = str(name) if looks_like_hub_id(name) else snapshot_repo_id(source)
    out: dict[str, Any] = {"base_model": base_model or base}
    if license:
        out["license"] = license
    else:
        out.update({k: meta[k] for k in ("license", "license_name", "license_link") if meta.get(k)})
    return out


def _yaml_value(v) -> str:
    if isinstance(v, (list, tuple)):
        return "".join(f"\n- {_yaml_str(x)}" for x in v)
    return " " + _yaml_str(v)


def _front_matter(meta: dict[str, Any], quantized_by: str | None = "awqlib") -> str:
    lines = ["---"]
    if meta.get("base_model"):
        lines += [f"base_model:{_yaml_value(meta['base_model'])}", "base_model_relation: quantized"]
    for k in ("license", "license_name", "license_link"):
        if meta.get(k):
            lines.append(f"{k}:{_yaml_value(meta[k])}")
    lines += ["library_name: transformers", "tags:", "- awq", "- 4-bit", "- awqlib",
              "pipeline_tag: text-generation"]
    if quantized_by:
        lines.append(f"quantized_by: {_yaml_str(quantized_by)}")
    lines.append("---")
    return "\n".join(lines) + "\n"


def _no_path(message: str, folder: Path) -> str:
    return message.replace(str(folder), "this checkpoint")


def _validation_section(folder: Path) -> tuple[list[str], list[int]]:
    try:
        from .compat import validate_checkpoint
        rep = validate_checkpoint(folder)
    except Exception as e:  # the card must never be the reason a save fails
        log.warning("awqlib: could not check %s against vLLM's AWQ rules (%s: %s)", folder, type(e).__name__, e)
        return ["Not checked (the validator failed: see the awqlib log).", ""], []
    out = []
    if rep.ok:
        out.append(f"Checked with `python -m awqlib.compat` against vLLM's AWQ loading rules (tensor names, dtypes, "
                   f"shapes, group/pack alignment per shard): **loadable**. Valid `--tensor-parallel-size`: "
                   f"**{', '.join(map(str, rep.valid_tp)) or 'none of 1, 2, 4, 8'}**"
                   + (f" (every linear runs the Marlin kernel on CUDA at TP {', '.join(map(str, rep.marlin_tp))})"
                      if rep.marlin_tp else "") + ".")
    else:
        out.append("Checked with `python -m awqlib.compat`: **vLLM / SGLang cannot load this checkpoint**:")
        out.append("")
        out += [f"- {_no_path(f.message, folder)}" for f in rep.errors]
    if rep.warnings:
        out += ["", "Warnings:", ""] + [f"- {_no_path(f.message, folder)}" for f in rep.warnings]
    out.append("")
    return out, rep.valid_tp if rep.ok else []


def render_model_card(folder: Path, model, repo_id: str | None = None,
                      perplexity: Perplexity | dict | None = None, base_model: str | list | None = None,
                      license: str | None = None) -> str:
    """The card's text.  It never names a local path: a local source appears by its folder name."""
    from .version import __version__
    folder = Path(folder)
    qc = model.quant_config.to_hf_dict()
    name_or_path = getattr(model, "name_or_path", None)
    meta = card_metadata(model, base_model, license)
    base = meta["base_model"]
    first_base = base[0] if isinstance(base, (list, tuple)) and base else base
    cfg = getattr(getattr(model, "model", None), "config", None)
    arch = ", ".join(getattr(cfg, "architectures", None) or []) or getattr(cfg, "model_type", "?")
    stats: dict[str, Any] = dict(getattr(model, "stats", None) or {})
    repo = repo_id or REPO_PLACEHOLDER
    local_name = Path(str(name_or_path)).name if name_or_path else None
    title = (first_base or local_name or "model") + " (AWQ 4-bit)"

    lines = [_front_matter(meta), f"# {title}", ""]
    src = (f"[{first_base}](https://huggingface.co/{first_base})" if first_base
           else f"`{local_name}`" if local_name else "an unnamed model")
    lines += [f"4-bit AWQ quantization of {src} ({arch}), made with "
              f"awqlib {__version__} and stored in the GEMM layout that AutoAWQ, vLLM, SGLang and "
              "transformers read.", ""]

    lines += ["## Quantization", "", "| setting | value |", "| --- | --- |"]
    for k in ("quant_method", "bits", "group_size", "zero_point", "version", "modules_to_not_convert"):
        lines.append(f"| {k} | `{qc.get(k)}` |")
    calib = stats.get("calibration") or {}
    if calib.get("method"):
        from .awq import METHODS
        lines.append(f"| method | {METHODS.get(calib['method'], calib['method'])} |")
    if calib.get("data"):
        lines.append(f"| calibration data | {calib['data']} |")
        lines.append(f"| calibration samples | {calib['n_samples']} requested, {calib['sequences']} sequences "
                     f"of {calib['seqlen']} tokens |")
    if "quantize_seconds" in stats:
        lines.append(f"| quantization time | {stats['quantize_seconds']:.1f} s |")
    lines.append(f"| awqlib version | {__version__} |")
    lines.append("")

    ppl = Perplexity.of(perplexity)
    if ppl is not None:
        lines += ["## Measured quality", "",
                  f"Perplexity on {ppl.dataset or '?'}" + (f" ({ppl.windows} windows)" if ppl.windows is not None else "")
                  + ", lower is better:", "", "| model | perplexity |", "| --- | --- |"]
        if ppl.fp is not None:
            lines.append(f"| original (fp) | {float(ppl.fp):.3f} |")
        lines.append(f"| AWQ 4-bit | {float(ppl.awq):.3f} |")
        lines.append("")

    check, valid_tp = _validation_section(folder)
    lines += ["## Compatibility", ""] + check
    tp = max(valid_tp) if valid_tp else None

    lines += ["## Usage", "", "### awqlib", "", "```python", "from awqlib import AutoAWQ",
              f'model = AutoAWQ.from_quantized("{repo}", device="cuda")  # or device="cpu"',
              'ids = model.tokenizer("Hello", return_tensors="pt").input_ids.to(model.device)',
              "print(model.tokenizer.decode(model.generate(ids, max_new_tokens=32)[0]))", "```", ""]
    lines += ["### vLLM", "", "```bash",
              f"vllm serve {repo}                   # vLLM picks its AWQ kernel (Marlin on CUDA); fp16 or bf16",
              f"vllm serve {repo} --dtype float16   # older releases (awq.py / awq_marlin.py): fp16 on every kernel"]
    if tp and tp > 1:
        lines.append(f"vllm serve {repo} --dtype float16 --tensor-parallel-size {tp}"
                     f"  # valid sizes: {', '.join(map(str, valid_tp))}")
    lines += ["```", ""]
    lines += ["### SGLang", "", "```bash",
              f"python -m sglang.launch_server --model-path {repo} --dtype float16"
              + (f" --tp-size {tp}" if tp and tp > 1 else ""), "```", ""]
    lines += ["### transformers", "",
              "transformers (5.x) reads AWQ checkpoints through the `gptqmodel` package (`pip install gptqmodel`)"
              + (" (on the CPU, group size -1 may not load: gptqmodel's aten CPU kernel takes group sizes 32..256)"
                 if qc.get("group_size") == -1 else "") + ":",
              "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              f'model = AutoModelForCausalLM.from_pretrained("{repo}", device_map="auto")',
              f'tok = AutoTokenizer.from_pretrained("{repo}")', "```", ""]
    return "\n".join(lines)


def write_model_card(folder: Path, model, repo_id: str | None = None,
                     perplexity: Perplexity | dict | None = None, **meta) -> None:
    """Write ``folder/README.md`` (called by ``AWQModel.save_quantized`` and by :func:`push_to_hub`);
    ``meta``: ``base_model``, ``license``."""
    folder = Path(folder)
    (folder / "README.md").write_text(render_model_card(folder, model, repo_id, perplexity, **meta),
                                      encoding="utf-8")


def staged_files(folder: str | Path) -> list[str]:
    """The files :func:`push_to_hub` uploads: every regular file under ``folder`` (POSIX relative
    paths, sorted) except hidden ones (any path part starting with '.'), temporary or partial
    files, and ``__pycache__``."""
    folder = Path(folder)
    out = []
    for p in folder.rglob("*"):
        rel = p.relative_to(folder)
        if not p.is_file() or p.is_symlink():
            continue
        if any(part.startswith(".") or part == "__pycache__" for part in rel.parts):
            continue
        if p.name.endswith(_TEMP_SUFFIXES) or ".tmp-" in p.name:
            continue
        out.append(rel.as_posix())
    return sorted(out)


def stale_remote_files(api, repo_id: str, uploading: list[str], revision: str | None = None) -> list[str]:
    """Files an earlier awqlib push left in ``repo_id`` that this upload (``uploading``) does not replace
    (e.g. the shards of another sharding): top-level names of the kinds a checkpoint folder holds
    (:func:`awqlib.outputs.checkpoint_file_name`, the rule ``overwrite=True`` uses locally), and only
    where the repo's config.json is already an AWQ checkpoint's.  Nothing in a subfolder, nothing of
    another kind: a repo may hold the original weights, adapters, eval results beside the checkpoint."""
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    from .checkpoint import is_tokenizer_file
    from .outputs import checkpoint_file_name, has_remote_code, is_awq_config
    from .safetensors_io import is_shard_name, read_json_object
    try:
        remote = api.list_repo_files(repo_id, revision=revision, repo_type="model")
    except (RepositoryNotFoundError, RevisionNotFoundError):
        return []

    def read(name: str) -> dict:
        if name not in remote:
            return {}
        try:
            path = api.hf_hub_download(repo_id, name, revision=revision, repo_type="model")
            return read_json_object(Path(path).parent, Path(path).name)
        except (EntryNotFoundError, OSError, ValueError):  # unreadable: not an AWQ config, nothing deleted
            return {}
    cfg = read("config.json")
    if not is_awq_config(cfg):
        if remote and set(remote) - {".gitattributes"}:
            log.warning("awqlib: %s holds no AWQ checkpoint (its config.json has no AWQ quantization_config): "
                        "none of its %d files is deleted", repo_id, len(remote))
        return []
    code = has_remote_code(cfg, read("tokenizer_config.json"))
    new = set(uploading)
    stale = [n for n in remote if "/" not in n and n not in new and n not in KEPT_ON_PUSH
             and checkpoint_file_name(n, code)]
    # weights: only the names a save writes (a user's model-fp16.safetensors beside them stays)
    stale = [n for n in stale if not n.endswith(".safetensors") or is_shard_name(n)]
    if not any(is_tokenizer_file(n) for n in new):
        # an upload without a tokenizer (a model quantized without one) does not replace the repo's
        kept = [n for n in stale if is_tokenizer_file(n)]
        if kept:
            log.warning("awqlib: this upload has no tokenizer: %s keeps its %s", repo_id, kept)
        stale = [n for n in stale if n not in kept]
    return sorted(stale)


def push_to_hub(model, repo_id: str, private: bool | None = None, token: str | None = None,
                commit_message: str = "Upload AWQ checkpoint (awqlib)", local_dir: str | None = None,
                **kwargs) -> str:
    """Save ``model`` (quantized) and upload it to the Hub model repo ``repo_id``; return the commit URL.

    ``local_dir``: where to save first (kept afterwards; pass ``overwrite=True`` to replace an
    existing folder); by default a temporary folder that is removed after the upload. A lazily
    loaded model that ``quantize(save_dir=...)`` already wrote is uploaded from that folder (its
    checkpoint files only, with the card rendered for the repo beside them: the folder is not
    changed; the save arguments are errors there).
    ``max_shard_size``, ``overwrite``, ``tokenizer`` go to ``save_quantized``; ``perplexity`` (a
    :class:`Perplexity` or a dict of its fields), ``base_model`` and ``license`` to the model card.

    The upload is one commit (``HfApi.create_commit``; the keyword arguments ``revision``,
    ``create_pr``, ``commit_description``, ``parent_commit``, ``num_threads`` go to it; with
    ``create_pr=True`` the pull request's URL is returned) that also deletes the files an
    earlier awqlib push left and this upload does not replace (:func:`stale_remote_files`): the repo
    (or the pull request) never holds the new weights beside the old index or shards, which awqlib,
    vLLM and transformers would resolve differently, and a failed upload changes nothing.
    ``delete_patterns=None`` deletes nothing; explicit ``delete_patterns`` go to ``upload_folder``
    as they are, instead.
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    if not getattr(model, "quantized", False):
        raise RuntimeError("call quantize() before push_to_hub()")
    card = {k: kwargs.pop(k) for k in ("base_model", "license") if k in kwargs}
    save_kw = {k: kwargs.pop(k) for k in ("max_shard_size", "overwrite", "tokenizer") if k in kwargs}
    delete_patterns = kwargs.pop("delete_patterns", _DEFAULT)
    perplexity = Perplexity.of(kwargs.pop("perplexity", None))
    unknown = sorted(set(kwargs) - set(COMMIT_ARGUMENTS))
    if unknown:
        raise TypeError(f"push_to_hub got unknown argument(s) {unknown}; besides its own it accepts "
                        f"{sorted(COMMIT_ARGUMENTS)} (for HfApi.create_commit), max_shard_size, overwrite, tokenizer, "
                        "perplexity, base_model, license, delete_patterns")
    saved_to = getattr(model, "saved_to", None) if getattr(model, "reader", None) is not None else None
    ignored = [k for k in save_kw] + (["local_dir"] if local_dir is not None else [])
    if saved_to is not None and ignored:
        raise ValueError(f"push_to_hub: {', '.join(ignored)} cannot apply to a lazily loaded model: "
                         f"quantize(save_dir=...) already wrote its checkpoint to {saved_to}, which is uploaded; "
                         "pass them to quantize(save_dir=...) instead")
    tmp = Path(tempfile.mkdtemp(prefix="awqlib-push-"))
    folder = Path(local_dir) if local_dir is not None else tmp / repo_id.replace("/", "--")
    try:
        if saved_to is None:
            model.save_quantized(folder, **save_kw, **card)
            write_model_card(folder, model, repo_id=repo_id, perplexity=perplexity, **card)  # the real repo id
            files = staged_files(folder)
        else:
            files, folder = _stage_saved(Path(saved_to), folder)
            write_model_card(folder, model, repo_id=repo_id, perplexity=perplexity, **card)
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if delete_patterns not in (_DEFAULT, None):  # the user's own patterns
            info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                                     commit_message=commit_message, allow_patterns=files,
                                     delete_patterns=delete_patterns, **kwargs)
            stale = []
        else:
            stale = [] if delete_patterns is None else stale_remote_files(api, repo_id, files, kwargs.get("revision"))
            ops = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(folder / f)) for f in files]
            info = api.create_commit(repo_id, ops + [CommitOperationDelete(path_in_repo=n) for n in stale],
                                     commit_message=commit_message, repo_type="model", **kwargs)
        url = (getattr(info, "pr_url", None) if kwargs.get("create_pr") else None) or getattr(info, "commit_url", None) \
            or str(info)
        log.info("awqlib: uploaded %d files to %s (%s)%s", len(files), repo_id, url,
                 f", removing {stale} of the earlier checkpoint" if stale else "")
        return str(url)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _stage_saved(saved: Path, stage: Path) -> tuple[list[str], Path]:
    """The checkpoint files of ``saved`` (a folder quantize(save_dir=...) wrote; files added there since,
    of other kinds, are not uploaded), linked into ``stage`` so that the card for the repo is written
    there, not over the folder's README.md."""
    from .outputs import foreign_entries
    stage.mkdir(parents=True)
    foreign = set(foreign_entries(saved))
    files = [f for f in staged_files(saved) if f.split("/")[0] not in foreign]
    if foreign:
        log.warning("awqlib: not uploaded (not checkpoint files): %s", sorted(foreign))
    for f in files:
        if f == "README.md":
            continue  # the card for the repo is written here instead
        (stage / f).parent.mkdir(parents=True, exist_ok=True)
        (stage / f).symlink_to((saved / f).resolve())  # CommitOperationAdd reads through links
    return sorted(set(files) | {"README.md"}), stage
