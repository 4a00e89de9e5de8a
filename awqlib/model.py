"""The user-facing API: ``AutoAWQ.from_pretrained / quantize / save_quantized / from_quantized``."""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from . import awq
from .arch import ArchSpec, get_spec
from .calib import get_calib_tokens
from . import lazy as lazy_mod
from .checkpoint import (AtomicDir, checkpoint_state, from_checkpoint_name, load_quantized_state,
                         quantized_config_dict, resolve_folder, safetensors_files, to_checkpoint_name,
                         write_shards)
from .config import QuantConfig
from .modules import WQLinear
from .moe import unfuse_experts

log = logging.getLogger("awqlib")


def _resolve_dtype(torch_dtype, device: torch.device, config=None) -> torch.dtype:
    if isinstance(torch_dtype, torch.dtype):
        return torch_dtype
    if torch_dtype in (None, "auto"):
        if device.type == "cpu":
            return torch.float32  # fp16 matmuls on CPUs are slow and imprecise
        cfg = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        return torch.bfloat16 if cfg in (torch.bfloat16, "bfloat16") else torch.float16
    return getattr(torch, str(torch_dtype).replace("torch.", ""))


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _move_except_blocks(model: nn.Module, blocks_prefix: str, device: torch.device) -> None:
    """Put the embeddings, final norm, rotary buffers (everything but the blocks) on ``device``."""
    for name, mod in model.named_modules():
        if name == blocks_prefix or name.startswith(blocks_prefix + "."):
            continue
        for pname, p in list(mod.named_parameters(recurse=False)):
            if p.device.type != "meta":  # a lazy model's head stays unloaded
                p.data = p.data.to(device)
        for bname, b in list(mod.named_buffers(recurse=False)):
            if b.device.type != "meta":
                mod._buffers[bname] = b.to(device)


def _dispatched(model: nn.Module) -> bool:
    """True where accelerate placed the model (``device_map=...``): device hooks on its modules."""
    return getattr(model, "hf_device_map", None) is not None and any(
        hasattr(m, "_hf_hook") for m in model.modules())


def _placed_block_device(block: nn.Module, name: str) -> torch.device:
    """The one device a dispatched model's decoder block lives on (it is quantized there)."""
    devices = {t.device for t in list(block.parameters()) + list(block.buffers())}
    if any(d.type == "meta" for d in devices):
        raise ValueError(
            f"{name} was offloaded to cpu/disk by accelerate (its weights are loaded only during forward), so "
            "it cannot be quantized in place. Load the model with lazy=True instead "
            "(AutoAWQ.from_pretrained(path, lazy=True), then quantize(save_dir=...)): it reads one block at a "
            "time from the safetensors files, with less memory than offloading; or use a device_map that keeps "
            "every decoder block on a GPU.")
    if len(devices) > 1:
        raise ValueError(
            f"{name} is split across devices {sorted(map(str, devices))}: keep each decoder block on one device "
            "(accelerate's no_split_module_classes; transformers' device_map='auto' does that).")
    return devices.pop()


def _replace_linears(block: nn.Module, qcfg: QuantConfig, prefix: str, device) -> None:
    """Swap the block's quantizable nn.Linear modules for empty WQLinear modules (to be loaded)."""
    for name, lin in awq.quantizable_linears(block, qcfg, prefix).items():
        parent_name, _, child = name.rpartition(".")
        parent = block.get_submodule(parent_name) if parent_name else block
        setattr(parent, child, WQLinear(lin.in_features, lin.out_features, qcfg.bits, qcfg.group_size,
                                        lin.bias is not None, device=device))


