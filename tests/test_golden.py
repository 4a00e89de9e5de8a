"""Golden checkpoints: quantizing tiny random models gives bit-identical tensors to a recorded run.

A guard for refactors of the driver, the loader and the save path: every tensor that
``save_quantized`` / ``quantize(save_dir=...)`` writes is hashed (sha256 of its dtype, shape and
bytes) and compared with ``tests/golden/checkpoints.json``.  Three execution modes are covered per
architecture: in memory (``from_pretrained`` + ``save_quantized``), lazy (``lazy=True`` +
``quantize(save_dir=...)``) and resumed (a lazy run interrupted after block 0, then rerun).  Every
setting that matters for the numbers is passed explicitly, so a change of a default does not move
the golden values; a change of the numbers must be deliberate.

To regenerate after an intended numerical change (review the diff of the JSON):

    AWQLIB_REGEN_GOLDEN=1 python -m pytest -q tests/test_golden.py

The hashes are of CPU fp32 computations; another CPU (another BLAS kernel) may round differently.
They were generated on the project's reference machine (x86-64, torch's bundled BLAS).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from awqlib import AutoAWQ, awq
from conftest import checkpoint_tensors, tiny_model

GOLDEN = Path(__file__).parent / "golden" / "checkpoints.json"
REGEN = os.environ.get("AWQLIB_REGEN_GOLDEN") == "1"

QUANT_CONFIG = {"w_bit": 4, "q_group_size": 64, "zero_point": True, "version": "gemm"}
SETTINGS = dict(method="awq", n_samples=8, seqlen=64, duo_scaling=True, apply_clip=True, n_grid=10,
                grid_includes_one=True, clip_grid=10, max_shrink=0.5, max_search_tokens=256, chunk_size=4,
                propagate_quantized=False, offload_device="cpu")
# Every mode writes the same checkpoint, so one record per architecture; llama runs in every mode,
# the others in one or two (resumed runs lazily: it covers the lazy path too).
CASES = [("llama", ("memory", "lazy", "resumed")), ("qwen2", ("memory",)), ("gemma2", ("lazy",)),
         ("mixtral", ("memory", "resumed"))]


def _calib() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return list(torch.randint(0, 256, (8, 64), generator=g))


def _digest(t: torch.Tensor) -> str:
    t = t.contiguous()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _quantize(src: Path, out: Path, mode: str, monkeypatch) -> None:
    kw = dict(calib_data=_calib(), **SETTINGS)
    if mode == "memory":
        m = AutoAWQ.from_pretrained(str(src))
        m.quantize(None, dict(QUANT_CONFIG), **kw)
        m.save_quantized(out)
        return
    if mode == "resumed":
        real, calls = awq.quantize_block, {"n": 0}

        def dies_on_block_1(*a, **k):
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt("simulated crash")
            return real(*a, **k)
        with monkeypatch.context() as mp:
            mp.setattr(awq, "quantize_block", dies_on_block_1)
            with pytest.raises(KeyboardInterrupt):
                AutoAWQ.from_pretrained(str(src), lazy=True).quantize(None, dict(QUANT_CONFIG), save_dir=out, **kw)
        assert len(list(out.parent.glob(out.name + ".awqlib-partial/*.safetensors"))) == 1
    AutoAWQ.from_pretrained(str(src), lazy=True).quantize(None, dict(QUANT_CONFIG), save_dir=out, **kw)


def _all_results(tmp_path: Path, monkeypatch) -> dict[str, dict[str, dict[str, str]]]:
    """{arch: {mode: {tensor name: digest}}}"""
    out = {}
    for arch, modes in CASES:
        src = tmp_path / f"src-{arch}"
        tiny_model(arch).half().save_pretrained(src)
        out[arch] = {}
        for mode in modes:
            folder = tmp_path / f"{arch}-{mode}"
            _quantize(src, folder, mode, monkeypatch)
            out[arch][mode] = {k: _digest(v) for k, v in sorted(checkpoint_tensors(folder).items())}
    return out


def test_golden_checkpoints(tmp_path, monkeypatch):
    got = _all_results(tmp_path, monkeypatch)
    if REGEN:
        for arch, by_mode in got.items():
            first = next(iter(by_mode.values()))
            assert all(d == first for d in by_mode.values()), f"{arch}: the modes disagree; not recorded"
        GOLDEN.parent.mkdir(exist_ok=True)
        record = {arch: next(iter(by_mode.values())) for arch, by_mode in got.items()}
        GOLDEN.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        pytest.skip(f"regenerated {GOLDEN}")
    want = json.loads(GOLDEN.read_text())
    assert sorted(got) == sorted(want)
    for arch, by_mode in got.items():
        for mode, digests in by_mode.items():
            assert digests.keys() == want[arch].keys(), f"{arch}/{mode}: other tensor names"
            changed = [k for k in digests if digests[k] != want[arch][k]]
            assert not changed, f"{arch}/{mode}: {len(changed)} tensors differ from the golden run, e.g. {changed[:5]}"
