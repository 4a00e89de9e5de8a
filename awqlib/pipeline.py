"""The block driver: quantize a model one decoder block at a time.

    capture     run the embeddings on the calibration tokens; record block 0's inputs and every
                block's kwargs (masks, positions, rotary embeddings)
    per block   bring its fp weights in, quantize it (AWQ or round-to-nearest), keep its outputs
                as the next block's inputs, write it to the resume store, release it
    finish      round the unquantized tensors to the checkpoint's fp16

Where block ``i`` lives and how it is brought in and released is the block source's business:

* :class:`InMemory`  the model is loaded; blocks are quantized on one device and go back home;
* :class:`Lazy`      the model is a meta-device skeleton; a block is read from the safetensors
                     shards when its turn comes and freed once it is finished (and stored);
* :class:`Placed`    accelerate placed the model (``device_map``); each block is quantized on
                     the device it lives on and stays there.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from . import awq
from . import lazy as lazy_mod
from . import resume
from .arch import ArchSpec
from .arch.blocks import empty_quantized_linears, find_blocks, run_block, to_device
from .checkpoint import checkpoint_state, from_checkpoint_name, to_checkpoint_name
from .config import QuantConfig
from .modules import repack_for_kernels
from .moe import unfuse_experts
from .placement import available_device, dispatched, placed_block_device
from .quant import nonfinite_count

log = logging.getLogger("awqlib")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------------------------------------- sources

class BlockSource:
    """Where each decoder block of ``model`` computes and goes afterwards, how it is loaded and released."""

    def __init__(self, model: nn.Module, spec: ArchSpec):
        self.model, self.spec = model, spec
        self.prefix, self.blocks = find_blocks(model, spec)
        self.devices: list[torch.device] = []  # where block i is quantized
        self.homes: list[torch.device] = []    # where it goes once finished
        self.touched = False                   # the model has been changed in place (dtype, blocks)
        # weights cast to float16 for computing: name -> (their stored dtype, non-finite already there)
        self.cast_to_half: dict[str, tuple[torch.dtype, bool]] = {}

    def note_cast(self, name: str, stored: torch.Tensor) -> None:
        """A weight about to be cast to float16 from ``stored``: whether it was non-finite before the
        cast tells a damaged source from a value the cast overflowed (_refuse_nonfinite)."""
        self.cast_to_half[name] = (stored.dtype, nonfinite_count(stored.detach()) > 0)

    def compute_dtype(self) -> torch.dtype:
        """fp32 on CPUs (no fp16/bf16 matmul units: fp32 is both faster and exact); else the model's
        half dtype (fp16 for an fp32 model)."""
        dtype = next(self.model.parameters()).dtype  # meta tensors have a dtype too
        if self.devices[0].type == "cpu":
            return torch.float32
        return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16

    def prepare(self, dtype: torch.dtype) -> None:
        """Make everything the calibration capture runs (embeddings, norms) present, in ``dtype``."""
        if next(self.model.parameters()).dtype != dtype:
            if dtype == torch.float16:  # each block is still refused at its turn, with the right cause
                for i, blk in enumerate(self.blocks):
                    for name, p in blk.named_parameters():
                        if p.device.type != "meta" and p.is_floating_point():
                            self.note_cast(f"{self.prefix}.{i}.{name}", p)
            log.info("awqlib: computing in %s on %s", dtype, self.devices[0].type)
            _cast_keeping_unsaved_buffers(self.model, dtype)

    def capture(self, tokens: torch.Tensor, opts: awq.AWQOptions):
        """Block 0's input chunks and every block's kwargs (the embeddings run on block 0's device)."""
        device = self.devices[0]
        _move_except_blocks(self.model, self.prefix, device)
        out = awq.capture_inputs(self.model, self.spec, tokens, opts.chunk_size, device,
                                 torch.device(opts.offload_device))
        _move_except_blocks(self.model, self.prefix, self.homes[0])
        return out

    def after_capture(self) -> None:
        """Drop what only the calibration capture needed (nothing, for a loaded model)."""

    def load(self, i: int, dtype: torch.dtype) -> None:
        """Bring block ``i``'s fp weights in (a no-op where they are there)."""

    def release(self, i: int) -> None:
        self.blocks[i].to(self.homes[i])

    def rest_state(self) -> dict[str, torch.Tensor]:
        """The checkpoint's non-block tensors (embeddings, final norm, head), checkpoint-named, fp16."""
        return checkpoint_state(self.model, self.spec, skip_prefix=self.prefix + ".")


class InMemory(BlockSource):
    """A loaded model: every block is quantized on ``device`` and goes back where the model was (a
    model handed over on the GPU stays on the GPU)."""

    def __init__(self, model: nn.Module, spec: ArchSpec, device: torch.device):
        super().__init__(model, spec)
        first = next(model.parameters())
        home = torch.device("cpu") if first.device.type == "meta" else first.device
        self.devices, self.homes = [device] * len(self.blocks), [home] * len(self.blocks)


class Lazy(BlockSource):
    """A meta-device skeleton read from safetensors shards: a block is loaded when its turn comes
    and freed once it is finished; the non-block tensors of the checkpoint come from the shards."""

    def __init__(self, model: nn.Module, spec: ArchSpec, reader: lazy_mod.ShardReader, device: torch.device):
        super().__init__(model, spec)
        self.devices, self.homes = [device] * len(self.blocks), [torch.device("cpu")] * len(self.blocks)
        self.reader = reader

    def prepare(self, dtype: torch.dtype) -> None:
        head = self.model.get_output_embeddings()  # not needed to calibrate: the capture stops before it
        for name, mod in self._rest_modules():
            if mod is not head:
                lazy_mod.materialize(mod, f"{name}." if name else "", self.reader, self.spec, dtype)

    def after_capture(self) -> None:
        for _, mod in self._rest_modules():
            lazy_mod.free(mod)

    def load(self, i: int, dtype: torch.dtype) -> None:
        lazy_mod.materialize(self.blocks[i], f"{self.prefix}.{i}.", self.reader, self.spec, dtype,
                             on_cast=self.note_cast if dtype == torch.float16 else None)

    def release(self, i: int) -> None:
        super().release(i)
        lazy_mod.free(self.blocks[i])

    def rest_state(self) -> dict[str, torch.Tensor]:
        tied = bool(getattr(self.model.config, "tie_word_embeddings", False))
        names = [to_checkpoint_name(k, self.spec) for k in self.model.state_dict()  # the model's own, no others
                 if not k.startswith(self.prefix + ".") and not (tied and k == "lm_head.weight")]
        return {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in self.reader.get_many(names).items()}

    def _rest_modules(self):
        """The leaf modules outside the blocks."""
        for name, mod in self.model.named_modules():
            if name == self.prefix or name.startswith(self.prefix + ".") or any(True for _ in mod.children()):
                continue
            yield name, mod


class Placed(BlockSource):
    """accelerate placed the model (``device_map=...``): each block is quantized on the device it
    lives on and stays there; the calibration activations follow the blocks (accelerate's hooks
    move the inputs to the embeddings' device)."""

    def __init__(self, model: nn.Module, spec: ArchSpec, device: str | torch.device | None):
        super().__init__(model, spec)
        devices = [placed_block_device(b, f"{self.prefix}.{i}") for i, b in enumerate(self.blocks)]
        if device is not None and any(d != torch.device(device) for d in devices):
            raise ValueError(
                f"this model was placed by accelerate (hf_device_map) on {sorted({str(d) for d in devices})}: "
                f"each block is quantized on its own device, so device={device!r} cannot be honoured. "
                "Leave device unset, or load the model without device_map.")
        log.info("awqlib: quantizing in place on accelerate's placement: %s",
                 ", ".join(f"{d}: {devices.count(d)} blocks" for d in dict.fromkeys(devices)))
        self.devices, self.homes = devices, devices

    def capture(self, tokens: torch.Tensor, opts: awq.AWQOptions):
        return awq.capture_inputs(self.model, self.spec, tokens, opts.chunk_size, self.devices[0],
                                  torch.device(opts.offload_device))


def block_source(model: nn.Module, spec: ArchSpec, reader: lazy_mod.ShardReader | None,
                 device: str | torch.device | None) -> BlockSource:
    """The source that fits how ``model`` was loaded (lazily, placed by accelerate, or in memory)."""
    if reader is not None:
        return Lazy(model, spec, reader, available_device(device) if device is not None else default_device())
    if dispatched(model):
        return Placed(model, spec, device)
    return InMemory(model, spec, available_device(device) if device is not None else default_device())


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


# ---------------------------------------------------------------------------------------------- driver

@dataclass
class QuantizeResult:
    reports: list[awq.BlockReport]
    seconds: float                                # wall time of the block loop, capture included
    store: resume.BlockStore | None               # finished blocks, to be finalized into save_dir


def quantize_blocks(source: BlockSource, qcfg: QuantConfig, opts: awq.AWQOptions, method: str,
                    tokens: torch.Tensor | None, save_dir: str | os.PathLike | None = None,
                    overwrite: bool | str = False, source_folder: Path | None = None) -> QuantizeResult:
    """Quantize every block of ``source.model`` in place (``method``: one of :data:`awq.METHODS`;
    ``tokens``: the calibration token ids, None for 'rtn').  With ``save_dir``, each finished block is stored as it
    completes and a block already stored by an interrupted run with the same settings is loaded
    instead of recomputed (see :mod:`awqlib.resume`; the caller finalizes and closes the store)."""
    model, spec, blocks = source.model, source.spec, source.blocks
    cdtype = source.compute_dtype()
    store = None
    if save_dir is not None:
        import transformers

        from . import version
        lazy_folder = source.reader.folder if isinstance(source, Lazy) else None
        folder = lazy_folder or source_folder
        parts = resume.fingerprint_parts(
            source=resume.source_identity(lazy_folder, model), config=resume.config_identity(model.config),
            code=resume.code_identity(folder), qcfg=qcfg.to_hf_dict(), opts=opts, method=method,
            tokens=tokens if tokens is not None else torch.zeros(0), dtype=cdtype,
            model_dtype=next(model.parameters()).dtype, n_blocks=len(blocks), awqlib=version.__version__,
            transformers=transformers.__version__)
        store = resume.BlockStore(save_dir, parts, len(blocks), overwrite, source=folder)
    try:
        return _quantize_blocks(source, qcfg, opts, method, tokens, cdtype, store)
    except BaseException:
        if store is not None:
            store.close()
        raise


def _quantize_blocks(source: BlockSource, qcfg: QuantConfig, opts: awq.AWQOptions, method: str,
                     tokens: torch.Tensor | None, cdtype: torch.dtype, store: resume.BlockStore | None
                     ) -> QuantizeResult:
    model, spec, blocks = source.model, source.spec, source.blocks
    t0 = time.perf_counter()
    source.touched = True
    source.prepare(cdtype)
    inps = kwargs = None
    if method != "rtn":
        log.info("awqlib: calibrating on %d sequences x %d tokens, device %s", tokens.shape[0], tokens.shape[1],
                 source.devices[0])
        inps, kwargs = source.capture(tokens, opts)
    source.after_capture()
    reports = []
    for i, blk in enumerate(tqdm(blocks, desc=f"{method.upper()} blocks")):
        bprefix = f"{source.prefix}.{i}."
        device = source.devices[i]
        if store is not None and store.done(i):  # resume: a finished block is loaded, not redone
            fp_next = inps is not None and not opts.propagate_quantized
            if fp_next:  # the next block was calibrated on this block's fp outputs: recompute them
                source.load(i, cdtype)
                inps = _run_block(blk, inps, kwargs[i], device, opts)
            _load_finished_block(blk, spec, bprefix, store.read(i), qcfg, cdtype)
            if inps is not None and not fp_next:
                inps = _run_block(blk, inps, kwargs[i], device, opts)
            report = awq.BlockReport()
        else:
            source.load(i, cdtype)
            _refuse_nonfinite(blk, bprefix, source.cast_to_half)
            if method == "rtn":
                awq.rtn_quantize_block(blk, spec, qcfg, prefix=bprefix)
                report = awq.BlockReport()
            else:
                inps, report = awq.quantize_block(blk, spec, qcfg, opts, inps, kwargs[i], device, prefix=bprefix)
            if store is not None:
                store.write(i, {to_checkpoint_name(bprefix + k, spec): v.to(torch.float16)
                                if v.is_floating_point() else v for k, v in blk.state_dict().items()})
        source.release(i)
        lazy_mod.release_memory()  # the block's temporaries (search, Gram matrices) go back to the OS
        reports.append(report)
        if kwargs is not None:
            kwargs[i] = None
    del inps
    # The checkpoint stores every unquantized tensor in fp16: round them now, so the in-memory
    # model computes exactly what save_quantized -> from_quantized will.
    awq.round_to_storage(model)
    # blocks that stay on a GPU are served from the kernels' runtime layout, as after from_quantized
    # (state_dict() still exports the GEMM layout, so saving is unaffected)
    repack_for_kernels(model)
    return QuantizeResult(reports, time.perf_counter() - t0, store)


def _cast_keeping_unsaved_buffers(model: nn.Module, dtype: torch.dtype) -> None:
    """``model.to(dtype)``, except for the floating buffers a checkpoint does not hold (rotary
    ``inv_freq``): a loaded checkpoint recomputes them in their own dtype, so rounding them here
    would make the quantized model compute what its saved checkpoint does not."""
    kept = [(mod, name, buf) for mod in model.modules() for name, buf in mod._buffers.items()
            if buf is not None and buf.is_floating_point() and name in mod._non_persistent_buffers_set]
    model.to(dtype)
    for mod, name, buf in kept:
        mod._buffers[name] = buf


def _refuse_nonfinite(blk: nn.Module, bprefix: str, cast_to_half: dict[str, tuple[torch.dtype, bool]]) -> None:
    """A source weight holding NaN/inf is refused before its block is quantized: quantizing inf
    saturates the group's scale (a finite, meaningless checkpoint) and NaN fails only later, far
    from its cause.  ``cast_to_half`` (BlockSource.note_cast) says which weights were cast to
    float16 for computing and whether they were finite before: a value the cast overflowed."""
    for name, p in blk.named_parameters():
        n = 0 if p.device.type == "meta" else nonfinite_count(p.detach())  # meta: offloaded, not here to check
        if n:
            stored, damaged = cast_to_half.get(bprefix + name, (None, True))
            if not damaged:
                cause = (f"They were finite in {str(stored).split('.')[-1]} and overflowed float16 when cast to it "
                         "for computing: load the model in bfloat16 (which GPUs then compute in), or quantize on "
                         "the CPU, in float32")
            elif stored is None and p.dtype == torch.float16:  # handed over in float16: cast before awqlib saw it?
                cause = ("The model's weights are damaged (a broken download or conversion), or, if it was loaded in "
                         "float16 from a wider dtype, a value overflowed float16 in that cast (load it in bfloat16 or "
                         "float32)")
            else:
                cause = "The model's weights are damaged (a broken download or conversion)"
            raise FloatingPointError(
                f"the source weight {bprefix}{name} has {n} NaN/inf value(s) of {p.numel()}: block "
                f"{bprefix.rstrip('.')} was not quantized. {cause}: awqlib does not quantize non-finite weights")


def _load_finished_block(blk: nn.Module, spec: ArchSpec, bprefix: str, tensors: dict[str, torch.Tensor],
                         qcfg: QuantConfig, dtype: torch.dtype) -> None:
    if spec.experts is not None:
        unfuse_experts(blk, spec.experts)
    empty_quantized_linears(blk, spec, qcfg, bprefix, device="cpu")
    state = {}
    for k, v in tensors.items():
        name = from_checkpoint_name(k, spec)[len(bprefix):]
        state[name] = v.to(dtype) if v.is_floating_point() and not name.endswith(".scales") else v
    blk.load_state_dict(state, strict=True, assign=True)


def _run_block(blk: nn.Module, inps: list[torch.Tensor], kwargs: dict, device: torch.device,
               opts: awq.AWQOptions) -> list[torch.Tensor]:
    """The next block's inputs: ``blk`` run over every calibration chunk."""
    blk.to(device)
    return [run_block(blk, x.to(device), to_device(kwargs[x.shape[0]], device)).to(opts.offload_device)
            for x in inps]
