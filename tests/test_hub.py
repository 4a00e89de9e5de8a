"""awqlib.hub: the model card save_quantized writes, the staged files, push_to_hub (Hub API mocked)."""

from __future__ import annotations

import os
from fnmatch import fnmatch
from pathlib import Path

import pytest

from awqlib import AutoAWQ
from awqlib.hub import REPO_PLACEHOLDER, looks_like_hub_id, push_to_hub, staged_files
from conftest import make_source, tiny_model, tiny_tokenizer

BASE = "HuggingFaceTB/SmolLM2-135M"
PPL = {"fp": 12.3456, "awq": 12.9012, "dataset": "wikitext-2-raw-v1", "windows": 8}


@pytest.fixture(scope="module")
def qmodel():
    m = AutoAWQ.from_model(tiny_model("llama")).quantize(None, {"q_group_size": 64}, method="rtn")
    m.name_or_path = BASE
    return m


@pytest.fixture(scope="module")
def saved(qmodel, tmp_path_factory) -> Path:
    return qmodel.save_quantized(tmp_path_factory.mktemp("hub") / "tiny-awq", perplexity=PPL)


def _front_matter(text: str) -> str:
    assert text.startswith("---\n")
    return text[4:text.index("\n---\n", 4)]


def test_card_front_matter(saved):
    text = (saved / "README.md").read_text()
    fm = _front_matter(text)
    yaml = pytest.importorskip("yaml")
    meta = yaml.safe_load(fm)
    assert meta["base_model"] == BASE and meta["base_model_relation"] == "quantized"
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert set(meta["tags"]) >= {"awq", "4-bit", "awqlib"}


def test_card_body(saved):
    text = (saved / "README.md").read_text()
    for row in ("| quant_method | `awq` |", "| bits | `4` |", "| group_size | `64` |", "| zero_point | `True` |",
                "| version | `gemm` |"):
        assert row in text
    assert "quantization time" in text
    # perplexity as measured
    assert "wikitext-2-raw-v1 (8 windows)" in text and "| original (fp) | 12.346 |" in text
    assert "| AWQ 4-bit | 12.901 |" in text
    # TP degrees from compat.validate_checkpoint (hidden 128 with g64: 1 and 2)
    assert "**loadable**" in text and "Valid `--tensor-parallel-size`: **1, 2**" in text
    # loading instructions for each hand-off
    assert f'AutoAWQ.from_quantized("{REPO_PLACEHOLDER}"' in text
    assert f"vllm serve {REPO_PLACEHOLDER}   " in text and f"vllm serve {REPO_PLACEHOLDER} --dtype float16" in text
    assert "Marlin" in text and "--quantization awq" not in text  # current vLLM needs no --quantization
    assert "--tensor-parallel-size 2" in text and "--tp-size 2" in text and "sglang.launch_server" in text
    assert "AutoModelForCausalLM.from_pretrained" in text and "gptqmodel" in text


def test_card_without_hub_id_or_perplexity(tmp_path):
    m = AutoAWQ.from_model(tiny_model("llama")).quantize(None, {"q_group_size": 64}, method="rtn")
    m.name_or_path = str(tmp_path)  # a local folder is not a base_model
    out = m.save_quantized(tmp_path / "out")
    text = (out / "README.md").read_text()
    assert "base_model" not in _front_matter(text)
    assert "Measured quality" not in text and "library_name: transformers" in text


def test_looks_like_hub_id(tmp_path):
    assert looks_like_hub_id("meta-llama/Llama-3.2-1B") and looks_like_hub_id("Qwen/Qwen2.5-0.5B")
    for bad in (None, "", "llama", "/abs/path", "./rel/x", "a/b/c", "../x"):
        assert not looks_like_hub_id(bad)
    os.makedirs(tmp_path / "org" / "name")
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        assert not looks_like_hub_id("org/name")  # an existing local folder
    finally:
        os.chdir(cwd)