class AWQModel(nn.Module):
    """A transformers causal LM plus what awqlib knows about it. Unknown attributes
    fall through to the wrapped model (``.config``, ``.device``, ...)."""

    def __init__(self, model: nn.Module, spec: ArchSpec, quant_config: QuantConfig | None = None,
                 tokenizer=None, quantized: bool = False, name_or_path: str | None = None,
                 reader: "lazy_mod.ShardReader | None" = None):
        super().__init__()
        self.reader = reader
        self.model = model
        self.spec = spec
        self.quant_config = quant_config
        self.tokenizer = tokenizer
        self.quantized = quantized
        self.name_or_path = name_or_path
        self.reports: list[awq.BlockReport] = []
        self.stats: dict[str, Any] = {}

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["model"], name)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.model.generate(*args, **kwargs)

    # ------------------------------------------------------------------------------------------ quantize
    @torch.no_grad()
    def quantize(self, tokenizer=None, quant_config: dict | QuantConfig | None = None, calib_data: Any = "pileval",
                 split: str = "validation", text_column: str = "text", n_samples: int = 128, seqlen: int = 512,
                 duo_scaling: bool = True, apply_clip: bool = True, device: str | torch.device | None = None,
                 method: str = awq.DEFAULT_METHOD, save_dir: str | os.PathLike | None = None, overwrite: bool = False,
                 **options) -> "AWQModel":
        """Quantize every decoder linear, one block at a time. ``method``: 'awq+gptq' (AWQ's scaling and
        clipping, then GPTQ error feedback on AWQ's grid), 'awq', or 'rtn' (round-to-nearest); all three
        write the same AWQ GEMM format.

        ``save_dir``: write each block to disk as it finishes and the final checkpoint at the end; an
        interrupted run resumes from the last finished block when called again with the same folder
        and settings. Required for models loaded with ``lazy=True`` (their blocks are freed as they
        finish). ``options`` are :class:`awqlib.awq.AWQOptions` fields (n_grid, max_search_tokens, ...).
        """
        if self.quantized:
            raise RuntimeError("this model is already quantized")
        lazy = self.reader is not None
        if lazy and save_dir is None:
            raise ValueError("a model loaded with lazy=True frees each block once it is quantized: pass "
                             "save_dir=... so that finished blocks are written to disk")
        qcfg = QuantConfig.from_dict(quant_config or {})
        if qcfg.version != "gemm":
            log.warning("awqlib writes the GEMM layout (what vLLM/SGLang/transformers read); version=%r is "
                        "accepted for AutoAWQ compatibility and stored as 'gemm'", qcfg.version)
        opts = awq.make_options(method, duo_scaling=duo_scaling, apply_clip=apply_clip, **options)
        model, spec = self.model, self.spec
        awq.check_quantizable(model, spec, qcfg)  # before any work
        tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        self.tokenizer = tokenizer
        blocks = awq.get_blocks(model, spec)
        prefix = next(n for n, m in model.named_modules() if m is blocks)
        placed = not lazy and _dispatched(model)
        if placed:
            # accelerate placed the model (device_map=...): each block is quantized on the device it
            # lives on and stays there; the calibration activations follow the blocks.
            devices = [_placed_block_device(b, f"{prefix}.{i}") for i, b in enumerate(blocks)]
            if device is not None and any(d != torch.device(device) for d in devices):
                raise ValueError(
                    f"this model was placed by accelerate (hf_device_map) on {sorted({str(d) for d in devices})}: "
                    f"each block is quantized on its own device, so device={device!r} cannot be honoured. "
                    "Leave device unset, or load the model without device_map.")
            homes = devices
            device = devices[0]
            log.info("awqlib: quantizing in place on accelerate's placement: %s",
                     ", ".join(f"{d}: {devices.count(d)} blocks" for d in dict.fromkeys(devices)))
        else:
            device = torch.device(device) if device is not None else _default_device()
            # Where the model lives now; each finished block goes back there (a model handed over on
            # the GPU stays on the GPU).  Lazy models have no home yet: finished blocks are freed.
            first = next(model.parameters())
            home = torch.device("cpu") if lazy or first.device.type == "meta" else first.device
            devices, homes = [device] * len(blocks), [home] * len(blocks)
        cdtype = self._compute_dtype(device)
        tokens = None if method == "rtn" else get_calib_tokens(calib_data, tokenizer, n_samples, seqlen, split,
                                                              text_column)
        store = None
        if save_dir is not None:
            fp = lazy_mod.fingerprint(source=self.name_or_path, qcfg=qcfg.to_hf_dict(), opts=opts, method=method,
                                      tokens=tokens if tokens is not None else torch.zeros(0), dtype=cdtype)
            store = lazy_mod.BlockStore(save_dir, fp, len(blocks), overwrite)
        t0 = time.perf_counter()
        if lazy:
            self._materialize_rest(cdtype)
        elif next(model.parameters()).dtype != cdtype:
            log.info("awqlib: computing in %s on %s", cdtype, device.type)
            model.to(cdtype)
        inps = kwargs = None
        if method != "rtn":
            log.info("awqlib: calibrating on %d sequences x %d tokens, device %s", tokens.shape[0], seqlen, device)
            if not placed:  # (a placed model's hooks move the inputs to its embeddings' device)
                _move_except_blocks(model, prefix, device)
            inps, kwargs = awq.capture_inputs(model, spec, tokens, opts.chunk_size, device,
                                              torch.device(opts.offload_device))
            if not placed:
                _move_except_blocks(model, prefix, homes[0])
        if lazy:
            for _, mod in self._rest_modules(prefix):
                lazy_mod.free(mod)
        self.reports = []
        for i, blk in enumerate(tqdm(blocks, desc=f"{method.upper()} blocks")):
            bprefix = f"{prefix}.{i}."
            device = devices[i]
            if store is not None and store.done(i):  # resume: a finished block is loaded, not redone
                fp_next = inps is not None and not opts.propagate_quantized
                if fp_next:  # the next block was calibrated on this block's fp outputs: recompute them
                    if lazy:
                        lazy_mod.materialize(blk, bprefix, self.reader, spec, cdtype)
                    inps = self._run_block(blk, inps, kwargs[i], device, opts)
                self._load_finished_block(blk, bprefix, store.read(i), qcfg, cdtype)
                if inps is not None and not fp_next:
                    inps = self._run_block(blk, inps, kwargs[i], device, opts)
                report = awq.BlockReport()
            else:
                if lazy:
                    lazy_mod.materialize(blk, bprefix, self.reader, spec, cdtype)
                if method == "rtn":
                    awq.rtn_quantize_block(blk, spec, qcfg, prefix=bprefix)
                    report = awq.BlockReport()
                else:
                    inps, report = awq.quantize_block(blk, spec, qcfg, opts, inps, kwargs[i], device, prefix=bprefix)
                if store is not None:
                    store.write(i, {to_checkpoint_name(bprefix + k, spec): v.to(torch.float16)
                                    if v.is_floating_point() else v for k, v in blk.state_dict().items()})
            blk.to(homes[i])
            if lazy:
                lazy_mod.free(blk)
            lazy_mod.release_memory()  # the block's temporaries (search, Gram matrices) go back to the OS
            self.reports.append(report)
            if kwargs is not None:
                kwargs[i] = None
        del inps
        # The checkpoint stores every unquantized tensor in fp16: round them now, so the in-memory
        # model computes exactly what save_quantized -> from_quantized will.
        awq.round_to_storage(model)
        self.stats["quantize_seconds"] = time.perf_counter() - t0
        self.quant_config, self.quantized = qcfg, True
        if store is not None:
            rest = self._rest_from_reader(prefix) if lazy else checkpoint_state(model, spec, skip_prefix=prefix + ".")
            store.finalize(rest, self._write_extras)
            if lazy:
                self.saved_to = Path(save_dir)
        return self

    def _compute_dtype(self, device: torch.device) -> torch.dtype:
        dtype = next(self.model.parameters()).dtype  # meta tensors have a dtype too
        if device.type == "cpu":
            return torch.float32  # CPUs without fp16/bf16 matmul units: fp32 is both faster and exact
        return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16

    def _materialize_rest(self, dtype: torch.dtype) -> None:
        """Lazy model: load everything except the blocks (embeddings, final norm, head)."""
        blocks = awq.get_blocks(self.model, self.spec)
        prefix = next(n for n, m in self.model.named_modules() if m is blocks)
        head = self.model.get_output_embeddings()  # not needed to calibrate: the capture stops before it
        for name, mod in self._rest_modules(prefix):
            if mod is not head:
                lazy_mod.materialize(mod, f"{name}." if name else "", self.reader, self.spec, dtype)

    def _rest_modules(self, prefix: str):
        for name, mod in self.model.named_modules():
            if name == prefix or name.startswith(prefix + ".") or any(True for _ in mod.children()):
                continue
            yield name, mod

    def _rest_from_reader(self, prefix: str) -> dict[str, torch.Tensor]:
        """Lazy model: the unquantized non-block tensors, straight from the source shards in fp16."""
        tied = bool(getattr(self.model.config, "tie_word_embeddings", False))
        names = [k for k in self.reader.where if not k.startswith(prefix + ".") and not (tied and k == "lm_head.weight")]
        return {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in self.reader.get_many(names).items()}

    def _load_finished_block(self, blk, bprefix, tensors, qcfg, dtype) -> None:
        if self.spec.experts is not None:
            unfuse_experts(blk, self.spec.experts)
        _replace_linears(blk, qcfg, bprefix, device="cpu")
        state = {}
        for k, v in tensors.items():
            name = from_checkpoint_name(k, self.spec)[len(bprefix):]
            state[name] = v.to(dtype) if v.is_floating_point() and not name.endswith(".scales") else v
        blk.load_state_dict(state, strict=True, assign=True)

    @staticmethod
    def _run_block(blk, inps, kwargs, device, opts):
        """The next block's inputs: ``blk`` run over every calibration chunk."""
        blk.to(device)
        out = [awq.run_block(blk, x.to(device), awq._to(kwargs[x.shape[0]], device)).to(opts.offload_device)
               for x in inps]
        return out

    # ------------------------------------------------------------------------------------------ save
    def _write_extras(self, folder: Path, tokenizer=None) -> None:
        """config.json (with quantization_config), generation config, tokenizer, model card."""
        tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        cfg = quantized_config_dict(self.model.config, self.quant_config)
        (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str))
        gen = getattr(self.model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        from .hub import write_model_card
        write_model_card(folder, self)

    def tile_for_kernels(self) -> int:
        """Repack every quantized linear into the warp-tiled layout the CUDA kernels read fastest
        (done by ``from_quantized`` on CUDA; checkpoints keep the GEMM layout).  Returns how many
        linears were repacked; does nothing where the CUDA kernels are unavailable."""
        from . import kernels
        from .modules import WQLinear
        if not kernels.load():
            return 0
        # only where the kernels run: a linear that accelerate keeps on (or offloads to) the CPU or
        # disk stays in the GEMM layout, which every path reads
        n = sum(m.tile_for_kernels() for m in self.model.modules()
                if isinstance(m, WQLinear) and m.qweight.device.type == "cuda")
        log.info("awqlib: %d quantized linears repacked into the warp-tiled layout", n)
        return n

    def save_quantized(self, save_dir: str | os.PathLike, overwrite: bool = False,
                       max_shard_size: int | str = "5GB", tokenizer=None) -> Path:
        """Write safetensors shards (+ index), config.json with quantization_config, the tokenizer,
        a model card; atomically (temporary folder, then rename)."""
        if not self.quantized:
            raise RuntimeError("call quantize() before save_quantized()")
        if self.reader is not None:
            raise RuntimeError("a lazily loaded model is saved by quantize(save_dir=...) as it goes; its blocks "
                               f"are no longer in memory (saved to {getattr(self, 'saved_to', None)})")
        state = checkpoint_state(self.model, self.spec)
        with AtomicDir(save_dir, overwrite) as tmp:
            write_shards(state, tmp, max_shard_size)
            self._write_extras(tmp, tokenizer)
        return Path(save_dir)

    def save_pretrained(self, save_dir, **kwargs):
        return self.save_quantized(save_dir, **kwargs)

    def push_to_hub(self, repo_id: str, private: bool | None = None, token: str | None = None,
                    commit_message: str = "Upload AWQ checkpoint (awqlib)", local_dir: str | None = None,
                    **kwargs) -> str:
        from .hub import push_to_hub
        return push_to_hub(self, repo_id, private=private, token=token, commit_message=commit_message,
                           local_dir=local_dir, **kwargs)


_DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def plan_device_map(model: nn.Module, device_map: str | dict, max_memory: dict | None, dtype: torch.dtype,
                    offload_folder: str | os.PathLike | None = None) -> dict:
    """accelerate's placement of ``model`` (may be on the meta device): ``infer_auto_device_map`` with
    the model's ``_no_split_modules``, so a decoder block is never cut; a dict is taken as given."""
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    no_split = sorted(getattr(model, "_no_split_modules", None) or [])
    if isinstance(device_map, str):
        if device_map not in _DEVICE_MAP_STRATEGIES:
            raise ValueError(f"device_map={device_map!r}: use one of {list(_DEVICE_MAP_STRATEGIES)} or a dict "
                             "{module name: device}")
        if device_map != "sequential":
            max_memory = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=no_split,
                                             dtype=dtype, low_zero=device_map == "balanced_low_0")
        device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split,
                                           dtype=dtype)
    device_map = dict(device_map)
    if "disk" in device_map.values() and offload_folder is None:
        raise ValueError("the device_map offloads modules to disk "
                         f"({[k for k, v in device_map.items() if v == 'disk'][:3]}...): pass "
                         "offload_folder=... (a folder for the offloaded tensors), or give max_memory more room")
    log.info("awqlib: placed by accelerate: %s", ", ".join(
        f"{d}: {n} modules" for d, n in Counter(map(str, device_map.values())).items()))
    return device_map


