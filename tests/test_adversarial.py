"""Bad input, faults and misuse (issue 12), each asserting the clear error and that nothing was lost or
left half-written. Tiny models, in-process calls; subprocesses only where a second process is the
point (the run killed with SIGKILL, and the lock held by another process)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import re
import resource
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from safetensors.torch import load_file, save_file

import awqlib
from awqlib import AutoAWQ, awq
from awqlib.cli import main
from awqlib.compat import validate_checkpoint
from awqlib.lazy import ShardReader
from conftest import assert_same_checkpoint, die_on_call, tiny_model

QC = {"q_group_size": 64}


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {chr(97 + i): i for i in range(26)} | {"[UNK]": 26}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]")


def _save_source(path: Path, seed: int = 0) -> Path:
    tiny_model("llama", seed).half().save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny fp16 llama folder (with tokenizer), its quantized checkpoint (RTN, g64) and a reference
    run of the resumable path, made once."""
    root = tmp_path_factory.mktemp("adv")
    src = _save_source(root / "src")
    ckpt = root / "ckpt"
    AutoAWQ.from_pretrained(str(src)).quantize(None, QC, method="rtn").save_quantized(ckpt)
    clean = root / "clean"
    AutoAWQ.from_pretrained(str(src), lazy=True).quantize(None, QC, method="rtn", save_dir=clean)
    return {"src": src, "ckpt": ckpt, "clean": clean, "root": root}


@pytest.fixture
def src(base, tmp_path):
    """A private copy of the source folder (tests replace or damage it)."""
    return Path(shutil.copytree(base["src"], tmp_path / "src"))


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _quantize(src, out, **kw):
    return AutoAWQ.from_pretrained(str(src), lazy=True).quantize(None, kw.pop("qc", QC), method="rtn", save_dir=out,
                                                                 **kw)


def _interrupt_after_first_block(src, out, monkeypatch, **kw):
    """A resumable run that dies while quantizing block 1 (block 0 is finished on disk)."""
    real = awq.rtn_quantize_block
    die_on_call(monkeypatch, awq, "rtn_quantize_block")
    with pytest.raises(KeyboardInterrupt):
        _quantize(src, out, **kw)
    monkeypatch.setattr(awq, "rtn_quantize_block", real)
    partial = out.parent / (out.name + ".awqlib-partial")
    assert len(list(partial.glob("*.safetensors"))) == 1 and not out.exists()
    return partial


# ------------------------------------------------------------------------------------------ 1. resume content

@pytest.mark.parametrize("keep_mtime", [False, True])
def test_resume_refuses_a_replaced_source(src, tmp_path, monkeypatch, keep_mtime):
    out = tmp_path / "out"
    partial = _interrupt_after_first_block(src, out, monkeypatch)
    kept = _digest(partial)
    weights = src / "model.safetensors"
    st = weights.stat()
    tiny_model("llama", seed=1).half().save_pretrained(tmp_path / "other")
    shutil.copyfile(tmp_path / "other" / "model.safetensors", weights)  # same path, same size, other model
    if keep_mtime:  # even a copy that keeps the old timestamps is seen
        os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(FileExistsError, match="cannot be resumed.*different settings.*overwrite=True"):
        _quantize(src, out)
    assert _digest(partial) == kept and not out.exists()  # nothing lost, nothing mixed
    _quantize(src, out, overwrite=True)  # the fix the message gives: start over, from the new model only
    fresh = tmp_path / "fresh"
    _quantize(tmp_path / "other", fresh)
    assert_same_checkpoint(fresh, out)


# ------------------------------------------------------------------------------------------ 2. lock + SIGKILL

_CHILD = r"""
import sys, time
from pathlib import Path
import awqlib
from awqlib import AutoAWQ, awq
real, calls = awq.rtn_quantize_block, []
def slow(*a, **k):
    calls.append(1)
    if len(calls) == 2:  # block 0 is on disk: say so, then hang until killed
        Path(sys.argv[3]).write_text("ready")
        time.sleep(600)
    return real(*a, **k)
awq.rtn_quantize_block = slow
AutoAWQ.from_pretrained(sys.argv[1], lazy=True).quantize(None, {"q_group_size": 64}, method="rtn", save_dir=sys.argv[2])
"""


def test_second_run_is_locked_out_and_sigkill_resumes_identically(base, src, tmp_path):
    out, ready = tmp_path / "out", tmp_path / "ready"
    here = Path(awqlib.__file__).parents[1]  # the child imports the awqlib under test
    env = {**os.environ, "PYTHONPATH": f"{here}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(src), str(out), str(ready)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while not ready.exists():
            assert child.poll() is None, child.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "the child run never reached block 1"
            time.sleep(0.2)
        # a second run into the same output, even with --overwrite, fails at once and names the holder
        t0 = time.time()
        with pytest.raises(RuntimeError, match=rf"another awqlib run \(pid {child.pid}\)"):
            _quantize(src, out, overwrite=True)
        assert time.time() - t0 < 60
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    # the kernel released the dead run's lock: the rerun resumes (block 0 is not quantized again)
    real, calls = awq.rtn_quantize_block, []
    awq.rtn_quantize_block = lambda *a, **k: (calls.append(1), real(*a, **k))[1]
    try:
        _quantize(src, out)
    finally:
        awq.rtn_quantize_block = real
    assert len(calls) == 1
    assert_same_checkpoint(base["clean"], out)
    assert not (tmp_path / "out.awqlib-partial").exists()


# ------------------------------------------------------------------------------------------ 3. --overwrite

def test_overwrite_never_touches_the_source(src, tmp_path):
    (tmp_path / "unrelated.txt").write_text("keep me")
    before = _digest(src)
    link = tmp_path / "link"
    link.symlink_to(src, target_is_directory=True)
    m = AutoAWQ.from_pretrained(str(src), lazy=True)
    for out, rel in ((src, "is"), (tmp_path, "contains"), (src / "q", "is inside"), (link, "is")):
        with pytest.raises(ValueError, match=rf"the output .* {rel} the source model folder"):
            m.quantize(None, QC, method="rtn", save_dir=out, overwrite="force")
    mem = AutoAWQ.from_pretrained(str(src)).quantize(None, QC, method="rtn")
    with pytest.raises(ValueError, match="the source model folder"):
        mem.save_quantized(src, overwrite="force")
    with pytest.raises(ValueError, match="source model folder"):
        main(["quantize", str(src), str(src), "--method", "rtn", "--group-size", "64", "--force-overwrite"])
    assert _digest(src) == before and (tmp_path / "unrelated.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "src", "unrelated.txt"]


def test_overwrite_replaces_only_awqlib_checkpoints(base, src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "config.json").write_text("{}")
    for run in (lambda ow: _quantize(src, out, overwrite=ow),
                lambda ow: AutoAWQ.from_pretrained(str(src)).quantize(None, QC, method="rtn").save_quantized(
                    out, overwrite=ow)):
        with pytest.raises(FileExistsError, match=r"does not look like an awqlib checkpoint.*notes\.txt.*force"):
            run(True)
        assert (out / "notes.txt").read_text() == "mine"
    assert main(["quantize", str(src), str(out), "--method", "rtn", "--group-size", "64", "--lazy",
                 "--force-overwrite"]) == 0
    assert not (out / "notes.txt").exists()
    assert_same_checkpoint(base["clean"], out)
    _quantize(src, out, overwrite=True)  # our own checkpoint: replaced without force
    assert_same_checkpoint(base["clean"], out)


def test_what_counts_as_an_awqlib_checkpoint(tmp_path):
    from awqlib.outputs import foreign_entries
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "awq"},
                                                      "auto_map": {"AutoModelForCausalLM": "modeling_x.X"}}))
    for name in ("model-00001-of-00002.safetensors", "model.safetensors.index.json", "tokenizer.model",
                 "qwen.tiktoken", "README.md", "modeling_x.py"):
        (tmp_path / name).write_text("x")
    (tmp_path / "additional_chat_templates").mkdir()
    (tmp_path / "additional_chat_templates" / "tool.jinja").write_text("x")
    assert foreign_entries(tmp_path) == []
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "data").mkdir()
    assert foreign_entries(tmp_path) == ["data", "notes.txt"]


# ------------------------------------------------------------------------------------------ 4. damaged partial runs

def test_damaged_run_json_gets_a_clear_error_and_overwrite_recovers(base, src, tmp_path, monkeypatch):
    out = tmp_path / "out"
    partial = _interrupt_after_first_block(src, out, monkeypatch)
    (partial / "run.json").write_text('{"fingerpr')  # half-written
    with pytest.raises(FileExistsError, match="run.json is damaged.*overwrite=True"):
        _quantize(src, out)
    _quantize(src, out, overwrite=True)
    assert_same_checkpoint(base["clean"], out)


def test_a_run_started_by_an_earlier_version_is_named_so(base, src, tmp_path, monkeypatch):
    out = tmp_path / "out"
    partial = _interrupt_after_first_block(src, out, monkeypatch)
    (partial / "run.json").write_text(json.dumps({"fingerprint": "0123456789abcdef"}))  # no "parts" yet
    with pytest.raises(FileExistsError, match="finished block.*earlier awqlib version.*pass overwrite=True") as e:
        _quantize(src, out)
    assert "changed:" not in str(e.value) and "original settings" not in str(e.value)