def test_staged_files_exact(saved, tmp_path):
    assert staged_files(saved) == ["README.md", "config.json", "generation_config.json", "model.safetensors"]
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    (d / ".cache" / "huggingface").mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "sub/extra.txt", ".hidden", ".cache/huggingface/x.lock",
                 "model.safetensors.tmp", "notes.txt~", ".x.tmp-1234", "y.incomplete"):
        (d / name).write_text("x")
    (d / "__pycache__").mkdir()
    (d / "__pycache__" / "m.pyc").write_text("x")
    assert staged_files(d) == ["config.json", "model.safetensors", "sub/extra.txt"]


class _FakeApi:
    calls: list = []

    def __init__(self, token=None, **kw):
        self.token = token

    def create_repo(self, repo_id, private=None, exist_ok=False, repo_type=None, **kw):
        _FakeApi.calls.append(("create_repo", dict(repo_id=repo_id, private=private, exist_ok=exist_ok,
                                                  repo_type=repo_type, token=self.token)))
        return f"https://huggingface.co/{repo_id}"

    def list_repo_files(self, repo_id, revision=None, repo_type=None, **kw):
        return []  # a new repo

    def create_commit(self, repo_id, operations, *, commit_message=None, repo_type=None, **kw):
        from huggingface_hub import CommitOperationAdd
        adds = [op for op in operations if isinstance(op, CommitOperationAdd)]
        assert len(adds) == len(operations), "a push to a new repo deletes nothing"
        first = Path(adds[0].path_or_fileobj)
        folder = Path(*first.parts[:len(first.parts) - len(Path(adds[0].path_in_repo).parts)])
        assert all(Path(op.path_or_fileobj) == folder / op.path_in_repo for op in adds)
        _FakeApi.calls.append(("create_commit", dict(
            repo_id=repo_id, folder=folder, repo_type=repo_type, commit_message=commit_message,
            allow_patterns=[op.path_in_repo for op in adds], contents=staged_files(folder) if not any(
                p.is_symlink() for p in folder.iterdir()) else None,
            all_files=sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()),
            readme=(folder / "README.md").read_text(), kw=kw)))

        class Info(str):
            commit_url = f"https://huggingface.co/{repo_id}/commit/abc123"
        return Info(f"https://huggingface.co/{repo_id}/commit/abc123")


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub
    _FakeApi.calls = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", _FakeApi.create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", _FakeApi.create_commit)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", _FakeApi.list_repo_files)
    monkeypatch.setattr(huggingface_hub.HfApi, "__init__", _FakeApi.__init__)
    return _FakeApi.calls


def test_push_to_hub_temp_dir(qmodel, fake_hub):
    url = qmodel.push_to_hub("me/tiny-awq", private=True, token="hf_x", commit_message="first")
    assert url == "https://huggingface.co/me/tiny-awq/commit/abc123"
    (c1, a1), (c2, a2) = fake_hub
    assert c1 == "create_repo" and a1 == dict(repo_id="me/tiny-awq", private=True, exist_ok=True,
                                              repo_type="model", token="hf_x")
    assert c2 == "create_commit" and a2["repo_id"] == "me/tiny-awq" and a2["repo_type"] == "model"
    assert a2["commit_message"] == "first"
    expected = ["README.md", "config.json", "generation_config.json", "model.safetensors"]
    assert a2["contents"] == a2["allow_patterns"] == a2["all_files"] == expected
    # the card was re-rendered with the repo id
    assert "vllm serve me/tiny-awq --dtype float16" in a2["readme"] and REPO_PLACEHOLDER not in a2["readme"]
    assert not a2["folder"].exists()  # the temporary folder is removed after the upload


