"""The command line on a tiny model folder."""

import json

from awqlib.cli import main
from conftest import assert_same_checkpoint, tiny_model


def test_quantize_and_eval(tmp_path, capsys):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    model = tiny_model("llama")
    src = tmp_path / "fp"
    model.save_pretrained(src)
    vocab = {chr(97 + i): i for i in range(26)} | {"[UNK]": 26}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]").save_pretrained(src)
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join("the quick brown fox jumps over the lazy dog " * 3 for _ in range(40)))
    out = tmp_path / "q"
    assert main(["quantize", str(src), str(out), "--group-size", "64", "--calib", str(text), "--seqlen", "64",
                 "--n-samples", "40"]) == 0
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "awq"
    card = (out / "README.md").read_text()
    assert "text file text.txt (40 paragraphs)" in card and str(tmp_path) not in card  # not "custom text, N chars"
    # --lazy (one block at a time from the safetensors files) writes the same checkpoint
    assert main(["quantize", str(src), str(tmp_path / "lazy"), "--group-size", "64", "--calib", str(text),
                 "--seqlen", "64", "--n-samples", "40", "--lazy"]) == 0
    assert_same_checkpoint(out, tmp_path / "lazy")
    capsys.readouterr()
    assert main(["eval", str(out), "--text", str(text), "--seqlen", "64", "--windows", "2"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["perplexity"] > 1
    assert main(["eval", str(out), "--text", str(text), "--seqlen", "64", "--windows", "2",
                 "--device-map", "auto"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["perplexity"] == res["perplexity"]
    # a folder that is not quantized is evaluated as the fp model (from_quantized raises NotQuantizedCheckpoint)
    assert main(["eval", str(src), "--text", str(text), "--seqlen", "64", "--windows", "2"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["perplexity"] > 1



def test_command_reports_user_errors_in_one_line(tmp_path, capsys):
    """The console command (awqlib.cli:run) turns a user's mistake into one line and exit code 2;
    main() keeps raising for programmatic callers, and -v keeps the traceback."""
    import pytest

    from awqlib.cli import run
    missing = tmp_path / "nope"
    argv = ["eval", str(missing), "--text", __file__, "--seqlen", "8", "--windows", "1"]
    assert run(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("awqlib: error:") and str(missing) in err[0]
    with pytest.raises(FileNotFoundError):
        main(argv)
    with pytest.raises(FileNotFoundError):
        run(["-v", *argv])