def test_the_finished_runs_blocks_go_even_where_their_folder_cannot_be_renamed(base, src, tmp_path, monkeypatch):
    from awqlib import resume
    out = tmp_path / "out"
    partial = out.parent / (out.name + ".awqlib-partial")
    real = os.rename

    def rename(a, b, *args, **kw):
        if Path(a) == partial:
            raise OSError(errno.EBUSY, "busy")
        return real(a, b, *args, **kw)
    monkeypatch.setattr(resume.os, "rename", rename)
    _quantize(src, out)  # the checkpoint is published: no error, and no model-sized folder left behind
    assert not partial.exists()
    assert_same_checkpoint(base["clean"], out)


def test_a_partial_run_of_another_user_is_refused(src, tmp_path, monkeypatch):
    from awqlib import resume
    out = tmp_path / "out"
    (tmp_path / "out.awqlib-partial").mkdir()
    monkeypatch.setattr(resume, "_new_file_owner", lambda folder: folder.stat().st_uid + 1)  # not ours
    with pytest.raises(FileExistsError, match="belongs to another user"):
        _quantize(src, out)
    assert os.listdir(tmp_path / "out.awqlib-partial") == []
    monkeypatch.undo()  # a folder this run makes is never refused (mapped owners are compared alike)
    (tmp_path / "out.awqlib-partial").rmdir()
    _quantize(src, out)


def test_a_generation_config_linked_out_of_the_checkpoint_is_not_read(base, tmp_path, caplog):
    import logging
    ck = tmp_path / "ck"
    shutil.copytree(base["ckpt"], ck)
    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps({"max_new_tokens": 4242}))
    (ck / "generation_config.json").unlink(missing_ok=True)
    (ck / "generation_config.json").symlink_to(outside)
    with caplog.at_level(logging.WARNING, logger="awqlib"):
        m = AutoAWQ.from_quantized(str(ck))
    assert getattr(m.model.generation_config, "max_new_tokens", None) != 4242
    assert "outside the checkpoint folder" in caplog.text
    (ck / "generation_config.json").unlink()
    (ck / "generation_config.json").write_text(json.dumps([{"max_new_tokens": 4242}]))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="awqlib"):  # not an object: said, as for any file it refuses
        m = AutoAWQ.from_quantized(str(ck))
    assert getattr(m.model.generation_config, "max_new_tokens", None) != 4242
    assert "generation_config.json must hold a JSON object, not list" in caplog.text
    (ck / "generation_config.json").write_text(json.dumps({"max_new_tokens": 4242}))
    assert AutoAWQ.from_quantized(str(ck)).model.generation_config.max_new_tokens == 4242
    (ck / "generation_config.json").write_text(json.dumps({"max_new_tokens": "many"}))  # a wrong type: loads
    with caplog.at_level(logging.WARNING, logger="awqlib"):
        AutoAWQ.from_quantized(str(ck))
    assert "not a valid generation config" in caplog.text


def test_run_json_that_is_a_fifo_is_refused_not_waited_on(base, src, tmp_path, monkeypatch):
    out = tmp_path / "out"
    partial = _interrupt_after_first_block(src, out, monkeypatch)
    (partial / "run.json").unlink()
    os.mkfifo(partial / "run.json")  # reading it would block for ever
    with pytest.raises(FileExistsError, match="run.json is damaged"):
        _quantize(src, out)


def test_a_fifo_config_json_in_the_output_is_foreign_and_not_read(tmp_path):
    import signal

    from awqlib.outputs import foreign_entries
    os.mkfifo(tmp_path / "config.json")  # reading it would block for ever
    (tmp_path / "model.safetensors").write_text("x")
    signal.signal(signal.SIGALRM, lambda *a: pytest.fail("foreign_entries blocked reading a FIFO"))
    signal.alarm(20)
    try:
        found = foreign_entries(tmp_path)
    finally:
        signal.alarm(0)
    assert found[0].startswith("(no config.json with an AWQ quantization_config") and found[1:] == ["config.json"]


def test_damaged_block_file_is_quantized_again(base, src, tmp_path, monkeypatch):
    out = tmp_path / "out"
    partial = _interrupt_after_first_block(src, out, monkeypatch)
    block = next(partial.glob("*.safetensors"))
    block.write_bytes(b"")  # e.g. a file system that lost the data of the last write
    _quantize(src, out)
    assert_same_checkpoint(base["clean"], out)


def test_failed_start_does_not_refuse_the_corrected_command(src, tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setattr(awq, "rtn_quantize_block", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        _quantize(src, out)  # fails before any block is finished
    monkeypatch.undo()
    _quantize(src, out, qc={"q_group_size": 32})  # other settings: nothing was committed, so this runs
    assert json.loads((out / "config.json").read_text())["quantization_config"]["group_size"] == 32


@pytest.fixture
def small_tmpfs(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()})")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_says_what_is_kept_and_rerun_resumes(base, src, small_tmpfs):
    out = small_tmpfs / "out"
    block = sum(f.stat().st_size for f in base["clean"].glob("*.safetensors")) // 3  # ~ one block file
    filler = small_tmpfs / "filler"
    free = os.statvfs(small_tmpfs).f_bavail * os.statvfs(small_tmpfs).f_frsize
    filler.write_bytes(b"\0" * (free - int(block * 1.5)))  # room for block 0 only
    with pytest.raises(OSError, match=r"disk full while writing block 1 .* block\(s\) \[0\] are kept .* rerun"):
        _quantize(src, out)
    partial = small_tmpfs / "out.awqlib-partial"
    assert len(list(partial.glob("*.safetensors"))) == 1 and not list(partial.glob("*.tmp")) and not out.exists()
    filler.unlink()
    _quantize(src, out)
    assert_same_checkpoint(base["clean"], out)
    # an in-memory save on a full disk: nothing written, the existing checkpoint untouched
    before = _digest(out)
    filler.write_bytes(b"\0" * (os.statvfs(small_tmpfs).f_bavail * os.statvfs(small_tmpfs).f_frsize - 50_000))
    mem = AutoAWQ.from_pretrained(str(src)).quantize(None, QC, method="rtn")
    with pytest.raises(OSError, match="disk full while saving .* nothing was written and the existing folder is "
                                      "untouched"):
        mem.save_quantized(out, overwrite=True)
    assert _digest(out) == before and sorted(p.name for p in small_tmpfs.iterdir()) == ["filler", "out"]


# ------------------------------------------------------------------------------------------ 5. confinement

def _sharded(base, tmp_path) -> Path:
    ck = tmp_path / "sharded"
    AutoAWQ.from_pretrained(str(base["src"])).quantize(None, QC, method="rtn").save_quantized(ck, max_shard_size="100KB")
    assert (ck / "model.safetensors.index.json").exists()
    return ck


def _edit_index(ck: Path, fn) -> None:
    idx = ck / "model.safetensors.index.json"
    d = json.loads(idx.read_text())
    fn(d)
    idx.write_text(json.dumps(d))


@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_index_entries_cannot_leave_the_folder(base, tmp_path, where):
    ck = _sharded(base, tmp_path)
    shard = sorted(ck.glob("model-*.safetensors"))[-1]
    outside = tmp_path / "x.safetensors"
    shard.rename(outside)
    name = "../x.safetensors" if where == "parent" else str(outside)
    _edit_index(ck, lambda d: d["weight_map"].update({k: name for k, v in d["weight_map"].items() if v == shard.name}))
    with pytest.raises(ValueError, match="outside the checkpoint folder"):
        AutoAWQ.from_quantized(str(ck))
    rep = validate_checkpoint(ck)
    assert not rep.ok and any("outside the checkpoint folder" in f.message for f in rep.errors)


def _no_hang(fn, fifo: Path, seconds: float = 20):
    """Call ``fn``; should it block opening the FIFO, a helper process opens its write end every
    ``seconds`` (a reader stuck in C may hold the GIL, so no thread of ours could) and the test fails."""
    helper = subprocess.Popen(["sh", "-c", f'while sleep {seconds}; do : > "$0"; done', str(fifo)])
    t0 = time.time()
    try:
        return fn()
    finally:
        helper.kill()
        helper.wait()
        assert time.time() - t0 < seconds, "reading the checkpoint blocked on a FIFO"


def test_shards_must_be_regular_files_inside_the_folder(base, tmp_path):
    ck = Path(shutil.copytree(base["ckpt"], tmp_path / "ck"))
    fifo = ck / "model.safetensors"
    fifo.unlink()
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="not a regular file"):
        _no_hang(lambda: AutoAWQ.from_quantized(str(ck)), fifo)
    rep = _no_hang(lambda: validate_checkpoint(ck), fifo)
    assert not rep.ok and any("not a regular file" in f.message for f in rep.errors)
    fifo.unlink()
    os.mkfifo(tmp_path / "fifo")  # a link to a FIFO elsewhere
    (ck / "model.safetensors").symlink_to(tmp_path / "fifo")
    with pytest.raises(ValueError, match="outside the checkpoint folder|not a regular file"):
        _no_hang(lambda: AutoAWQ.from_quantized(str(ck)), tmp_path / "fifo")
    # a symlink to a real file elsewhere is not the checkpoint's either
    (ck / "model.safetensors").unlink()
    (ck / "model.safetensors").symlink_to(base["ckpt"] / "model.safetensors")
    with pytest.raises(ValueError, match="outside the checkpoint folder"):
        AutoAWQ.from_quantized(str(ck))