def test_push_to_hub_local_dir_and_shards(qmodel, fake_hub, tmp_path):
    local = tmp_path / "keep"
    qmodel.push_to_hub("org/sharded", local_dir=str(local), max_shard_size=200_000, revision="main")
    (_, a1), (_, a2) = fake_hub
    assert a1["private"] is None
    assert a2["folder"] == local and local.is_dir()  # kept
    files = a2["allow_patterns"]
    assert files == staged_files(local) == a2["all_files"]
    shards = [f for f in files if f.startswith("model-") and f.endswith(".safetensors")]
    assert len(shards) > 1 and "model.safetensors.index.json" in files
    assert a2["kw"] == {"revision": "main"}
    with pytest.raises(FileExistsError):  # an existing local_dir needs overwrite=True
        qmodel.push_to_hub("org/sharded", local_dir=str(local))
    qmodel.push_to_hub("org/sharded", local_dir=str(local), overwrite=True)


def test_push_to_hub_needs_quantized_model(fake_hub):
    m = AutoAWQ.from_model(tiny_model("llama"))
    with pytest.raises(RuntimeError, match="quantize"):
        push_to_hub(m, "me/x")
    assert fake_hub == []


def test_push_to_hub_lazily_saved_model(qmodel, saved, fake_hub, tmp_path, monkeypatch):
    """A lazily loaded model was written by quantize(save_dir=...): the checkpoint files of that folder
    are uploaded with a card for the repo; the folder itself is not changed (review: the user's README
    was rewritten in place, notes added since were uploaded, save arguments silently ignored)."""
    import shutil
    folder = tmp_path / "lazy-out"
    shutil.copytree(saved, folder)
    (folder / "README.md").write_text("my own edits")
    (folder / "private_eval_notes.txt").write_text("not for the Hub")
    monkeypatch.setattr(qmodel, "reader", object(), raising=False)
    monkeypatch.setattr(qmodel, "saved_to", folder, raising=False)
    for bad in ({"local_dir": str(tmp_path / "l")}, {"max_shard_size": "1MB"}, {"overwrite": True},
                {"tokenizer": object()}):
        with pytest.raises(ValueError, match=f"{next(iter(bad))}.*quantize\\(save_dir=...\\)"):
            qmodel.push_to_hub("me/lazy", **bad)
    assert fake_hub == [] and not (tmp_path / "l").exists()
    qmodel.push_to_hub("me/lazy")
    (_, _), (_, a2) = fake_hub
    assert a2["allow_patterns"] == staged_files(saved) and "private_eval_notes.txt" not in a2["all_files"]
    assert "vllm serve me/lazy" in a2["readme"]
    assert (folder / "README.md").read_text() == "my own edits"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lazy-out"] and not a2["folder"].exists()


SOURCE_CARD = """---
license: llama3.2
base_model: meta-llama/Parent-Of-Source
---
# A source model
"""


