"""Host memory while loading a quantized checkpoint: ``from_quantized`` reads one tensor at a time and
sends it to its device at once, so loading onto a GPU (or over several, ``device_map``) should add
little to the host's resident memory, whatever the checkpoint's size.  On ``--device cpu`` the model
lives in host memory, so the growth is about the checkpoint's size: the control.

A random Llama (bench_memory's config, ``--layers`` blocks) is quantized round-to-nearest (lazily,
so building it costs little memory), then each device is loaded in a child process of its own; the
child samples its anonymous RSS every millisecond during the load (file pages that safetensors maps
are page cache, not counted).

    python -m benchmarks.bench_load --devices cpu cuda auto --dtype bfloat16 --layers 8 --out bench_load.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.common import CONFIG, build, device_label, rss_now, run_info, skip, write_json
from benchmarks.report import load_table


def anon_rss() -> int:
    """Anonymous resident memory in bytes: what the process itself holds.  Plain RSS would also
    count the checkpoint's pages that safetensors maps while reading, which are clean page cache
    the kernel reclaims at will, not memory the load needs."""
    return rss_now("RssAnon")


class PeakRSS:
    """Highest anonymous RSS seen by a sampling thread between ``start()`` and ``stop()``."""

    def __init__(self, period_s: float = 0.001):
        self.period, self.peak, self._run = period_s, 0, False

    def _loop(self):
        while self._run:
            self.peak = max(self.peak, anon_rss())
            time.sleep(self.period)

    def start(self):
        self._run, self.peak = True, anon_rss()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()

    def stop(self) -> int:
        self._run = False
        self._t.join()
        return max(self.peak, anon_rss())


def child(ckpt: str, device: str, dtype: str) -> None:
    import torch
    from awqlib import AutoAWQ
    backend = None
    if torch.cuda.is_available() and device != "cpu":
        torch.zeros(1, device=device if device != "auto" else "cuda")  # the CUDA context and the kernels
        # are not part of loading
        from awqlib import kernels
        backend = kernels.backend() if kernels.load() else "reference (kernels unavailable)"
    baseline = anon_rss()
    peak = PeakRSS()
    peak.start()
    t0 = time.perf_counter()
    kw = {"device_map": "auto"} if device == "auto" else {"device": device}
    m = AutoAWQ.from_quantized(ckpt, torch_dtype=dtype, **kw)
    wall = time.perf_counter() - t0
    top = peak.stop()
    with torch.no_grad():
        dev = next(m.model.parameters()).device
        ok = bool(torch.isfinite(m(input_ids=torch.tensor([[1, 2, 3]], device=dev)).logits).all())
    print(json.dumps({"device": device, "dtype": str(next(m.model.parameters()).dtype), "load_s": round(wall, 2),
                      "baseline_rss_bytes": baseline, "peak_rss_growth_bytes": top - baseline, "finite_logits": ok,
                      "backend": backend}))


def make_report(argv: list[str], checkpoint_bytes: int, layers: int, dtype: str, runs: list[dict],
                errors: list[dict], device: str) -> dict:
    """The run's JSON: provenance, the checkpoint, one row per device loaded (with its growth over the
    checkpoint's size) and the devices whose load failed.  ``device``: the card the CUDA loads used,
    or "cpu"."""
    for r in runs:
        r["ratio"] = round(r["peak_rss_growth_bytes"] / checkpoint_bytes, 3)
    return {**run_info("bench_load", argv), "device": device, "checkpoint_bytes": checkpoint_bytes, "layers": layers,
            "dtype": dtype, "runs": runs, "errors": errors}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", nargs="+", default=["cpu"], help="cpu, cuda, cuda:1, auto (device_map)")
    ap.add_argument("--dtype", default="auto", help="torch_dtype of the loaded model (bfloat16: every "
                    "non-quantized tensor of the fp16 checkpoint is cast while loading)")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default="bench_load.json")
    ap.add_argument("--child", nargs=3)
    a = ap.parse_args(argv)
    if a.child:
        child(*a.child)
        return 0
    argv = sys.argv[1:] if argv is None else argv
    import torch
    gpu = [d for d in a.devices if d.startswith("cuda")]  # "auto" (a device_map) works without a GPU too
    if gpu and not torch.cuda.is_available():
        return skip(run_info("bench_load", argv), a.out, f"no CUDA device for {' '.join(gpu)}")
    try:  # before any work: a bad device index is an error now, not after the loads
        card = device_label(gpu[0] if gpu else "cuda" if "auto" in a.devices and torch.cuda.is_available() else "cpu")
    except (RuntimeError, AssertionError, ValueError) as e:
        return skip(run_info("bench_load", argv), a.out, f"cannot use {gpu[0] if gpu else 'auto'}: {e}")
    CONFIG["num_hidden_layers"] = a.layers
    work = Path(a.workdir or tempfile.mkdtemp(prefix="awqlib-load-"))
    src, q = work / "src", work / "q"
    if not (src / "config.json").exists():
        build(src)
    if not (q / "config.json").exists():
        from awqlib import AutoAWQ
        AutoAWQ.from_pretrained(str(src), lazy=True).quantize(None, {"w_bit": 4, "q_group_size": 128},
                                                              method="rtn", save_dir=q, device="cpu")
    size = sum(f.stat().st_size for f in q.glob("*.safetensors"))
    runs, errors = [], []
    for dev in a.devices:
        res = subprocess.run([sys.executable, "-m", "benchmarks.bench_load", "--child", str(q), dev, a.dtype],
                             capture_output=True, text=True)
        if res.returncode:
            print(f"{dev}: failed\n{res.stderr[-2000:]}", file=sys.stderr)
            errors.append({"device": dev, "error": res.stderr.strip()[-1000:]})
            continue
        runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
    report = make_report(argv, size, a.layers, a.dtype, runs, errors, card)
    print(load_table(report))
    write_json(a.out, report)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