JSON_DAMAGE = {  # how a checkpoint's JSON file is replaced -> what the refusal says
    "fifo": "not a regular file",  # opening it would block forever
    "/dev/zero": "outside the checkpoint folder",  # reading it would never end
    "outside": "outside the checkpoint folder",  # a file the checkpoint does not own
    "folder": "not a regular file",
    "deep": r"not UTF-8 JSON \(nested too deeply\)",  # RecursionError in json
    "utf-16": "not UTF-8 JSON",  # json.loads(bytes) would accept it; transformers would not
}


def _damage_json(path: Path, how: str, tmp_path: Path) -> None:
    text = path.read_text()
    path.unlink()
    if how == "fifo":
        os.mkfifo(path)
    elif how == "/dev/zero":
        path.symlink_to("/dev/zero")
    elif how == "outside":
        (tmp_path / "elsewhere.json").write_text(text)
        path.symlink_to(tmp_path / "elsewhere.json")
    elif how == "folder":
        path.mkdir()
    elif how == "deep":
        path.write_text("[" * 100_000 + "]" * 100_000)
    else:
        path.write_bytes(text.encode("utf-16"))


@pytest.mark.parametrize("how", sorted(JSON_DAMAGE))
@pytest.mark.parametrize("name", ["model.safetensors.index.json", "config.json"])
def test_checkpoint_json_files_are_read_by_the_shard_rules(base, tmp_path, name, how):
    """The index and config.json are untrusted like the shards: refused before they are opened
    where they are not regular files inside the folder, and a clear error naming them when they
    are not JSON, from the loader and the validator alike."""
    ck = _sharded(base, tmp_path) if name.startswith("model.") else Path(shutil.copytree(base["ckpt"], tmp_path / "ck"))
    _damage_json(ck / name, how, tmp_path)
    msg = JSON_DAMAGE[how]
    with pytest.raises(ValueError, match=rf"{re.escape(str(ck / name))}.*{msg}"):
        _no_hang(lambda: AutoAWQ.from_quantized(str(ck)), ck / name) if how == "fifo" else AutoAWQ.from_quantized(str(ck))
    rep = _no_hang(lambda: validate_checkpoint(ck), ck / name) if how == "fifo" else validate_checkpoint(ck)
    assert not rep.ok and any(re.search(msg, f.message) for f in rep.errors), rep.errors


@pytest.mark.parametrize("how", ["fifo", "deep", "utf-16"])
def test_quant_config_json_is_read_by_the_same_rules(base, tmp_path, how):
    ck = Path(shutil.copytree(base["ckpt"], tmp_path / "ck"))
    cfg = json.loads((ck / "config.json").read_text())
    (ck / "quant_config.json").write_text(json.dumps(cfg.pop("quantization_config")))
    (ck / "config.json").write_text(json.dumps(cfg))
    assert validate_checkpoint(ck).quant_config  # read from quant_config.json
    _damage_json(ck / "quant_config.json", how, tmp_path)
    rep = _no_hang(lambda: validate_checkpoint(ck), ck / "quant_config.json") if how == "fifo" else validate_checkpoint(ck)
    assert not rep.ok and any(re.search(JSON_DAMAGE[how], f.message) for f in rep.errors), rep.errors


def test_checkpoint_json_files_are_size_limited(tmp_path):
    from awqlib.safetensors_io import read_json
    (tmp_path / "config.json").write_text(json.dumps({"pad": "x" * 100}))
    assert read_json(tmp_path, "config.json")["pad"] == "x" * 100
    with pytest.raises(ValueError, match=r"config.json is over 64 bytes"):
        read_json(tmp_path, "config.json", limit=64)


def test_hub_cache_snapshot_symlinks_are_followed(base, tmp_path):
    """The Hub cache stores files in blobs/ and links them from snapshots/<rev>/: that must still load."""
    repo = tmp_path / "models--org--tiny"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in base["ckpt"].iterdir():
        blob = blobs / hashlib.sha256(f.name.encode()).hexdigest()
        shutil.copyfile(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    assert AutoAWQ.from_quantized(str(snap)).quantized


# ------------------------------------------------------------------------------------------ 6. headers

def _rewrite(ck: Path, fn) -> None:
    f = ck / "model.safetensors"
    state = load_file(str(f))
    fn(state)
    save_file(state, str(f), metadata={"format": "pt"})


QW = "model.layers.0.self_attn.q_proj.qweight"


@pytest.mark.parametrize("change,found", [
    (lambda s: s.update({QW: s[QW].to(torch.int16)}), "I16"),
    (lambda s: s.update({QW: s[QW].float()}), "F32"),
    (lambda s: s.update({QW: torch.cat([s[QW], s[QW]], 1)}), "[128, 32]"),
])
def test_tensor_dtype_and_shape_checked_against_the_config(base, tmp_path, change, found):
    ck = Path(shutil.copytree(base["ckpt"], tmp_path / "ck"))
    _rewrite(ck, change)
    with pytest.raises(ValueError, match=rf"model.safetensors: tensor {QW} is .*{re.escape(found)}.*"
                                         r"expected I32 \[128, 16\]"):
        AutoAWQ.from_quantized(str(ck))


def test_header_claiming_a_huge_tensor_costs_nothing(base, tmp_path):
    ck = Path(shutil.copytree(base["ckpt"], tmp_path / "ck"))
    f = ck / "model.safetensors"
    raw = f.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    b, e = header[QW]["data_offsets"]
    header[QW]["shape"] = [1 << 20, 1 << 20]  # 4 TiB of int32, in a file of a few hundred KB
    header[QW]["data_offsets"] = [b, b + (1 << 42)]
    h = json.dumps(header).encode()
    f.write_bytes(len(h).to_bytes(8, "little") + h + raw[8 + n:])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ValueError, match=rf"model.safetensors .*tensor '{QW}' \(I32 \[1048576, 1048576\], "
                                         r"4398046511104 bytes\) ends at data byte .* but the file holds"):
        AutoAWQ.from_quantized(str(ck))
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 200 * 1024  # KiB: no big allocation


def _edit_header(f: Path, fn) -> None:
    """Replace ``f``'s header by ``fn(header dict)`` (bytes), keeping the data."""
    raw = f.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    h = fn(json.loads(raw[8:8 + n]))
    f.write_bytes(len(h).to_bytes(8, "little") + h + raw[8 + n:])


@pytest.mark.parametrize("edit,msg", [
    (lambda h: json.dumps(h).encode("utf-16"), r"header is not UTF-8 JSON"),
    (lambda h: b"[" * 100_000 + b"]" * 100_000, r"header is not UTF-8 JSON \(nested too deeply\)"),
    (lambda h: json.dumps({**h, "__metadata__": {"format": 1}}).encode(), r"__metadata__ must be an object of strings"),
    (lambda h: json.dumps({**h, "__metadata__": ["pt"]}).encode(), r"__metadata__ must be an object of strings"),
])
def test_headers_safetensors_refuses_are_refused(base, tmp_path, edit, msg):
    """What safetensors (and so vLLM) cannot open is not passed by the header check: the loader's
    error names the file, and the validator does not call it OK."""
    ck = Path(shutil.copytree(base["ckpt"], tmp_path / "ck"))
    _edit_header(ck / "model.safetensors", edit)
    with pytest.raises(ValueError, match=r"model.safetensors is corrupt or not a safetensors file \(" + msg):
        AutoAWQ.from_quantized(str(ck))
    rep = validate_checkpoint(ck)
    assert not rep.ok and any(re.search(msg, f.message) for f in rep.errors), rep.errors


def test_lazy_reads_are_wrapped_like_the_loader(src):
    """A shard safetensors refuses after the header check (here: truncated during the run) is the
    same "corrupt" error naming the file, not a bare SafetensorError."""
    reader = ShardReader(src)
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-4])
    with pytest.raises(ValueError, match=r"model.safetensors is corrupt or not a safetensors file \(SafetensorError"):
        reader.get("model.norm.weight")