@pytest.fixture(scope="module")
def local_source(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("local") / "my-llama"
    src.mkdir()
    make_source(src, {"rope_theta": 500000.0, "rope_scaling": None})
    (src / "README.md").write_text(SOURCE_CARD)
    return src


CALIB = ["w1 w2 w3 w4 w5 w6 w7 w8 " * 4] * 8  # 32 tokens each


def test_card_of_local_source(local_source, tmp_path):
    """No absolute path anywhere in the card; the license comes from the source's card, not its
    base_model (that is the source's own parent); calibration settings and awqlib version are recorded."""
    from awqlib import __version__
    m = AutoAWQ.from_pretrained(str(local_source))
    m.quantize(tiny_tokenizer(), {"q_group_size": 64}, calib_data=CALIB, n_samples=2, seqlen=32,
               n_grid=2, clip_grid=2)
    out = m.save_quantized(tmp_path / "out")
    text = (out / "README.md").read_text()
    for path in (str(local_source), str(tmp_path), str(Path.home())):
        assert path not in text
    assert "/tmp/" not in text and "`my-llama`" in text
    meta = pytest.importorskip("yaml").safe_load(_front_matter(text))
    assert meta["license"] == "llama3.2" and "base_model" not in meta
    assert f"custom text, {sum(map(len, CALIB[:8]))} chars" in text
    assert "| calibration samples | 2 requested, 2 sequences of 32 tokens |" in text
    assert "| method | AWQ" in text and f"| awqlib version | {__version__} |" in text
    # explicit metadata wins
    out2 = m.save_quantized(tmp_path / "out2", base_model="org/my-llama", license="apache-2.0")
    meta2 = pytest.importorskip("yaml").safe_load(_front_matter((out2 / "README.md").read_text()))
    assert meta2["base_model"] == "org/my-llama" and meta2["license"] == "apache-2.0"


def test_card_calibration_file_by_name(tmp_path):
    from awqlib.calib import describe
    f = tmp_path / "secret-dir" / "calib.txt"
    assert describe(str(f)) == describe(f) == "text file calib.txt"
    assert describe("pileval") == "mit-han-lab/pile-val-backup (validation split)"
    assert describe(["ab", "cde"]) == "custom text, 5 chars"


def test_card_of_hub_snapshot_source(local_source, tmp_path):
    import shutil
    snap = tmp_path / "hub" / "models--org--my-llama" / "snapshots" / "0123abc"
    shutil.copytree(local_source, snap)
    m = AutoAWQ.from_pretrained(str(snap)).quantize(None, {"q_group_size": 64}, method="rtn")
    text = (m.save_quantized(tmp_path / "out") / "README.md").read_text()
    assert 'base_model: "org/my-llama"' in text and str(tmp_path) not in text


def test_requantized_checkpoint_keeps_its_base_model(saved, tmp_path):
    """A checkpoint loaded with from_quantized (say from the Hub id me/tiny-awq) and saved again: its
    base_model stays the fp model of its card, never the quantized checkpoint itself."""
    import shutil
    loaded = AutoAWQ.from_quantized(str(saved))
    loaded.name_or_path = "me/tiny-awq"
    text = (loaded.save_quantized(tmp_path / "again") / "README.md").read_text()
    assert f'base_model: "{BASE}"' in text and "me/tiny-awq" not in _front_matter(text)
    bare = tmp_path / "bare"
    shutil.copytree(saved, bare)
    (bare / "README.md").unlink()
    loaded = AutoAWQ.from_quantized(str(bare))
    loaded.name_or_path = "me/tiny-awq"
    assert "base_model" not in _front_matter((loaded.save_quantized(tmp_path / "again2") / "README.md").read_text())


class _FakeRepo:
    """A Hub repo in memory: create_commit adds and deletes files in one commit (upload_folder: adds
    and deletes by pattern)."""

    def __init__(self, monkeypatch, tmp_path, files: dict[str, str], fail_upload: bool = False):
        import huggingface_hub
        self.files, self.commits, self.fail_upload, self.dl = dict(files), [], fail_upload, tmp_path / "dl"
        repo = self
        monkeypatch.setattr(huggingface_hub.HfApi, "__init__", lambda self, token=None, **kw: None)
        monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, *a, **kw: None)
        monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, *a, **kw: sorted(repo.files))
        monkeypatch.setattr(huggingface_hub.HfApi, "hf_hub_download", lambda self, r, name, **kw: repo.download(name))
        monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda self, **kw: repo.upload(**kw))
        monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", lambda self, r, ops, **kw: repo.commit(ops, **kw))

    def download(self, name):
        self.dl.mkdir(exist_ok=True)
        (self.dl / "f").write_text(self.files[name])
        return str(self.dl / "f")

    def upload(self, *, folder_path, allow_patterns, delete_patterns=None, **kw):
        if self.fail_upload:
            raise OSError("connection reset")
        self.files = {n: v for n, v in self.files.items() if not any(fnmatch(n, p) for p in delete_patterns or [])}
        self.files.update({n: (Path(folder_path) / n).read_text(errors="replace") for n in allow_patterns})
        self.commits.append(("upload_folder", sorted(allow_patterns), sorted(delete_patterns or [])))
        return "url"

    def commit(self, ops, **kw):
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete
        if self.fail_upload:
            raise OSError("connection reset")
        adds = {op.path_in_repo: Path(op.path_or_fileobj).read_text(errors="replace")
                for op in ops if isinstance(op, CommitOperationAdd)}
        deletes = sorted(op.path_in_repo for op in ops if isinstance(op, CommitOperationDelete))
        assert len(adds) + len(deletes) == len(ops)
        from huggingface_hub import CommitInfo
        assert set(kw) <= {"commit_message", "repo_type", "revision", "create_pr", "commit_description",
                           "parent_commit", "num_threads"}, kw  # create_commit's own keyword arguments
        if kw.get("create_pr"):  # a pull request: the repo's main branch is unchanged
            self.commits.append(("pr", sorted(adds), deletes))
            return CommitInfo(commit_url="https://huggingface.co/me/r/commit/c1", commit_message="m",
                              commit_description="", oid="c1", pr_url="https://huggingface.co/me/r/discussions/7")
        for n in deletes:
            del self.files[n]
        self.files.update(adds)
        self.commits.append(("commit", sorted(adds), deletes))
        return CommitInfo(commit_url="https://huggingface.co/me/r/commit/c0", commit_message="m",
                          commit_description="", oid="c0")


