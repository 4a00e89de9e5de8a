"""Helpers shared by the benchmarks: CUDA timing (graph replay, events), copy bandwidth, the
process's resident memory, the Llama-shaped model the memory benchmarks build, and the provenance
and atomic writes of the JSON every benchmark leaves (benchmarks/report.py renders it).  Importing
this module does not import torch: the report reads JSON on machines without it."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def code_sha256(root: Path = ROOT) -> str:
    """sha256 over the library's and the kernels' sources (awqlib/**/*.py, csrc/*), path and bytes:
    names the code a run measured also where there is no git checkout (a GPU machine gets a copy of
    the working tree); ``git`` can then find the commit with the same sources."""
    h = hashlib.sha256()
    files = sorted([*root.glob("awqlib/**/*.py"), *(p for p in root.glob("csrc/*") if p.is_file())])
    for p in files:
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _code_state() -> dict:
    """The commit ($AWQLIB_COMMIT where set: a GPU machine gets the working tree with the git
    metadata of an older checkout; else git's, "+dirty" with local edits; else None) and the
    sources' hash, now."""
    if os.environ.get("AWQLIB_COMMIT"):
        return {"commit": os.environ["AWQLIB_COMMIT"], "code_sha256": code_sha256()}
    commit = None
    try:
        git = ["git", "-C", str(ROOT)]
        commit = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        if subprocess.run(git + ["diff", "--quiet", "HEAD"], capture_output=True).returncode:
            commit += "+dirty"
    except (OSError, subprocess.CalledProcessError):
        commit = os.environ.get("AWQLIB_COMMIT") or None
    return {"commit": commit, "code_sha256": code_sha256()}


# Taken when a benchmark starts (its scripts import this module first): the code a run measures is
# the code it imported, even if the checkout changes while it runs.
_STARTED = {"started": time.time(), **_code_state(),
            # awqlib's own settings (AWQLIB_LAYOUT, AWQLIB_STREAM_PDL, ...): they change what runs
            "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("AWQLIB_")}}


def run_info(benchmark: str, argv: list[str]) -> dict:
    """Provenance a benchmark's JSON starts with: which script (report.py picks the table renderer
    by it), when (UTC: ``date`` the process started, ``ended`` now), on which commit and sources
    (:func:`code_sha256`) as they were when it started, the command line and the AWQLIB_*
    environment it started with."""
    return {"benchmark": benchmark, "date": _utc(_STARTED["started"]), "ended": _utc(time.time()),
            "commit": _STARTED["commit"], "code_sha256": _STARTED["code_sha256"],
            "command": shlex.join(["python", "-m", f"benchmarks.{benchmark}", *argv]), "env": dict(_STARTED["env"])}


# The stream kernel's launch options, and the variables csrc/awq_ops.cpp reads them from on every
# call (stream_pdl: off unless set; stream_narrow: on unless set to 0; stream_deep, stream_wgmma: off
# unless set).
STREAM_OPTIONS = {"pdl": "AWQLIB_STREAM_PDL", "narrow": "AWQLIB_STREAM_NARROW", "deep": "AWQLIB_STREAM_DEEP",
                  "wgmma": "AWQLIB_STREAM_WGMMA", "wide": "AWQLIB_STREAM_WIDE"}
# a cap on the shared memory the stream kernel assumes a block may have (csrc/awq_ops.cpp), which
# makes an H100/H200 choose what an A100 or a ~99 KB GPU would: never inherited by a measurement of
# this GPU (a variant that wants it sets it)
STREAM_SMEM_LIMIT = "AWQLIB_STREAM_SMEM_LIMIT"
# the library's defaults, whatever the environment a benchmark started in
STREAM_DEFAULTS_ENV: dict[str, str | None] = {var: None for var in (*STREAM_OPTIONS.values(), STREAM_SMEM_LIMIT)}


def stream_options_env(*names: str) -> dict[str, str | None]:
    """The environment that turns the stream kernel's options ``names`` on and the others off (on
    this GPU's shared memory: STREAM_SMEM_LIMIT unset)."""
    return {**{var: "1" if name in names else "0" for name, var in STREAM_OPTIONS.items()}, STREAM_SMEM_LIMIT: None}


@contextlib.contextmanager
def scoped_env(values: dict[str, str | None]):
    """The environment variables ``values`` set (None: unset) for the duration, then restored."""
    saved = {k: os.environ.get(k) for k in values}
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def write_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` with awqlib's atomic writer (a temporary file of this process,
    fsynced, ordinary permissions, renamed into place): a reader (or a crash) never sees half a
    file, and a failed write leaves no litter."""
    from awqlib.safetensors_io import write_bytes_atomic  # (awqlib imports torch: only writers need it)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, text.encode())


def tiny_model(arch: str):
    """The test suite's tiny random model of family ``arch`` (tests/conftest.py's, loaded without a
    sys.path edit)."""
    spec = importlib.util.spec_from_file_location("awqlib_tests_conftest", ROOT / "tests" / "conftest.py")
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    return conftest.tiny_model(arch)


def write_json(path: str | Path, obj) -> None:
    """``obj`` as JSON, atomically; a run's report (with run_info's ``ended``) is stamped now."""
    if isinstance(obj, dict) and "ended" in obj:
        obj["ended"] = _utc(time.time())
    write_atomic(path, json.dumps(obj, indent=1, default=str) + "\n")


def effective_options(method: str, options: dict) -> dict:
    """Every AWQOptions field a calibrated ``method`` ran with (the defaults included), so that a
    row still says what it measured after a default changes; {} for fp and round-to-nearest."""
    if method in ("fp", "rtn"):
        return {}
    from dataclasses import asdict

    from awqlib import awq
    return {k: (v if isinstance(v, (bool, int, float, str)) else str(v))
            for k, v in asdict(awq.make_options(method, **options)).items()}


def skip(report: dict, out: str | Path | None, why: str) -> int:
    """A run that cannot happen here (no GPU, no AutoAWQ, ...): its JSON says ``"skipped": why``
    and nothing else is measured, and the exit status is 1, so that neither a caller's status nor
    ``benchmarks.report --add`` (which refuses skipped runs) can take it for a result."""
    report["skipped"] = why
    print(f"{report['benchmark']}: skipped: {why}", file=sys.stderr)
    if out:
        write_json(out, report)
    return 1


def device_label(device) -> str:
    """What a JSON records as the device a run measured on: the card's name, or "cpu"."""
    import torch
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


TARGET_GRAPH_S = 0.004  # captured work per replay
REPLAYS = 5


def time_graph(calls: list, est_s: float) -> float:
    """Seconds per call: capture ``calls`` (cycled) into a CUDA graph, replay, time with events."""
    import torch
    n_calls = max(len(calls), min(4000, math.ceil(TARGET_GRAPH_S / max(est_s, 1e-7))))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for c in calls:  # warm-up outside capture (lazy init, cuBLAS workspaces)
            c()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(n_calls):
            calls[i % len(calls)]()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(REPLAYS):
        graph.replay()
    end.record()
    end.synchronize()
    t = start.elapsed_time(end) / 1e3 / (REPLAYS * n_calls)
    del graph
    return t


def time_eager(fn, reps: int = 3) -> float:
    import torch
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + bytes written)."""
    import torch
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    t = min(time_eager(lambda: b.copy_(a), reps=10) for _ in range(3))
    del a, b
    return 2 * nbytes / t / 1e9


def n_copies(nbytes: int, l2: int, cap_bytes: int) -> int:
    return max(1, min(math.ceil(3 * l2 / nbytes), max(1, cap_bytes // nbytes)))


# a 3.96 GB fp16 Llama-architecture model (36 blocks): the memory benchmarks' subject
CONFIG = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=36, num_attention_heads=16,
              num_key_value_heads=16, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False)


PROC_STATUS = Path("/proc/self/status")  # Linux: where the resident set sizes are read


def rss_now(field: str = "VmRSS") -> int:
    """Current resident set size in bytes (Linux); ``field`` "RssAnon": its anonymous part only."""
    for line in PROC_STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def build(folder: Path) -> int:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**CONFIG), dtype=torch.float16)
    model.save_pretrained(folder, max_shard_size="1GB")
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))