def _placer(device_map: dict):
    """name -> the device its tensor is loaded to: the entry of its longest module prefix in the map
    (cpu/disk entries load to the CPU; accelerate offloads them when it dispatches)."""
    def place(name: str) -> torch.device:
        for prefix in _prefixes(name):
            if prefix in device_map:
                d = device_map[prefix]
                return torch.device("cpu") if d in ("cpu", "disk") else torch.device(
                    d if not isinstance(d, int) else f"cuda:{d}")
        raise ValueError(f"the device_map places no module containing {name}; add an entry for it "
                         "(or '' for a default)")
    return place


def _prefixes(name: str):
    parts = name.split(".")
    for i in range(len(parts), -1, -1):
        yield ".".join(parts[:i])


def dispatch_with_accelerate(model: nn.Module, device_map: dict, offload_folder: str | os.PathLike | None) -> None:
    """accelerate's ``dispatch_model`` on a planned map.  Quantized linears hold their tensors as
    buffers, so offloaded modules offload buffers too."""
    from accelerate import dispatch_model
    dispatch_model(model, device_map, offload_dir=offload_folder, offload_buffers=True,
                   skip_keys=getattr(model, "_skip_keys_device_placement", None))


class AutoAWQ:
    """Entry points, named as in AutoAWQ so that scripts port unchanged."""

    @staticmethod
    def from_pretrained(model_path: str, torch_dtype: Any = "auto", trust_remote_code: bool = False,
                        tokenizer: Any = None, lazy: bool = False, **kwargs) -> AWQModel:
        """Load an fp16/bf16/fp32 model to quantize. ``lazy=True`` reads nothing up front: blocks are
        loaded from the safetensors shards one at a time during ``quantize(save_dir=...)``, so a
        model larger than memory can be quantized."""
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
            dtype = _resolve_dtype(torch_dtype, torch.device("cuda"), config)
            with init_empty_weights(include_buffers=False):
                model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
            if spec.experts is not None:
                for blk in awq.get_blocks(model, spec):
                    unfuse_experts(blk, spec.experts)
            return AWQModel(model.eval(), spec, tokenizer=tokenizer, name_or_path=str(model_path), reader=reader)
        dtype = torch_dtype if torch_dtype != "auto" else "auto"
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, trust_remote_code=trust_remote_code,
                                                     low_cpu_mem_usage=True, **kwargs)
        model.eval()
        return AWQModel(model, spec, tokenizer=tokenizer, name_or_path=str(model_path))

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
                       **kwargs) -> AWQModel:
        """Load an AWQ checkpoint (ours or any AutoAWQ-format one) for inference.

        ``device``: one device for the whole model (default "cpu").  ``device_map``: let accelerate
        place it over several GPUs (and the CPU/disk): "auto", "balanced", "balanced_low_0",
        "sequential" or an explicit {module name: device} dict, with ``max_memory`` per device
        ({0: "20GiB", 1: "20GiB", "cpu": "64GiB"}) and ``offload_folder`` for "disk" entries;
        decoder blocks are never split.  Quantized linears on CUDA run the awqlib kernels."""
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

        folder = resolve_folder(quant_path, revision, token)
        if not (folder / "config.json").exists():
            raise FileNotFoundError(f"{folder} has no config.json: not a transformers checkpoint folder")
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        qc = getattr(config, "quantization_config", None)
        if qc is None:
            raise ValueError(f"{folder}/config.json has no quantization_config: this is not a quantized "
                             "checkpoint. Quantize it first with AutoAWQ.from_pretrained(...).quantize(...)")
        qc = qc if isinstance(qc, dict) else qc.to_dict()
        qcfg = QuantConfig.from_dict(qc)
        del config.quantization_config
        spec = get_spec(config.model_type)
        if device_map is not None and device is not None:
            raise ValueError(f"from_quantized got both device={device!r} and device_map: pass one (device_map "
                             "places the model over several devices, device puts all of it on one)")
        if device_map is None and (max_memory is not None or offload_folder is not None):
            raise ValueError("max_memory / offload_folder only apply with device_map=... (e.g. device_map='auto')")
        device = torch.device(device if device is not None else "cpu")
        if device_map is not None:  # the compute dtype follows the fastest device the map can use
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = _resolve_dtype(torch_dtype, device, config)
        files = safetensors_files(folder)

        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        blocks = awq.get_blocks(model, spec)
        prefix = next(n for n, m in model.named_modules() if m is blocks)
        for i, blk in enumerate(blocks):
            if spec.experts is not None:
                unfuse_experts(blk, spec.experts)
            _replace_linears(blk, qcfg, f"{prefix}.{i}.", device="meta")
        place = None
        if device_map is not None:  # planned on the empty model; each tensor goes to its device as it is read
            device_map = plan_device_map(model, device_map, max_memory, dtype, offload_folder)
            place = _placer(device_map)
        elif device.type != "cpu":
            place = lambda name: device  # noqa: E731
        state = load_quantized_state(files, spec, qcfg, dtype=dtype, place=place)
        expected = set(model.state_dict().keys())
        tied = bool(getattr(config, "tie_word_embeddings", False))
        missing = sorted(k for k in expected - set(state) if not (tied and k == "lm_head.weight"))
        unexpected = sorted(set(state) - expected)
        if missing or unexpected:
            raise ValueError(f"{folder} does not match a {config.model_type} model quantized with {qcfg}: "
                             f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                             f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
        model.load_state_dict(state, strict=False, assign=True)
        del state
        if tied:
            model.tie_weights()
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if p.device.type == "meta":
                raise ValueError(f"{folder}: tensor {name} was not found in the checkpoint")
        if (folder / "generation_config.json").exists():
            model.generation_config = GenerationConfig.from_pretrained(folder)
        model.config.quantization_config = qcfg.to_hf_dict()
        tokenizer = None
        try:
            from transformers import AutoTokenizer
            if (folder / "tokenizer_config.json").exists() or (folder / "tokenizer.json").exists():
                tokenizer = AutoTokenizer.from_pretrained(folder)
        except Exception as e:  # a tokenizer is a convenience here, never a reason to fail
            log.debug("awqlib: no tokenizer loaded from %s (%s)", folder, e)
        wrapped = AWQModel(model, spec, qcfg, tokenizer=tokenizer, quantized=True, name_or_path=str(quant_path))
        if fuse_layers:  # before placement: accelerate then offloads the fused tensors like any other
            from .fuse import fuse_model
            fuse_model(wrapped)
        if device_map is not None:
            dispatch_with_accelerate(model, device_map, offload_folder)
            model.eval()
        else:
            model.to(device).eval()
        from .ops import announce
        used = {t.device for t in (*model.parameters(), *model.buffers()) if t.device.type != "meta"}
        for d in sorted(used, key=str):
            announce(d)
        if any(d.type == "cuda" for d in used):
            wrapped.tile_for_kernels()
        return wrapped


AutoAWQForCausalLM = AutoAWQ  # AutoAWQ's own name