NOT_OURS = {"requirements.txt": "x", "eval_results.json": "{}", "training_args.json": "{}", "LICENSE": "mit",
            "original/params.json": "{}", "original/consolidated.safetensors": "w",
            "adapter/adapter_model.safetensors": "w", "images/plot.png": "p", ".gitattributes": "lfs"}


def test_push_to_hub_removes_only_stale_files_of_an_earlier_push(qmodel, monkeypatch, tmp_path):
    """A second push with fewer shards leaves no shard of the first one in the repo, in the same commit
    as the upload (the repo never holds the new model.safetensors beside the old index, which readers
    resolve differently); files awqlib never writes (at the top level or in a subfolder, or a
    model-fp16.safetensors beside the shards, or names only shaped like a shard's, such as
    model-00001-of-00001.safetensors) are kept (review: upload_folder's delete_patterns matched
    *.json, *.txt, *.safetensors at any depth; then a pattern looser than shard_names)."""
    lookalikes = {"model-fp16.safetensors": "w", "model-00001-of-00001.safetensors": "w",
                  "model-00003-of-00002.safetensors": "w"}
    repo = _FakeRepo(monkeypatch, tmp_path, dict(NOT_OURS, **lookalikes))
    qmodel.push_to_hub("me/stale", max_shard_size=200_000)
    first = sorted(repo.files)
    assert any(n.startswith("model-0000") for n in first) and "model.safetensors.index.json" in first
    assert [c[0] for c in repo.commits] == ["commit"] and repo.commits[0][2] == []  # a non-AWQ repo: no deletion
    qmodel.push_to_hub("me/stale")
    assert [c[0] for c in repo.commits] == ["commit", "commit"]
    assert repo.commits[1][2] == sorted(n for n in first if n.startswith("model-0000") and n not in lookalikes) + [
        "model.safetensors.index.json"]
    assert sorted(repo.files) == sorted(["README.md", "config.json", "generation_config.json", "model.safetensors",
                                         *lookalikes, *NOT_OURS])


def test_a_pull_request_carries_its_deletions(qmodel, monkeypatch, tmp_path):
    repo = _FakeRepo(monkeypatch, tmp_path, {})
    qmodel.push_to_hub("me/pr", max_shard_size=200_000)
    shards = sorted(n for n in repo.files if n.startswith("model-0000")) + ["model.safetensors.index.json"]
    assert qmodel.push_to_hub("me/pr", create_pr=True) == "https://huggingface.co/me/r/discussions/7"
    assert repo.commits[1][0] == "pr" and repo.commits[1][2] == shards


