"""The user-facing API: ``AutoAWQ.from_pretrained / quantize / save_quantized / from_quantized``.

The work is done below: :mod:`awqlib.pipeline` (the block driver), :mod:`awqlib.loading`
(``from_quantized``), :mod:`awqlib.placement` (accelerate), :mod:`awqlib.checkpoint` (writing).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import awq, pipeline
from . import lazy as lazy_mod
from .arch import ArchSpec, get_spec
from .arch.blocks import check_quantizable, get_blocks
from .calib import describe as describe_calib, get_calib_tokens
from .checkpoint import (AtomicDir, checkpoint_state, config_naming_unconverted, copy_source_file, copy_tokenizer_files,
                         local_source_folder, resolve_folder, write_config, write_shards)
from .config import QuantConfig
from .loading import load_quantized, resolve_dtype
from .modules import repack_for_kernels
from .packing import runtime_layout
from .moe import unfuse_experts
from .safetensors_io import parse_size
from .userargs import check_kwargs, pick_dtype

log = logging.getLogger("awqlib")


class AWQModel(nn.Module):
    """A transformers causal LM plus what awqlib knows about it: its architecture spec, its
    quantization config once quantized, the tokenizer, and the reports of the last quantization."""

    def __init__(self, model: nn.Module, spec: ArchSpec, quant_config: QuantConfig | None = None,
                 tokenizer=None, quantized: bool = False, name_or_path: str | None = None,
                 reader: "lazy_mod.ShardReader | None" = None, source_folder: str | os.PathLike | None = None,
                 trust_remote_code: bool = False):
        super().__init__()
        # loaded with trust_remote_code=True: only then does the output keep the source's code files
        # and auto_map (otherwise transformers' own class produced the weights)
        self.trust_remote_code = trust_remote_code
        # the local folder the model was read from: its config.json and tokenizer files are copied
        # into the quantized checkpoint (None: written from memory)
        self.source_folder = Path(source_folder) if source_folder is not None else None
        self.reader = reader
        self.model = model
        self.spec = spec
        self.quant_config = quant_config
        self.tokenizer = tokenizer
        self.quantized = quantized
        self.name_or_path = name_or_path
        self.loaded_quantized = quantized  # read from a quantized checkpoint: its source is not an fp base
        self.reports: list[awq.BlockReport] = []
        self.stats: dict[str, Any] = {}
        self.saved_to: Path | None = None  # where quantize(save_dir=...) wrote the checkpoint
        # set while quantize() changes the model in place: a run that failed half-way leaves some
        # blocks quantized and maybe a scale half-folded, so the object cannot be quantized again
        self.interrupted = False

    # the wrapped model's attributes that scripts use on the wrapper
    @property
    def config(self):
        return self.model.config

    @property
    def generation_config(self):
        return self.model.generation_config

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def hf_device_map(self) -> dict | None:
        return getattr(self.model, "hf_device_map", None)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.model.generate(*args, **kwargs)

    # ------------------------------------------------------------------------------------------ quantize
    @torch.no_grad()
    def quantize(self, tokenizer=None, quant_config: dict | QuantConfig | None = None, calib_data: Any = "pileval",
                 split: str = "validation", text_column: str = "text", n_samples: int = 128, seqlen: int = 512,
                 duo_scaling: bool = True, apply_clip: bool = True, device: str | torch.device | None = None,
                 method: str = awq.DEFAULT_METHOD, save_dir: str | os.PathLike | None = None,
                 overwrite: bool | str = False, max_shard_size: int | str = "5GB", **options) -> "AWQModel":
        """Quantize every decoder linear, one block at a time. ``method``: 'awq+gptq' (AWQ's scaling and
        clipping, then GPTQ error feedback on AWQ's grid), 'awq', or 'rtn' (round-to-nearest); all three
        write the same AWQ GEMM format.

        ``save_dir``: write each block to disk as it finishes and the final checkpoint at the end; an
        interrupted run resumes from the last finished block when called again with the same folder
        and settings (see :mod:`awqlib.resume`); at the end the blocks are consolidated into shards
        of at most ``max_shard_size``. Required for models loaded with ``lazy=True`` (their blocks
        are freed as they finish). ``overwrite``: True replaces an existing awqlib checkpoint,
        "force" any folder but the source (see :mod:`awqlib.outputs`). ``options`` are :class:`awqlib.awq.AWQOptions` fields (n_grid, max_search_tokens, ...).
        """
        if self.quantized:
            raise RuntimeError("this model is already quantized")
        if self.interrupted:
            raise RuntimeError(
                "an earlier quantize() on this object stopped half-way and left it partly quantized: load the "
                "model again (AutoAWQ.from_pretrained) and rerun quantize(save_dir=...) with the same settings; "
                "it resumes from the blocks already written there")
        parse_size(max_shard_size)  # a bad size fails now, not after the last block
        runtime_layout()  # so does a bad $AWQLIB_LAYOUT (the layout linears left on a GPU get)
        if self.reader is not None and save_dir is None:
            raise ValueError("a model loaded with lazy=True frees each block once it is quantized: pass "
                             "save_dir=... so that finished blocks are written to disk")
        qcfg = QuantConfig.from_user(quant_config)
        if qcfg.version != "gemm":
            log.warning("awqlib writes the GEMM layout (what vLLM/SGLang/transformers read); version=%r is "
                        "accepted for AutoAWQ compatibility and stored as 'gemm'", qcfg.version)
        opts = awq.make_options(method, duo_scaling=duo_scaling, apply_clip=apply_clip, **options)
        check_quantizable(self.model, self.spec, qcfg)  # before any work
        self.tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        source = pipeline.block_source(self.model, self.spec, self.reader, device)
        tokens = None if method == "rtn" else get_calib_tokens(calib_data, self.tokenizer, n_samples, seqlen, split,
                                                              text_column)
        self.stats["calibration"] = {"method": method} if tokens is None else {
            "method": method, "data": describe_calib(calib_data, split), "n_samples": n_samples, "seqlen": seqlen,
            "sequences": int(tokens.shape[0])}
        try:
            run = pipeline.quantize_blocks(source, qcfg, opts, method, tokens, save_dir, overwrite,
                                           self.source_folder)
        except BaseException:
            self.interrupted = source.touched
            raise
        self.reports, self.stats["quantize_seconds"] = run.reports, run.seconds
        self.quant_config, self.quantized = qcfg, True
        if run.store is not None:
            try:
                run.store.finalize(source.rest_state(), self._write_extras, max_shard_size)
            finally:
                run.store.close()
            self.saved_to = run.store.out
        return self

    # ------------------------------------------------------------------------------------------ save
    def _write_extras(self, folder: Path, tokenizer=None, perplexity=None, **card) -> None:
        """config.json (the source's keys + quantization_config), generation config, tokenizer, model card.

        The source's tokenizer files are copied verbatim; a tokenizer object is saved only where
        the source has none, or when it is passed here explicitly (``save_quantized(tokenizer=...)``)."""
        src = self.source_folder
        write_config(folder, src, self.model.config, config_naming_unconverted(self.model, self.spec, self.quant_config),
                     remote_code=self.trust_remote_code)
        copied = src is not None and (src / "generation_config.json").is_file() and \
            copy_source_file(src, "generation_config.json", folder)
        if not copied and getattr(self.model, "generation_config", None) is not None:
            self.model.generation_config.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        elif not copy_tokenizer_files(src, folder, remote_code=self.trust_remote_code) and self.tokenizer is not None:
            self.tokenizer.save_pretrained(folder)
        from .hub import write_model_card
        write_model_card(folder, self, perplexity=perplexity, **card)

    def tile_for_kernels(self) -> int:
        """Repack every quantized linear on CUDA into the runtime layout the CUDA kernels read
        fastest (done by ``from_quantized`` and ``quantize`` on CUDA; checkpoints keep the GEMM
        layout).  Returns how many linears were repacked; does nothing where the CUDA kernels are
        unavailable."""
        return repack_for_kernels(self.model)

    def save_quantized(self, save_dir: str | os.PathLike, overwrite: bool | str = False,
                       max_shard_size: int | str = "5GB", tokenizer=None, perplexity=None,
                       base_model: str | list | None = None, license: str | None = None) -> Path:
        """Write safetensors shards (+ index), config.json with quantization_config, the tokenizer,
        a model card; atomically (temporary folder, then rename).  ``perplexity``: measured quality
        for the card, an :class:`awqlib.hub.Perplexity` or a dict of its fields.  ``base_model`` /
        ``license``: the card's metadata (by default from the source: :func:`awqlib.hub.card_metadata`).
        ``overwrite``: True replaces an existing awqlib checkpoint, "force" any folder but the source
        (:mod:`awqlib.outputs`)."""
        if not self.quantized:
            raise RuntimeError("call quantize() before save_quantized()")
        if self.reader is not None:
            raise RuntimeError("a lazily loaded model is saved by quantize(save_dir=...) as it goes; its blocks "
                               f"are no longer in memory (saved to {self.saved_to})")
        state = checkpoint_state(self.model, self.spec)
        atomic = AtomicDir(save_dir, overwrite, source=self.source_folder)
        with atomic as tmp:
            write_shards(state, tmp, max_shard_size)
            self._write_extras(tmp, tokenizer, perplexity, base_model=base_model, license=license)
        return atomic.target

    def save_pretrained(self, save_dir, **kwargs):
        return self.save_quantized(save_dir, **kwargs)

    def push_to_hub(self, repo_id: str, private: bool | None = None, token: str | None = None,
                    commit_message: str = "Upload AWQ checkpoint (awqlib)", local_dir: str | None = None,
                    **kwargs) -> str:
        from .hub import push_to_hub
        return push_to_hub(self, repo_id, private=private, token=token, commit_message=commit_message,
                           local_dir=local_dir, **kwargs)


class AutoAWQ:
    """Entry points, named as in AutoAWQ so that scripts port unchanged."""

    @staticmethod
    def from_pretrained(model_path: str, torch_dtype: Any = "auto", trust_remote_code: bool = False,
                        tokenizer: Any = None, lazy: bool = False, dtype: Any = None,
                        low_cpu_mem_usage: bool = True, **kwargs) -> AWQModel:
        """Load an fp16/bf16/fp32 model to quantize. ``lazy=True`` reads nothing up front: blocks are
        loaded from the safetensors shards one at a time during ``quantize(save_dir=...)``, so a
        model larger than memory can be quantized.  ``dtype`` is transformers 5's name for
        ``torch_dtype``; ``low_cpu_mem_usage`` (AutoAWQ's habit) has no effect: the model is always
        loaded that way.  Other keyword arguments go to transformers' ``from_pretrained``."""
        torch_dtype = pick_dtype(torch_dtype, dtype)
        if not low_cpu_mem_usage:
            log.info("awqlib: from_pretrained(low_cpu_mem_usage=False) has no effect: models are always loaded "
                     "with low CPU memory usage")
        from transformers import AutoConfig, AutoModelForCausalLM
        config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        if getattr(config, "quantization_config", None) is not None:
            raise ValueError(f"{model_path} is already quantized ({config.quantization_config}); load it with "
                             "AutoAWQ.from_quantized, or quantize the original fp16/bf16 model")
        spec = get_spec(config.model_type)
        if lazy:
            if kwargs:
                raise ValueError(
                    f"lazy=True reads blocks straight from the safetensors files; {sorted(kwargs)} do not apply "
                    "(device_map in particular: a lazy run puts one block at a time on quantize(device=...)). "
                    "Drop them, or load without lazy=True to use them.")
            from accelerate import init_empty_weights
            folder = resolve_folder(model_path)
            reader = lazy_mod.ShardReader(folder)
            dtype = resolve_dtype(torch_dtype, torch.device("cuda"), config)
            with init_empty_weights(include_buffers=False):
                model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
            if spec.experts is not None:
                for blk in get_blocks(model, spec):
                    unfuse_experts(blk, spec.experts)
            reader.check_against(model, spec)
            return AWQModel(model.eval(), spec, tokenizer=tokenizer, name_or_path=str(model_path), reader=reader,
                            source_folder=folder, trust_remote_code=trust_remote_code)
        dtype = torch_dtype if torch_dtype != "auto" else "auto"
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, trust_remote_code=trust_remote_code,
                                                     low_cpu_mem_usage=True, **kwargs)
        model.eval()
        return AWQModel(model, spec, tokenizer=tokenizer, name_or_path=str(model_path),
                        source_folder=local_source_folder(model_path, kwargs.get("revision")),
                        trust_remote_code=trust_remote_code)

    @staticmethod
    def from_model(model: nn.Module, tokenizer=None) -> AWQModel:
        """Wrap an already-loaded transformers model (e.g. built from a config in a test)."""
        return AWQModel(model.eval(), get_spec(model.config.model_type), tokenizer=tokenizer,
                        name_or_path=getattr(model.config, "_name_or_path", None))

    @staticmethod
    def from_quantized(quant_path: str, device: str | torch.device | None = None, torch_dtype: Any = "auto",
                       fuse_layers: bool = False, trust_remote_code: bool = False, revision: str | None = None,
                       token: str | None = None, device_map: str | dict | None = None,
                       max_memory: dict | None = None, offload_folder: str | os.PathLike | None = None,
                       dtype: Any = None, download_kwargs: dict | None = None, **kwargs) -> AWQModel:
        """Load an AWQ checkpoint (ours or any AutoAWQ-format one) for inference.

        ``device``: one device for the whole model (default "cpu").  ``device_map``: let accelerate
        place it over several GPUs (and the CPU/disk): "auto", "balanced", "balanced_low_0",
        "sequential" or an explicit {module name: device} dict, with ``max_memory`` per device
        ({0: "20GiB", 1: "20GiB", "cpu": "64GiB"}) and ``offload_folder`` for "disk" entries;
        decoder blocks are never split.  Quantized linears on CUDA run the awqlib kernels.
        ``dtype``: transformers 5's name for ``torch_dtype``.  ``download_kwargs``: more arguments of
        huggingface_hub's ``snapshot_download`` (AutoAWQ's name).  AutoAWQ's ``use_exllama``,
        ``use_exllama_v2``, ``use_ipex``, ``max_seq_len``, ``batch_size``, ``low_cpu_mem_usage`` are
        accepted and have no effect (logged); any other keyword is an error."""
        check_kwargs(AutoAWQ.from_quantized, kwargs)
        ckpt = load_quantized(quant_path, device, pick_dtype(torch_dtype, dtype), fuse_layers, trust_remote_code,
                              revision, token, device_map, max_memory, offload_folder, download_kwargs)
        return AWQModel(ckpt.model, ckpt.spec, ckpt.quant_config, tokenizer=ckpt.tokenizer, quantized=True,
                        name_or_path=str(quant_path), source_folder=ckpt.folder, trust_remote_code=trust_remote_code)


AutoAWQForCausalLM = AutoAWQ  # AutoAWQ's own name