def _to_gemv(ck: Path, group_size: int) -> None:
    """Rewrite a GEMM checkpoint in AutoAWQ's GEMV layout (version "gemv")."""
    from awqlib.packing import gemv_shapes, pack_columns, unpack_columns
    s = load_file(str(ck / "model.safetensors"))
    out = {k: t for k, t in s.items() if not k.endswith((".qweight", ".qzeros", ".scales"))}
    for p in [k[: -len(".qweight")] for k in s if k.endswith(".qweight")]:
        codes = unpack_columns(s[p + ".qweight"], 4)  # [K, N]
        k, n = codes.shape
        shapes = gemv_shapes(k, n, group_size)
        zeros = torch.zeros(n, shapes["scales"][1], dtype=torch.int32)
        scales = torch.zeros(shapes["scales"], dtype=torch.float16)
        zeros[:, : s[p + ".scales"].shape[0]] = unpack_columns(s[p + ".qzeros"], 4).t()
        scales[:, : s[p + ".scales"].shape[0]] = s[p + ".scales"].t()
        out.update({p + ".qweight": pack_columns(codes.t().contiguous(), 4, interleave=False),
                    p + ".qzeros": pack_columns(zeros, 4, interleave=False), p + ".scales": scales})
    save_file(out, str(ck / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((ck / "config.json").read_text())
    cfg["quantization_config"]["version"] = "gemv"
    (ck / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("group_size", [64, -1])
def test_gemv_checkpoints_load_at_every_group_size(base, tmp_path, group_size):
    """AutoAWQ's GEMV layout with group_size -1 (one group of in_features, as its WQLinear_GEMV reads it)."""
    gemm = tmp_path / "gemm"
    AutoAWQ.from_pretrained(str(base["src"])).quantize(None, {"q_group_size": group_size}, method="rtn"
                                                        ).save_quantized(gemm)
    gemv = Path(shutil.copytree(gemm, tmp_path / "gemv"))
    _to_gemv(gemv, group_size)
    a, b = AutoAWQ.from_quantized(str(gemm)).model.state_dict(), AutoAWQ.from_quantized(str(gemv)).model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_gemv_shapes_are_checked_before_reading(base, tmp_path):
    """A GEMM checkpoint labelled "gemv": refused naming the tensor and the GEMV shape, before any data is read."""
    ck = Path(shutil.copytree(base["ckpt"], tmp_path / "ck"))
    cfg = json.loads((ck / "config.json").read_text())
    cfg["quantization_config"]["version"] = "gemv"
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"tensor model.layers.0.self_attn.q_proj.qzeros is I32 \[2, 16\], "
                                         r"expected I32 \[128, 2\].*Nothing was read"):
        AutoAWQ.from_quantized(str(ck))


DW = "model.layers.1.mlp.down_proj.weight"


@pytest.mark.parametrize("change,msg", [
    (lambda s: s.pop(DW), rf"missing \['{DW}'\]"),
    (lambda s: s.pop("model.norm.weight"), r"missing \['model.norm.weight'\]"),
    (lambda s: s.pop("lm_head.weight"), r"missing \['lm_head.weight'\]"),  # untied: the output would not load
    (lambda s: s.update({DW: s[DW].to(torch.int32)}), rf"tensor {DW} is I32 \[128, 256\], expected a floating dtype"),
    (lambda s: s.update({DW: s[DW][:, :128].contiguous()}), rf"tensor {DW} is F16 \[128, 128\], expected a floating "
                                                             r"dtype \[128, 256\]"),
])
def test_lazy_source_is_checked_before_any_work(src, change, msg):
    """from_pretrained(lazy=True) reads no weights up front, so it checks the headers against the model
    at once, as from_quantized does, instead of failing when the block is reached (or after writing a
    checkpoint that does not load)."""
    _rewrite(src, change)
    with pytest.raises(ValueError, match=r"does not match the model its config.json describes: .*" + msg):
        AutoAWQ.from_pretrained(str(src), lazy=True)


def test_lazy_output_holds_only_the_models_tensors(src, tmp_path, caplog):
    _rewrite(src, lambda s: s.update({"junk.tensor": torch.zeros(4)}))
    with caplog.at_level("WARNING", logger="awqlib"):
        _quantize(src, tmp_path / "out")
    assert "1 tensor(s) the model does not use, left out of the output: ['junk.tensor']" in caplog.text
    assert "junk.tensor" not in load_file(str(tmp_path / "out" / "model.safetensors"))
    assert AutoAWQ.from_quantized(str(tmp_path / "out")).quantized


# ------------------------------------------------------------------------------------------ 7. config values

def _set_qc(key, value):
    return lambda cfg: cfg["quantization_config"].update({key: value})


@pytest.mark.parametrize("edit,msg", [
    (_set_qc("group_size", 64.0), r"group_size=64.0 \(float\) is not accepted; group_size must be an integer, one of"),
    (_set_qc("bits", "4"), r"bits='4' \(str\) is not accepted; bits must be an integer, one of \(4,\)"),
    (_set_qc("zero_point", "yes"), r"zero_point='yes' \(str\) is not accepted; zero_point must be true or false"),
    (lambda cfg: cfg.update({"quantization_config": "awq"}), r"quantization_config is 'awq' \(str\); it must be an"),
])
def test_malformed_config_values(base, tmp_path, edit, msg):
    ck = Path(shutil.copytree(base["ckpt"], tmp_path / "ck"))
    cfg = json.loads((ck / "config.json").read_text())
    edit(cfg)
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config.json: .*" + msg):
        AutoAWQ.from_quantized(str(ck))


def test_malformed_index(base, tmp_path):
    ck = _sharded(base, tmp_path)
    _edit_index(ck, lambda d: d.update({"weight_map": sorted(set(d["weight_map"].values()))}))
    with pytest.raises(ValueError, match=r"weight_map must be an object \{tensor name: shard file name\}, got list"):
        AutoAWQ.from_quantized(str(ck))


def test_one_shard_spelled_two_ways_is_read_once(base, tmp_path):
    """An index naming "./model-0000x-..." for some tensors and "model-0000x-..." for others names one file."""
    ck = _sharded(base, tmp_path)
    wm = json.loads((ck / "model.safetensors.index.json").read_text())["weight_map"]
    shard = max(set(wm.values()), key=list(wm.values()).count)
    first = next(k for k, v in wm.items() if v == shard)  # one of several tensors in that shard
    _edit_index(ck, lambda d: d["weight_map"].update({first: "./" + shard}))
    assert AutoAWQ.from_quantized(str(ck)).quantized
    assert validate_checkpoint(ck).ok


def test_a_broken_tokenizer_is_reported(base, tmp_path, caplog):
    ck = Path(shutil.copytree(base["ckpt"], tmp_path / "ck"))
    (ck / "tokenizer_config.json").write_text("{not json")
    with caplog.at_level("WARNING", logger="awqlib"):
        m = AutoAWQ.from_quantized(str(ck))
    assert m.tokenizer is None and f"the tokenizer in {ck} did not load, model.tokenizer is None" in caplog.text


# ------------------------------------------------------------------------------------------ 8. CLI arguments

@pytest.mark.parametrize("args,msg", [
    (["eval", "CK", "--text", "TEXT", "--windows", "-1"], "--windows: -1 must be at least 1"),
    (["eval", "CK", "--text", "TEXT", "--windows", "0"], "--windows: 0 must be at least 1"),
    (["eval", "CK", "--text", "TEXT", "--seqlen", "0"], "--seqlen: 0 must be at least 1"),
    (["eval", "CK", "--text", "no-such-file.txt"], "--text: no-such-file.txt: no such file"),
    (["check", "CK", "--tp", "0"], "--tp: 0 must be at least 1"),
    (["check", "CK", "--tp", "2", "-2"], "--tp: -2 must be at least 1"),
    (["quantize", "CK", "OUT", "--seqlen", "-1"], "--seqlen: -1 must be at least 1"),
    (["quantize", "CK", "OUT", "--max-shard-size", "lots"], "--max-shard-size: max_shard_size='lots'"),
])
def test_cli_arguments_are_validated(base, tmp_path, capsys, args, msg):
    text = tmp_path / "t.txt"
    text.write_text("abc " * 500)
    args = [{"CK": str(base["ckpt"]), "TEXT": str(text), "OUT": str(tmp_path / "o")}.get(a, a) for a in args]
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2 and msg in capsys.readouterr().err


def test_perplexity_api_refuses_meaningless_windows():
    from awqlib.eval import perplexity
    with pytest.raises(ValueError, match="windows=-1 at least 1"):
        perplexity(torch.nn.Linear(1, 1), torch.arange(100), 10, windows=-1)


@pytest.mark.parametrize("damage", ["no weights", "missing tensors"])
def test_eval_refuses_a_model_with_missing_weights(base, tmp_path, capsys, damage):
    fp = Path(shutil.copytree(base["src"], tmp_path / "fp"))
    if damage == "no weights":
        (fp / "model.safetensors").unlink()
    else:
        _rewrite(fp, lambda s: [s.pop(k) for k in [k for k in s if ".layers.1." in k]])
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox " * 200)
    with pytest.raises(SystemExit, match="no usable weights" if damage == "no weights" else "lacks .* weight"):
        main(["eval", str(fp), "--text", str(text), "--seqlen", "16", "--windows", "1"])
    assert "perplexity" not in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ 9. non-finite values

NONFINITE = r"the source weight model.layers.1.mlp.down_proj.weight has 1 NaN/inf value\(s\) of 32768: block " \
            r"model.layers.1 was not quantized"


@pytest.mark.parametrize("compute", [torch.float32, torch.float16], ids=["cpu-fp32", "gpu-fp16"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("method", ["rtn", "awq"])
def test_nonfinite_source_weights_are_refused_before_quantizing(tmp_path, calib_ids, method, value, compute,
                                                                monkeypatch):
    """inf in a weight would quantize to a finite, meaningless group (its scale saturates at the
    fp16 maximum), NaN would fail far from its cause: both are refused before the block is quantized,
    at its turn, also where a GPU computes the float32 model in float16 (BlockSource.compute_dtype)."""
    from awqlib import pipeline
    monkeypatch.setattr(pipeline.BlockSource, "compute_dtype", lambda self: compute)
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] = value  # in the last block
    kw = dict(calib_data=list(calib_ids), n_samples=16, seqlen=64) if method == "awq" else {}
    with pytest.raises(FloatingPointError, match=NONFINITE):
        AutoAWQ.from_model(model).quantize(None, QC, method=method, save_dir=tmp_path / "resumable", **kw)
    assert not (tmp_path / "resumable").exists()
    assert len(list((tmp_path / "resumable.awqlib-partial").glob("*.safetensors"))) == 1  # block 0 only
    with pytest.raises(FloatingPointError, match=NONFINITE):
        AutoAWQ.from_model(model).quantize(None, QC, method=method, **kw)


def test_nonfinite_half_precision_weights_name_the_overflow_too(monkeypatch):
    from awqlib import pipeline
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] = 1e6  # finite in float32, inf in float16
    # a float32 model is computed in float16 on a GPU (BlockSource.compute_dtype)
    monkeypatch.setattr(pipeline.BlockSource, "compute_dtype", lambda self: torch.float16)
    with pytest.raises(FloatingPointError, match=NONFINITE + ".*overflowed float16.*load the model in bfloat16"):
        AutoAWQ.from_model(model).quantize(None, QC, method="rtn")
    # inf already in the float32 source: damage, not an overflow, whether computed in float32 (a CPU)
    # or in float16 (a GPU: the source is checked before the cast)
    for compute in (torch.float32, torch.float16):
        monkeypatch.setattr(pipeline.BlockSource, "compute_dtype", lambda self, c=compute: c)
        m = tiny_model("llama")
        with torch.no_grad():
            m.model.layers[1].mlp.down_proj.weight[3, 5] = float("inf")
        with pytest.raises(FloatingPointError, match=NONFINITE + ".*damaged") as e:
            AutoAWQ.from_model(m).quantize(None, QC, method="rtn")
        assert "overflowed" not in str(e.value)


def test_nonfinite_float16_model_names_both_causes(monkeypatch):
    """A model handed over in float16 may have been cast from a wider dtype before awqlib saw it:
    its inf is damage or that cast's overflow, and the error says both."""
    from awqlib import pipeline
    monkeypatch.setattr(pipeline.BlockSource, "compute_dtype", lambda self: torch.float16)
    model = tiny_model("llama").half()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] = float("inf")
    with pytest.raises(FloatingPointError, match=NONFINITE + ".*damaged.*or, if it was loaded in float16 from a "
                       "wider dtype, a value overflowed float16 in that cast"):
        AutoAWQ.from_model(model).quantize(None, QC, method="rtn")


def test_nonfinite_lazy_float32_source_names_the_overflow(tmp_path, monkeypatch):
    """The lazy path casts each weight as it reads it: a float32 checkpoint value that float16
    overflows is named so, and one already inf in the file is damage."""
    from awqlib import pipeline
    monkeypatch.setattr(pipeline.BlockSource, "compute_dtype", lambda self: torch.float16)
    for value, cause in ((1e6, ".*finite in float32 and overflowed float16.*load the model in bfloat16"),
                         (float("inf"), ".*damaged")):
        src = tmp_path / f"src-{value}"
        model = tiny_model("llama")
        with torch.no_grad():
            model.model.layers[1].mlp.down_proj.weight[3, 5] = value
        model.save_pretrained(src)  # float32
        with pytest.raises(FloatingPointError, match=NONFINITE + cause):
            _quantize(src, tmp_path / f"out-{value}")


def test_nonfinite_lazy_source_is_refused_before_quantizing(src, tmp_path):
    _rewrite(src, lambda s: s["model.layers.1.mlp.down_proj.weight"].__setitem__((3, 5), float("inf")))
    with pytest.raises(FloatingPointError, match=NONFINITE):
        _quantize(src, tmp_path / "out")


def test_no_checkpoint_holds_nan(tmp_path):
    """The last guard, for what quantizing itself could make non-finite: nothing is written."""
    from awqlib.safetensors_io import save_tensors
    t = torch.ones(4, 8, dtype=torch.float16)
    t[1, 2] = float("nan")
    with pytest.raises(FloatingPointError, match=r"model.layers.1.mlp.down_proj.scales has 1 NaN/inf value\(s\) "
                                                 r"of 32: not written to"):
        save_tensors({"model.layers.1.mlp.down_proj.scales": t}, tmp_path / "model.safetensors")
    assert not list(tmp_path.iterdir())


SC = "model.layers.0.self_attn.q_proj.scales"


@pytest.mark.parametrize("name,value", [(SC, float("nan")), ("model.norm.weight", float("inf")),
                                        ("model.embed_tokens.weight", float("-inf"))])
def test_a_checkpoint_holding_nan_is_refused_at_load(base, tmp_path, name, value):
    """NaN in a scale loads into a model whose logits stay finite (attention absorbs it) but are
    wrong: the loader refuses it, naming the tensor."""
    ck = Path(shutil.copytree(base["ckpt"], tmp_path / "ck"))
    _rewrite(ck, lambda s: s[name].view(-1).__setitem__(5, value))
    with pytest.raises(ValueError, match=rf"checkpoint tensor {re.escape(name)} has 1 NaN/inf value\(s\)"):
        AutoAWQ.from_quantized(str(ck))


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.bfloat16, torch.float32])
def test_nonfinite_count_reads_every_floating_dtype(dtype, monkeypatch):
    from awqlib import quant
    monkeypatch.setattr(quant, "FINITE_CHUNK", 3)  # counted over chunks
    t = torch.tensor([1.0, float("nan"), 2.0, float("nan"), 3.0, 4.0, float("nan")]).to(dtype)
    count = quant.nonfinite_count  # (float8_e4m3fn has no isfinite)
    assert count(t) == 3 and count(t[::2]) == 1 and count(t[::4]) == 0 and count(torch.arange(3)) == 0


