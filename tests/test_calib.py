"""calib_data in every documented spelling gives the AutoAWQ-style token stream."""

import pytest
import torch

from awqlib.calib import bundled_text_path, get_calib_tokens, read_text_file


class CharTok:
    """A stand-in tokenizer: one id per character (enough to test the plumbing)."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 256 for c in text]}


def test_list_of_strings_concatenates_and_cuts():
    toks = get_calib_tokens(["a" * 50, "b" * 50, "c" * 50], CharTok(), n_samples=2, seqlen=32)
    assert toks.shape == (3, 32)  # 2 texts -> 100 tokens -> 3 sequences of 32
    assert toks.dtype == torch.long


def test_token_tensors():
    ids = [torch.arange(40), torch.arange(40)]
    assert get_calib_tokens(ids, None, 8, 16).shape == (5, 16)
    assert get_calib_tokens(torch.zeros(4, 16, dtype=torch.long), None, 8, 16).shape == (4, 16)


def test_text_file(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("first paragraph here\r\n\r\nsecond one\n\nthird")
    assert read_text_file(p) == ["first paragraph here", "second one", "third"]
    assert get_calib_tokens(str(p), CharTok(), 10, 8).shape[0] == 4


def test_bundled_text_is_shipped():
    paras = read_text_file(bundled_text_path())
    assert len(paras) > 1000


def test_hf_dataset():
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": ["x" * 40, "y" * 40], "other": [1, 2]})
    assert get_calib_tokens(ds, CharTok(), 2, 16).shape == (5, 16)
    with pytest.raises(ValueError, match="no column 'body'"):
        get_calib_tokens(ds, CharTok(), 2, 16, text_column="body")


def test_bad_type():
    with pytest.raises(TypeError, match="calib_data must be"):
        get_calib_tokens(42, None, 2, 16)
