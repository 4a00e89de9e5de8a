"""Load an AWQ checkpoint (awqlib's, AutoAWQ's GEMM or GEMV, or any published one) and generate.

    python examples/generate.py CKPT [--prompt TEXT] [--device cuda] [--fuse-layers]
"""

import argparse
import logging

import torch

from awqlib import AutoAWQ

logging.basicConfig(level=logging.INFO, format="%(message)s")
ap = argparse.ArgumentParser()
ap.add_argument("ckpt")
ap.add_argument("--prompt", default="The meaning of life is")
ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
ap.add_argument("--max-new-tokens", type=int, default=40)
ap.add_argument("--fuse-layers", action="store_true")
a = ap.parse_args()

model = AutoAWQ.from_quantized(a.ckpt, device=a.device, fuse_layers=a.fuse_layers)
tok = model.tokenizer
inputs = tok(a.prompt, return_tensors="pt").to(a.device)
out = model.generate(**inputs, max_new_tokens=a.max_new_tokens, do_sample=False)
print(tok.decode(out[0], skip_special_tokens=True))