# ------------------------------------------------------------------------------------------ 10. devices

def test_a_device_that_is_not_there_is_an_error(base):
    missing = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"
    m = AutoAWQ.from_pretrained(str(base["src"]))
    with pytest.raises(ValueError, match=rf"device='{missing}', but this machine has \d+ usable CUDA GPU"):
        m.quantize(None, QC, method="rtn", device=missing)
    assert not m.quantized
    with pytest.raises(ValueError, match=rf"device='{missing}', but this machine has"):
        AutoAWQ.from_quantized(str(base["ckpt"]), device=missing)


# ------------------------------------------------------------------------------------------ issue 11: shards, modes

def test_resumable_run_is_consolidated_into_shards(base, src, tmp_path):
    out = tmp_path / "out"
    _quantize(src, out, max_shard_size="100KB")
    idx = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) >= 3 and sorted(set(idx["weight_map"].values())) == [s.name for s in shards]
    assert all(s.name == f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i, s in enumerate(shards))
    assert idx["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                                for s in shards for t in load_file(str(s)).values())
    assert_same_checkpoint(base["clean"], out)
    assert [p.name for p in base["clean"].glob("*.safetensors")] == ["model.safetensors"]  # default 5GB: one file
    assert main(["quantize", str(src), str(tmp_path / "cli"), "--method", "rtn", "--group-size", "64", "--lazy",
                 "--max-shard-size", "100KB"]) == 0
    assert sorted(p.name for p in (tmp_path / "cli").glob("*.safetensors")) == [s.name for s in shards]


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_saved_files_get_ordinary_permissions(base, src, tmp_path, mask):
    old = os.umask(mask)
    try:
        _quantize(src, tmp_path / "resumable")
        AutoAWQ.from_pretrained(str(src)).quantize(None, QC, method="rtn").save_quantized(tmp_path / "saved")
    finally:
        os.umask(old)
    for folder in (tmp_path / "resumable", tmp_path / "saved"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~mask
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
        assert modes and all(m == 0o666 & ~mask for m in modes.values()), modes


# ------------------------------------------------------------------------------------------ one folder rule

def test_loader_and_validator_find_the_same_weights(base, tmp_path):
    ck = Path(shutil.copytree(base["ckpt"], tmp_path / "ck"))
    (ck / "model.safetensors").rename(ck / "weights.safetensors")
    assert AutoAWQ.from_quantized(str(ck)).quantized
    assert validate_checkpoint(ck).ok
    (ck / "weights.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no .safetensors weights"):
        AutoAWQ.from_quantized(str(ck))
    assert not validate_checkpoint(ck).ok


# ------------------------------------------------------------------------------------------ no pickle, no remote code

class _Evil:
    def __reduce__(self):
        return (Path.touch, (Path(os.environ["AWQLIB_PWNED"]),))


def test_no_pickle_and_no_remote_code_by_default(base, tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("AWQLIB_PWNED", str(marker))
    ck = Path(shutil.copytree(base["ckpt"], tmp_path / "ck"))
    (ck / "model.safetensors").unlink()
    (ck / "pytorch_model.bin").write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(FileNotFoundError, match="never unpickles"):
        AutoAWQ.from_quantized(str(ck))
    with pytest.raises(FileNotFoundError, match="never unpickles"):
        ShardReader(ck)  # what from_pretrained(lazy=True) reads with
    assert not marker.exists()
    remote = Path(shutil.copytree(base["ckpt"], tmp_path / "remote"))
    (remote / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    cfg = json.loads((remote / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (remote / "config.json").write_text(json.dumps(cfg))
    try:
        AutoAWQ.from_quantized(str(remote))
    except Exception:  # refusing is fine too; running the file is not
        pass
    assert not marker.exists()


@pytest.mark.parametrize("lazy", [False, True])
def test_untrusted_remote_code_is_not_carried_into_the_output(src, tmp_path, caplog, lazy):
    """A source with auto_map loaded with trust_remote_code=False was built by transformers' own class:
    its code files and auto_map are not written (push_to_hub would upload them for trusting readers)."""
    (src / "evil.py").write_text("raise SystemExit('ran')\n")
    cfg = json.loads((src / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "evil.EvilModel"}
    (src / "config.json").write_text(json.dumps(cfg))
    (src / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["evil.Tok", None]},
                                                           "model_max_length": 77}))
    out = tmp_path / "out"
    with caplog.at_level("WARNING", logger="awqlib"):
        if lazy:
            _quantize(src, out)
        else:
            AutoAWQ.from_pretrained(str(src)).quantize(None, QC, method="rtn").save_quantized(out)
    assert not (out / "evil.py").exists() and "auto_map" not in json.loads((out / "config.json").read_text())
    assert "auto_map left out of the quantized config.json" in caplog.text
    assert "not copying the source's code files ['evil.py']" in caplog.text
    assert json.loads((out / "tokenizer_config.json").read_text()) == {"model_max_length": 77}


@pytest.mark.parametrize("text", ['{"tokenizer_class": "PreTrainedTokenizerFast",', '["auto_map"]'])
def test_a_malformed_tokenizer_config_is_copied_verbatim(src, tmp_path, caplog, text):
    """The untrusted save's auto_map rewrite must not fail the whole save at its very end (every rerun
    resumed and failed the same way): a tokenizer_config.json that is not a JSON object is kept as it
    was (transformers cannot read it either), with a warning."""
    (src / "tokenizer_config.json").write_text(text)
    out = tmp_path / "out"
    with caplog.at_level("WARNING", logger="awqlib"):
        _quantize(src, out)
    assert (out / "tokenizer_config.json").read_text() == text
    assert "tokenizer_config.json copied as it is" in caplog.text


def test_trusted_remote_code_keeps_auto_map(tmp_path):
    from awqlib.checkpoint import write_config
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "llama", "auto_map": {"AutoConfig": "x.C"}}))
    for trusted in (True, False):
        write_config(tmp_path, src, None, awqlib.QuantConfig(), remote_code=trusted)
        assert ("auto_map" in json.loads((tmp_path / "config.json").read_text())) is trusted


# ------------------------------------------------------------------------------------------ review follow-ups

def test_a_half_quantized_object_is_not_quantized_again(src, tmp_path, monkeypatch):
    """A quantize() that died half-way leaves the in-memory model partly quantized: calling it again
    on the same object would resume on top of that and silently mix (found in review). It is refused;
    a freshly loaded model resumes and gives the uninterrupted result.  A failure before the model
    was touched (an existing output) does not block the corrected call."""
    out = tmp_path / "out"
    m = AutoAWQ.from_pretrained(str(src))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        m.quantize(None, QC, method="rtn", save_dir=tmp_path / "taken")
    real = awq.rtn_quantize_block
    die_on_call(monkeypatch, awq, "rtn_quantize_block")
    with pytest.raises(KeyboardInterrupt):
        m.quantize(None, QC, method="rtn", save_dir=out)
    monkeypatch.setattr(awq, "rtn_quantize_block", real)
    with pytest.raises(RuntimeError, match="stopped half-way"):
        m.quantize(None, QC, method="rtn", save_dir=out)
    AutoAWQ.from_pretrained(str(src)).quantize(None, QC, method="rtn", save_dir=out)
    ref = tmp_path / "ref"
    AutoAWQ.from_pretrained(str(src)).quantize(None, QC, method="rtn", save_dir=ref)
    assert_same_checkpoint(out, ref)


def test_bad_shard_size_fails_before_any_work(src, monkeypatch):
    monkeypatch.setattr(awq, "rtn_quantize_block", lambda *a, **k: pytest.fail("started quantizing"))
    with pytest.raises(ValueError):
        AutoAWQ.from_pretrained(str(src)).quantize(None, QC, method="rtn", max_shard_size="lots")


def test_source_files_are_copied_only_from_inside_the_source(src, tmp_path, caplog):
    """A tokenizer/generation file that is a symlink out of the source folder (a cloned repo) is not
    copied into the checkpoint (push_to_hub would upload it)."""
    secret = tmp_path / "secret.txt"
    secret.write_text("private key")
    (src / "chat_template.jinja").symlink_to(secret)
    (src / "generation_config.json").unlink()
    (src / "generation_config.json").symlink_to(secret)
    outside_cfg = tmp_path / "outside-config.json"  # transformers reads it; awqlib writes the loaded config
    (src / "config.json").rename(outside_cfg)
    (src / "config.json").symlink_to(outside_cfg)
    out = tmp_path / "out"
    with caplog.at_level("WARNING", logger="awqlib"):
        AutoAWQ.from_pretrained(str(src)).quantize(None, QC, method="rtn").save_quantized(out)
    assert not (out / "chat_template.jinja").exists()
    assert "config.json written from the loaded config, not copied from the source" in caplog.text
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    assert all("private key" not in p.read_text(errors="replace") for p in out.iterdir() if p.is_file())
    assert (out / "tokenizer.json").is_file()


def test_a_failed_swap_puts_the_old_checkpoint_back(tmp_path, monkeypatch):
    from awqlib import outputs
    target, new = tmp_path / "ckpt", tmp_path / "new"
    target.mkdir()
    (target / "model.safetensors").write_bytes(b"old")
    new.mkdir()
    real, calls = os.rename, []

    def rename(a, b):
        calls.append(b)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(a, b)
    monkeypatch.setattr(outputs.os, "rename", rename)
    monkeypatch.setattr(outputs, "exchange_paths", lambda a, b: False)  # the two-rename path
    with pytest.raises(OSError):
        outputs.swap_into_place(new, target)
    assert (target / "model.safetensors").read_bytes() == b"old"


def test_command_line_treats_a_locked_output_and_a_full_disk_as_user_errors():
    import errno

    from awqlib.cli import is_user_error
    from awqlib.resume import OutputLocked
    assert is_user_error(OutputLocked("held by pid 1"))
    assert is_user_error(OSError(errno.ENOSPC, "disk full"))
    assert is_user_error(OSError(errno.EIO, "i/o error")) and not is_user_error(RuntimeError("bug"))


def test_resume_refuses_a_source_loaded_in_another_dtype(src, tmp_path, monkeypatch):
    """The same folder loaded as fp16 and as bf16 holds different weights (the CPU computes both
    in fp32): their blocks must not be mixed."""
    out = tmp_path / "out"
    real = awq.rtn_quantize_block
    die_on_call(monkeypatch, awq, "rtn_quantize_block")
    with pytest.raises(KeyboardInterrupt):
        AutoAWQ.from_pretrained(str(src), torch_dtype=torch.float16).quantize(None, QC, method="rtn", save_dir=out)
    monkeypatch.setattr(awq, "rtn_quantize_block", real)
    with pytest.raises(FileExistsError, match="different settings"):
        AutoAWQ.from_pretrained(str(src), torch_dtype=torch.bfloat16).quantize(None, QC, method="rtn", save_dir=out)


# ------------------------------------------------------------------------------------------ review: writes, resume, faults

def _interrupt_in_memory(src, out, monkeypatch, model=None):
    """An in-memory resumable run (``model`` or a fresh load of ``src``) that dies in block 1."""
    real = awq.rtn_quantize_block
    die_on_call(monkeypatch, awq, "rtn_quantize_block")
    with pytest.raises(KeyboardInterrupt):
        (model or AutoAWQ.from_pretrained(str(src))).quantize(None, QC, method="rtn", save_dir=out)
    monkeypatch.setattr(awq, "rtn_quantize_block", real)


def _changed_in_memory(src):
    """``src`` loaded, then block 0 changed in memory (a merged LoRA): its folder is unchanged."""
    m = AutoAWQ.from_pretrained(str(src))
    with torch.no_grad():
        m.model.model.layers[0].mlp.down_proj.weight.mul_(-3.0)
    return m


def test_resume_of_an_in_memory_model_fingerprints_its_tensors_not_its_folder(src, tmp_path, monkeypatch):
    out = tmp_path / "out"
    _interrupt_in_memory(src, out, monkeypatch)
    with pytest.raises(FileExistsError, match="cannot be resumed"):
        _changed_in_memory(src).quantize(None, QC, method="rtn", save_dir=out)
    _changed_in_memory(src).quantize(None, QC, method="rtn", save_dir=out, overwrite=True)
    fresh = tmp_path / "fresh"
    _changed_in_memory(src).quantize(None, QC, method="rtn", save_dir=fresh)
    assert_same_checkpoint(fresh, out)


def test_model_identity_covers_scalar_and_empty_tensors():
    from awqlib.resume import model_identity
    m = nn.Module()
    m.register_buffer("scalar", torch.tensor(1.0))  # 0-dim: viewing it as bytes needs a reshape
    m.register_buffer("empty", torch.zeros(0, 3))
    m.register_buffer("bf", torch.tensor(2.0, dtype=torch.bfloat16))
    first = model_identity(m)
    m.scalar.fill_(1.5)
    assert model_identity(m) != first
    tied = nn.Module()
    tied.a = nn.Linear(4, 4, bias=False)
    tied.b = nn.Linear(4, 4, bias=False)
    untied = model_identity(tied)
    tied.b.weight = tied.a.weight  # tied: hashed once, and not the same model as before
    assert model_identity(tied) != untied
    with torch.no_grad():
        tied.a.weight.add_(1.0)
    assert model_identity(tied) != untied


def _edit_config(src, **changes):
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(changes)
    (src / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("change, named", [
    ("config", "model config"), ("awqlib", "awqlib version"), ("transformers", "transformers version")])
def test_resume_refuses_another_config_or_version_and_names_it(src, tmp_path, monkeypatch, change, named):
    """The blocks were calibrated under the source's config and made by one awqlib/transformers: a
    rerun after any of them changed starts over (review: only the weight files were fingerprinted)."""
    out = tmp_path / "out"
    partial = _interrupt_after_first_block(src, out, monkeypatch)
    kept = _digest(partial)
    if change == "config":
        _edit_config(src, rms_norm_eps=0.5)
    elif change == "awqlib":
        monkeypatch.setattr(awqlib.version, "__version__", "99.0")
    else:
        import transformers
        monkeypatch.setattr(transformers, "__version__", "99.0")
    with pytest.raises(FileExistsError, match=f"cannot be resumed.*different settings.*{named}"):
        _quantize(src, out)
    assert _digest(partial) == kept and not out.exists()


@pytest.mark.parametrize("swap", ["exchange", "renames"])
@pytest.mark.parametrize("how", ["quantize", "save_quantized"])
def test_output_given_as_dot_or_a_relative_path(src, tmp_path, monkeypatch, caplog, how, swap):
    """`cd new && awqlib quantize ../model .`: review: the partial/tmp folders landed inside '.', and
    finalize refused its own output; reruns were refused even with --overwrite.  The folder the
    process worked in is replaced, so the process then works in the new one (review: os.getcwd()
    failed, and a notebook's next `from_quantized(".")` with it) and the user is told about the
    shell; by one atomic exchange, or by two renames (macOS, filesystems without RENAME_EXCHANGE)."""
    from awqlib import outputs
    if swap == "renames":
        monkeypatch.setattr(outputs, "exchange_paths", lambda a, b: False)
    (tmp_path / "new").mkdir()
    for out in (".", "../new", "."):  # into the empty folder, a relative path, then over the checkpoint
        monkeypatch.chdir(tmp_path / "new")
        kw = {"overwrite": True} if os.listdir(".") else {}
        caplog.clear()
        if how == "quantize":
            m = _quantize(src, out, **kw)
            assert m.saved_to == tmp_path / "new"
        else:
            AutoAWQ.from_pretrained(str(src)).quantize(None, QC, method="rtn").save_quantized(out, **kw)
        assert os.getcwd() == os.path.realpath(tmp_path / "new")
        assert validate_checkpoint(".").ok
        assert "was the current directory" in caplog.text and "cd " in caplog.text
        monkeypatch.chdir(tmp_path)
        assert validate_checkpoint(tmp_path / "new").ok
        assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "src"]  # nothing left beside or inside
        assert not [p for p in (tmp_path / "new").iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("kept", [True, False], ids=["subfolder-kept", "subfolder-gone"])
@pytest.mark.parametrize("swap", ["exchange", "renames"])
def test_a_process_inside_a_replaced_output_moves_into_the_new_one_even_if_cleanup_fails(
        src, tmp_path, monkeypatch, caplog, swap, kept):
    """review: when deleting the replaced checkpoint failed (files held open on NFS), the process
    stayed in the old one under its hidden leftover name and `from_quantized(".")` read the old
    weights.  It now moves as soon as the new checkpoint is in place, to the same subfolder where the
    new one has it, else to its root -- and says which."""
    from awqlib import outputs
    out, sub = tmp_path / "out", "additional_chat_templates"
    AutoAWQ.from_pretrained(str(src)).quantize(None, QC, method="rtn").save_quantized(out)
    (out / sub).mkdir()
    (out / sub / "x.jinja").write_text("{{ x }}")
    monkeypatch.chdir(out / sub)
    m = AutoAWQ.from_pretrained(str(src)).quantize(None, {**QC, "q_group_size": 32}, method="rtn")
    real_publish = outputs.publish_modes

    def publish(folder):  # the new checkpoint has the subfolder too, or not
        if kept:
            (Path(folder) / sub).mkdir()
            (Path(folder) / sub / "x.jinja").write_text("{{ y }}")
        real_publish(folder)
    with monkeypatch.context() as mp:
        mp.setattr(outputs, "remove_tree", lambda path, what: None)  # the cleanup fails
        mp.setattr(outputs, "publish_modes", publish)
        if swap == "renames":
            mp.setattr(outputs, "exchange_paths", lambda a, b: False)
        m.save_quantized(out, overwrite=True)
    assert os.getcwd() == os.path.realpath(out / sub if kept else out)
    root = Path(".." if kept else ".")
    assert json.loads((root / "config.json").read_text())["quantization_config"]["group_size"] == 32
    assert f"held the current directory ({sub})" in caplog.text
    assert ("has no" in caplog.text) != kept
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # what the failed cleanup left


def test_an_output_that_is_a_mount_point_is_refused_before_any_work(src, tmp_path, monkeypatch):
    """`docker -v host:/out`: renaming a mount point aside fails (EBUSY), which the review saw only
    after every block had run. Refused up front, with the way out."""
    out = tmp_path / "mnt"
    out.mkdir()
    real_ismount = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: Path(p) == out or real_ismount(p))
    monkeypatch.setattr(awq, "rtn_quantize_block", lambda *a, **k: pytest.fail("started quantizing"))
    with pytest.raises(ValueError, match=f"mount point.*{out / 'model'}"):
        _quantize(src, out)
    m = AutoAWQ.from_pretrained(str(src))
    m.quantized = True  # the refusal comes before anything is written
    with pytest.raises(ValueError, match="mount point"):
        m.save_quantized(out)
    assert os.listdir(out) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["mnt", "src"]


def test_leftovers_of_a_killed_run_are_restored_or_removed_and_reported(base, tmp_path, caplog):
    """A kill between swap_into_place's two renames left no `out` (the old checkpoint in `.out.old-*`),
    a kill while writing left `.out.tmp-*` forever (review). The next run puts the old checkpoint back,
    removes the leftovers no live run holds, and says so; names awqlib does not make stay."""
    import fcntl
    import logging
    out = tmp_path / "out"
    shutil.copytree(base["ckpt"], tmp_path / ".out.old-0123abcd")
    (tmp_path / ".out.tmp-89abcdef").mkdir()
    (tmp_path / ".out.tmp-89abcdef" / "model.safetensors").write_bytes(b"half")
    held = tmp_path / ".out.tmp-00000000"  # a live run's folder (it holds the folder's flock)
    held.mkdir()
    fd = os.open(held, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    keep = [tmp_path / ".out.tmp-mine", tmp_path / ".out.old-0123abcd0", tmp_path / ".other.tmp-0123abcd"]
    for p in keep:
        p.mkdir()
    m = AutoAWQ.from_pretrained(str(base["src"])).quantize(None, QC, method="rtn")
    with caplog.at_level(logging.WARNING, logger="awqlib"), pytest.raises(FileExistsError, match="already exists"):
        m.save_quantized(out)  # the restored checkpoint is not overwritten without overwrite=True
    os.close(fd)
    assert _digest(out) == _digest(base["ckpt"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", held.name] + [p.name for p in keep])
    assert str(tmp_path / ".out.old-0123abcd") in caplog.text and str(tmp_path / ".out.tmp-89abcdef") in caplog.text
    assert str(held) in caplog.text  # reported, not touched


def test_a_swap_is_one_step_where_the_filesystem_can_exchange(base, tmp_path, monkeypatch):
    """renameat2(RENAME_EXCHANGE): `out` is never missing; a kill right after the swap leaves the old
    checkpoint under a .tmp name, which the next run removes."""
    from awqlib import outputs
    out = tmp_path / "out"
    shutil.copytree(base["ckpt"], out)
    (out / "README.md").write_text("the old one")
    m = AutoAWQ.from_pretrained(str(base["src"])).quantize(None, QC, method="rtn")
    real_rename = os.rename

    def rename(a, b):
        if Path(b) == out or ".out.old-" in str(b):
            pytest.fail("two renames where one exchange does")
        return real_rename(a, b)
    monkeypatch.setattr(outputs.os, "rename", rename)

    def killed(path, what):
        raise KeyboardInterrupt("killed")
    monkeypatch.setattr(outputs, "remove_tree", killed)
    with pytest.raises(KeyboardInterrupt):
        m.save_quantized(out, overwrite=True)
    monkeypatch.undo()
    assert validate_checkpoint(out).ok and (out / "README.md").read_text() != "the old one"
    left = [p for p in tmp_path.iterdir() if p.name not in ("out", "src")]
    assert len(left) == 1 and ".out.tmp-" in left[0].name and (left[0] / "README.md").read_text() == "the old one"
    m.save_quantized(out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "src") == ["out"] and validate_checkpoint(out).ok


def test_a_kill_between_the_two_renames_loses_no_checkpoint(base, tmp_path, monkeypatch):
    """Where the filesystem cannot exchange two folders, the swap is two renames."""
    from awqlib import outputs
    out = tmp_path / "out"
    shutil.copytree(base["ckpt"], out)
    monkeypatch.setattr(outputs, "exchange_paths", lambda a, b: False)
    real, calls = os.rename, []

    def rename(a, b):
        calls.append(b)
        if Path(b) == out:  # the new checkpoint into place: the old one is already aside
            raise KeyboardInterrupt("killed")
        return real(a, b)
    m = AutoAWQ.from_pretrained(str(base["src"])).quantize(None, QC, method="rtn")
    monkeypatch.setattr(outputs.os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        m.save_quantized(out, overwrite=True)
    monkeypatch.setattr(outputs.os, "rename", real)
    assert not out.exists()
    m.save_quantized(out, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and validate_checkpoint(out).ok
    assert calls, "the two-rename path ran"


def test_an_old_checkpoint_without_an_interrupted_swap_beside_it_is_not_put_back(base, tmp_path, caplog):
    """An `.out.old-*` alone (a kill while it was being deleted: maybe half gone; or `out` removed on
    purpose) is removed, never put back as `out` (review)."""
    import logging
    out = tmp_path / "out"
    shutil.copytree(base["ckpt"], tmp_path / ".out.old-0123abcd")
    (tmp_path / ".out.old-0123abcd" / "model.safetensors").unlink()  # half deleted
    m = AutoAWQ.from_pretrained(str(base["src"])).quantize(None, QC, method="rtn")
    with caplog.at_level(logging.WARNING, logger="awqlib"):
        m.save_quantized(out)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and validate_checkpoint(out).ok
    assert "removing " + str(tmp_path / ".out.old-0123abcd") in caplog.text


def test_a_folder_being_created_is_never_taken_for_a_leftover(tmp_path, monkeypatch):
    """A save's temporary folder is held before it gets its `.tmp-` name: another run's cleanup,
    between the two, removed it (review)."""
    from awqlib import outputs
    target = tmp_path / "out"
    real_hold = outputs.hold

    def hold(folder):  # another run cleans up right before this one takes its lock
        monkeypatch.setattr(outputs, "hold", real_hold)
        outputs.recover_leftovers(target)
        return real_hold(folder)
    monkeypatch.setattr(outputs, "hold", hold)
    with outputs.AtomicDir(target) as d:
        assert d.is_dir() and d.name.startswith(".out.tmp-")
        (d / "config.json").write_text("{}")
    # a folder in the making that a killed run left (.new, never held) goes once it is old
    stale = tmp_path / ".out.tmp-0123abcd.new"
    stale.mkdir()
    outputs.recover_leftovers(target)
    assert stale.is_dir()  # young: maybe another run's, about to be held
    os.utime(stale, (time.time() - 2 * outputs.NEW_FOLDER_GRACE_S,) * 2)
    outputs.recover_leftovers(target)
    assert not stale.exists()


def test_an_old_checkpoint_is_not_put_back_beside_a_live_runs_tmp(base, tmp_path):
    """A .tmp a live save holds is no sign of an interrupted swap: the .old beside it (maybe half
    deleted) is not put back as `out` (review)."""
    import fcntl

    from awqlib import outputs
    out = tmp_path / "out"
    shutil.copytree(base["ckpt"], tmp_path / ".out.old-0123abcd")
    live = tmp_path / ".out.tmp-89abcdef"
    live.mkdir()
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        outputs.recover_leftovers(out)
    finally:
        os.close(fd)
    assert not out.exists() and not (tmp_path / ".out.old-0123abcd").exists() and live.is_dir()


def test_what_cannot_be_removed_is_reported(base, tmp_path, monkeypatch, caplog):
    import logging
    out = tmp_path / "out"
    shutil.copytree(base["ckpt"], out)
    real = shutil.rmtree

    def rmtree(p, *a, **k):  # the replaced checkpoint (.old after two renames, .tmp after an exchange)
        if ".out.old-" in str(p) or ".out.tmp-" in str(p):
            raise PermissionError(13, "Permission denied", str(p))
        return real(p, *a, **k)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    m = AutoAWQ.from_pretrained(str(base["src"])).quantize(None, QC, method="rtn")
    with caplog.at_level(logging.WARNING, logger="awqlib"):
        m.save_quantized(out, overwrite=True)
    old = [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    assert len(old) == 1 and str(old[0]) in caplog.text and validate_checkpoint(out).ok


@pytest.mark.parametrize("plant", ["symlink", "hardlink"])
def test_the_lock_file_is_never_opened_through_a_link(src, tmp_path, plant):
    """A `.lock` planted as a link to another file (e.g. in a shared /tmp): the run truncated the file
    it pointed to and wrote its pid there (review)."""
    out, victim = tmp_path / "out", tmp_path / "victim.txt"
    victim.write_text("precious")
    partial = tmp_path / "out.awqlib-partial"
    partial.mkdir()
    (partial / ".lock").symlink_to(victim) if plant == "symlink" else os.link(victim, partial / ".lock")
    with pytest.raises(FileExistsError, match="not a regular file"):
        _quantize(src, out)
    assert victim.read_text() == "precious"


def test_every_file_and_the_parent_are_on_disk_before_the_old_checkpoint_goes(base, tmp_path, monkeypatch):
    """config.json, tokenizer, generation config and card were never fsynced, nor the parent after the
    swap, yet the old checkpoint was deleted at once: a power loss could leave a zero-length config.json
    and no old checkpoint (review)."""
    out = tmp_path / "out"
    shutil.copytree(base["ckpt"], out)
    events, real_fsync, real_rmtree = [], os.fsync, shutil.rmtree
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    monkeypatch.setattr(shutil, "rmtree", lambda p, *a, **k: (events.append(("rmtree", str(p))),
                                                             real_rmtree(p, *a, **k)))
    AutoAWQ.from_pretrained(str(base["src"])).quantize(None, QC, method="rtn").save_quantized(out, overwrite=True)
    # the replaced checkpoint: under .old after two renames, under the .tmp name after an exchange
    gone = next(i for i, e in enumerate(events) if isinstance(e, tuple) and (".old-" in e[1] or ".tmp-" in e[1]))
    synced = {Path(e).name for e in events[:gone] if isinstance(e, str)}
    assert {p.name for p in out.iterdir()} <= synced  # each file (named as it was in the temporary folder)
    assert str(tmp_path) in events[:gone]  # the parent folder, after the rename


def test_overwrite_of_an_incompatible_run_says_what_it_discards(src, tmp_path, monkeypatch, caplog):
    import logging
    out = tmp_path / "out"
    _interrupt_after_first_block(src, out, monkeypatch)
    with caplog.at_level(logging.WARNING, logger="awqlib"):
        _quantize(src, out, qc={"q_group_size": 32}, overwrite=True)
    assert re.search(r"discard.*1 finished block.*quant config", caplog.text)


def test_command_line_reports_any_os_error_in_one_line(monkeypatch, capsys):
    import errno

    from awqlib import cli

    def fails(args):
        raise OSError(errno.EROFS, "Read-only file system", "/ro/out")
    monkeypatch.setattr(cli, "main", fails)
    assert cli.run(["quantize", "m", "/ro/out"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Read-only file system" in err and "Traceback" not in err


def test_a_filesystem_without_locks_still_saves_and_leaves_unknown_folders_alone(base, tmp_path, monkeypatch):
    """Where flock is not supported (ENOLCK, NFS with read-only descriptors) a save still replaces a
    checkpoint, and a leftover that cannot be told apart from a live run's folder is not touched."""
    import errno
    import fcntl
    out = tmp_path / "out"
    shutil.copytree(base["ckpt"], out)
    (tmp_path / ".out.tmp-0123abcd").mkdir()

    def flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "flock", flock)
    AutoAWQ.from_pretrained(str(base["src"])).quantize(None, QC, method="rtn").save_quantized(out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.tmp-0123abcd", "out"] and validate_checkpoint(out).ok


def test_a_kill_while_the_finished_blocks_are_removed_leaves_nothing_behind(src, tmp_path, monkeypatch):
    """After the checkpoint is in place the blocks are deleted; a kill then left the model-sized
    partial folder for ever, and reruns only said the output exists (review)."""
    from awqlib import resume
    out = tmp_path / "out"
    monkeypatch.setattr(resume, "remove_tree", lambda p, what: (_ for _ in ()).throw(KeyboardInterrupt("killed")))
    with pytest.raises(KeyboardInterrupt):
        _quantize(src, out)
    monkeypatch.undo()
    assert validate_checkpoint(out).ok
    with pytest.raises(FileExistsError, match="already exists"):
        _quantize(src, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]
