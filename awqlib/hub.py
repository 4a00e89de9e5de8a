"""Model card and Hugging Face Hub upload for awqlib checkpoints.

``write_model_card(folder, model, perplexity=...)`` is called by ``AWQModel.save_quantized`` once the shards,
config.json, generation config and tokenizer are in ``folder``; it writes README.md with the
Hub's YAML metadata, the quantization settings, the tensor-parallel sizes vLLM accepts
(from :func:`awqlib.compat.validate_checkpoint`) and how to load the checkpoint in awqlib,
vLLM, SGLang and transformers.

``push_to_hub(model, repo_id, ...)`` saves into a local folder and uploads exactly
:func:`staged_files` with huggingface_hub's public API (``HfApi.create_repo`` +
``HfApi.upload_folder``).
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


def _front_matter(base_model: str | None, quantized_by: str | None = "awqlib") -> str:
    lines = ["---"]
    if base_model:
        lines += [f"base_model: {_yaml_str(base_model)}", "base_model_relation: quantized"]
    lines += ["library_name: transformers", "tags:", "- awq", "- 4-bit", "- awqlib",
              "pipeline_tag: text-generation"]
    if quantized_by:
        lines.append(f"quantized_by: {_yaml_str(quantized_by)}")
    lines.append("---")
    return "\n".join(lines) + "\n"


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
                   + (f" (every linear runs the awq_marlin kernel at TP {', '.join(map(str, rep.marlin_tp))})"
                      if rep.marlin_tp else "") + ".")
    else:
        out.append("Checked with `python -m awqlib.compat`: **vLLM / SGLang cannot load this checkpoint**:")
        out.append("")
        out += [f"- {f.message}" for f in rep.errors]
    if rep.warnings:
        out += ["", "Warnings:", ""] + [f"- {f.message}" for f in rep.warnings]
    out.append("")
    return out, rep.valid_tp if rep.ok else []


def render_model_card(folder: Path, model, repo_id: str | None = None,
                      perplexity: Perplexity | dict | None = None) -> str:
    folder = Path(folder)
    qc = model.quant_config.to_hf_dict()
    name_or_path = getattr(model, "name_or_path", None)
    base = str(name_or_path) if looks_like_hub_id(name_or_path) else None
    cfg = getattr(getattr(model, "model", None), "config", None)
    arch = ", ".join(getattr(cfg, "architectures", None) or []) or getattr(cfg, "model_type", "?")
    stats: dict[str, Any] = dict(getattr(model, "stats", None) or {})
    repo = repo_id or REPO_PLACEHOLDER
    title = (base or (Path(str(name_or_path)).name if name_or_path else None) or "model") + " (AWQ 4-bit)"

    lines = [_front_matter(base), f"# {title}", ""]
    src = f"[{base}](https://huggingface.co/{base})" if base else (f"`{name_or_path}`" if name_or_path else "an unnamed model")
    lines += [f"4-bit AWQ quantization of {src} ({arch}), made with "
              "awqlib and stored in the GEMM layout that AutoAWQ, vLLM, SGLang and "
              "transformers read.", ""]

    lines += ["## Quantization", "", "| setting | value |", "| --- | --- |"]
    for k in ("quant_method", "bits", "group_size", "zero_point", "version", "modules_to_not_convert"):
        lines.append(f"| {k} | `{qc.get(k)}` |")
    if "quantize_seconds" in stats:
        lines.append(f"| quantization time | {stats['quantize_seconds']:.1f} s |")
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
              f"vllm serve {repo} --dtype float16"
              "                       # sm >= 80: vLLM picks the awq_marlin kernel itself",
              f"vllm serve {repo} --quantization awq --dtype float16"
              "  # forces the plain AWQ kernel (sm >= 75, fp16 only)"]
    if tp and tp > 1:
        lines.append(f"vllm serve {repo} --dtype float16 --tensor-parallel-size {tp}"
                     f"  # valid sizes: {', '.join(map(str, valid_tp))}")
    lines += ["```", ""]
    lines += ["### SGLang", "", "```bash",
              f"python -m sglang.launch_server --model-path {repo} --dtype float16"
              + (f" --tp-size {tp}" if tp and tp > 1 else ""), "```", ""]
    lines += ["### transformers", "",
              "transformers (5.x) reads AWQ checkpoints through the `gptqmodel` package (`pip install gptqmodel`):",
              "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              f'model = AutoModelForCausalLM.from_pretrained("{repo}", device_map="auto")',
              f'tok = AutoTokenizer.from_pretrained("{repo}")', "```", ""]
    return "\n".join(lines)


def write_model_card(folder: Path, model, repo_id: str | None = None,
                     perplexity: Perplexity | dict | None = None) -> None:
    """Write ``folder/README.md`` (called by ``AWQModel.save_quantized`` and by :func:`push_to_hub`)."""
    folder = Path(folder)
    (folder / "README.md").write_text(render_model_card(folder, model, repo_id, perplexity), encoding="utf-8")


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


def push_to_hub(model, repo_id: str, private: bool | None = None, token: str | None = None,
                commit_message: str = "Upload AWQ checkpoint (awqlib)", local_dir: str | None = None,
                **kwargs) -> str:
    """Save ``model`` (quantized) and upload it to the Hub model repo ``repo_id``; return the commit URL.

    ``local_dir``: where to save first (kept afterwards; pass ``overwrite=True`` to replace an
    existing folder); by default a temporary folder that is removed after the upload. A lazily
    loaded model that ``quantize(save_dir=...)`` already wrote is uploaded from that folder.
    ``max_shard_size`` and ``overwrite`` go to ``save_quantized``; ``perplexity`` (a :class:`Perplexity`
    or a dict of its fields) to the model card; other keyword arguments
    (``revision``, ``create_pr``, ...) to ``HfApi.upload_folder``.
    """
    from huggingface_hub import HfApi

    if not getattr(model, "quantized", False):
        raise RuntimeError("call quantize() before push_to_hub()")
    save_kw = {k: kwargs.pop(k) for k in ("max_shard_size", "overwrite", "tokenizer") if k in kwargs}
    perplexity = Perplexity.of(kwargs.pop("perplexity", None))
    tmp = None
    saved_to = getattr(model, "saved_to", None) if getattr(model, "reader", None) is not None else None
    if saved_to is not None:
        folder = Path(saved_to)  # quantize(save_dir=...) on a lazily loaded model already wrote it
    elif local_dir is None:
        tmp = Path(tempfile.mkdtemp(prefix="awqlib-push-"))
        folder = tmp / repo_id.replace("/", "--")
    else:
        folder = Path(local_dir)
    try:
        if saved_to is None:
            model.save_quantized(folder, **save_kw)
        write_model_card(folder, model, repo_id=repo_id, perplexity=perplexity)  # with the real repo id
        files = staged_files(folder)
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                                 commit_message=commit_message, allow_patterns=files, **kwargs)
        url = getattr(info, "commit_url", None) or str(info)
        log.info("awqlib: uploaded %d files to %s (%s)", len(files), repo_id, url)
        return str(url)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
