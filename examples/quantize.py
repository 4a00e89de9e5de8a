"""Quantize a causal LM with AWQ and save it in the AWQ GEMM format.

    python examples/quantize.py MODEL OUT [--group-size 128] [--calib FILE] [--lazy | --device-map auto]

With no --calib, calibrates on the public-domain Shakespeare text bundled with awqlib (offline).
--lazy: one decoder block in memory at a time (models larger than memory or than the GPU).
--device-map auto: accelerate spreads the model over the GPUs; each block is quantized where it lives.
Finished blocks are kept as they complete: rerun the same command after a crash to continue.
"""

import argparse
import logging

from transformers import AutoTokenizer

from awqlib import AutoAWQ
from awqlib.calib import bundled_text_path, read_text_file

logging.basicConfig(level=logging.INFO, format="%(message)s")
ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("out")
ap.add_argument("--group-size", type=int, default=128)
ap.add_argument("--calib", default=None)
ap.add_argument("--n-samples", type=int, default=256)
ap.add_argument("--seqlen", type=int, default=512)
ap.add_argument("--lazy", action="store_true")
ap.add_argument("--device-map", default=None)
a = ap.parse_args()

tokenizer = AutoTokenizer.from_pretrained(a.model)
model = AutoAWQ.from_pretrained(a.model, lazy=a.lazy, **({"device_map": a.device_map} if a.device_map else {}))
calib = read_text_file(a.calib or bundled_text_path())
model.quantize(tokenizer, quant_config={"w_bit": 4, "q_group_size": a.group_size, "zero_point": True,
                                        "version": "gemm"},
               calib_data=calib, n_samples=a.n_samples, seqlen=a.seqlen, save_dir=a.out, overwrite=True)
print(f"saved {a.out} in {model.stats['quantize_seconds']:.0f} s of quantization")