def test_push_to_hub_arguments_are_checked(qmodel, monkeypatch, tmp_path):
    repo = _FakeRepo(monkeypatch, tmp_path, {})
    for bad in ("path_in_repo", "ignore_patterns", "allow_patterns"):
        with pytest.raises(TypeError, match=rf"unknown argument\(s\) \['{bad}'\].*'commit_description'"):
            qmodel.push_to_hub("me/x", **{bad: "x"})
    assert repo.commits == []
    qmodel.push_to_hub("me/x", commit_description="why", parent_commit=None, num_threads=2)


def test_an_upload_without_a_tokenizer_keeps_the_repos(qmodel, monkeypatch, tmp_path, saved):
    awq_repo = {n: (saved / n).read_text(errors="replace") for n in staged_files(saved)}
    awq_repo.update({"tokenizer.json": "{}", "tokenizer_config.json": "{}", "special_tokens_map.json": "{}"})
    repo = _FakeRepo(monkeypatch, tmp_path, awq_repo)
    qmodel.push_to_hub("me/tok")  # qmodel has no tokenizer
    assert repo.commits[0][2] == [] and {"tokenizer.json", "tokenizer_config.json"} <= set(repo.files)


def test_push_into_a_repo_that_is_not_an_awq_checkpoint_deletes_nothing(qmodel, monkeypatch, tmp_path):
    """A push by mistake into the fp16 model's repo: its extra shards stay (its config is not AWQ)."""
    fp16 = {"config.json": '{"model_type": "llama"}', "model-00001-of-00002.safetensors": "w",
            "model-00002-of-00002.safetensors": "w", "model.safetensors.index.json": "{}", "tokenizer.json": "{}"}
    repo = _FakeRepo(monkeypatch, tmp_path, fp16)
    qmodel.push_to_hub("me/fp16")
    assert repo.commits[0][2] == [] and set(fp16) <= set(repo.files)


def test_a_failed_upload_deletes_nothing(qmodel, monkeypatch, tmp_path, saved):
    awq_repo = {n: (saved / n).read_text(errors="replace") for n in staged_files(saved)}
    awq_repo["model-00001-of-00009.safetensors"] = "old shard"
    repo = _FakeRepo(monkeypatch, tmp_path, awq_repo, fail_upload=True)
    with pytest.raises(OSError, match="connection reset"):
        qmodel.push_to_hub("me/awq")
    assert repo.files == awq_repo and repo.commits == []
    repo.fail_upload = False
    qmodel.push_to_hub("me/awq", delete_patterns=None)  # keep them: nothing deleted
    assert "model-00001-of-00009.safetensors" in repo.files and len(repo.commits) == 1 and repo.commits[0][2] == []
    qmodel.push_to_hub("me/awq", delete_patterns=["model-0*.safetensors"])  # the user's own patterns
    assert repo.commits[1] == ("upload_folder", repo.commits[0][1], ["model-0*.safetensors"])
    assert "model-00001-of-00009.safetensors" not in repo.files


def test_card_perplexity_keys_are_checked(qmodel, tmp_path):
    with pytest.raises(ValueError, match="unknown keys"):
        qmodel.save_quantized(tmp_path / "x", perplexity={"awq": 12.9, "ppl_fp": 12.3})
    assert not (tmp_path / "x").exists()


def test_shard_names_are_recognised_exactly():
    """What a push deletes as an earlier push's weights: only names safetensors_io.shard_names
    gives (one rule; hub.py had restated it as a looser pattern that also took
    model-00003-of-00002 or model-00001-of-00001)."""
    from awqlib.safetensors_io import is_shard_name, shard_names
    assert all(is_shard_name(n) for k in (1, 2, 7) for n in shard_names(k))
    for other in ("model-00003-of-00002.safetensors", "model-00001-of-00001.safetensors",
                  "model-00000-of-00002.safetensors", "model-fp16.safetensors", "model-1-of-2.safetensors",
                  "adapter_model.safetensors"):
        assert not is_shard_name(other), other
