"""The awq-ao command line, end to end on a tiny model saved with save_pretrained."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkpoint_helpers import SAMPLE_TEXT, char_tokenizer, quantized

from awq_ao.checkpoint import load_quantized, save_quantized
from awq_ao.cli import CLIError, load_calibration_text, main
from awq_ao.evaluation import perplexity


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _ppl(d: Path, text: str, seq_len: int, windows: int) -> float:
    from transformers import AutoTokenizer

    model = load_quantized(d)
    ids = AutoTokenizer.from_pretrained(str(d))(text, return_tensors="pt").input_ids[0]
    return perplexity(model, ids, seq_len=seq_len, max_windows=windows)[0]


@pytest.mark.parametrize("argv", [["--help"], ["quantize", "--help"], ["eval", "--help"], ["info", "--help"],
                                  ["generate", "--help"], ["convert", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as ei:
        main(argv)
    assert ei.value.code == 0
    assert "usage: awq-ao" in capsys.readouterr().out


def test_quantize_info_eval(model_dir, text_file, tmp_path, capsys):
    q = tmp_path / "q"
    common = ["--calib", text_file, "--n-samples", 4, "--seq-len", 32, "--batch-size", 2, "--no-progress"]
    rc, out, err = run(["quantize", model_dir, "--out", q, "--group-size", 32, *common], capsys)
    assert rc == 0, err
    assert "saved awq_ao checkpoint to" in out and "INT4 g32 asym" in out
    assert (q / "tokenizer.json").is_file() and (q / "model.safetensors").is_file()

    rc, out, _ = run(["info", q, "--layers"], capsys)
    assert rc == 0
    assert "format:         awq_ao (version 3)" in out
    assert "bits:           4" in out and "group size:     32" in out
    assert "quantized:      14 layers" in out and "size on disk:" in out
    assert "model.layers.1.mlp.down_proj" in out
    rc, out, _ = run(["info", q, "--json"], capsys)
    assert json.loads(out)["num_quantized_layers"] == 14

    rc, out, err = run(["eval", q, "--text", text_file, "--seq-len", 64, "--windows", 3, "--no-progress"], capsys)
    assert rc == 0, err
    lines = out.strip().splitlines()
    assert lines[-2].startswith("windows: 3 x 64 tokens")
    assert lines[-1] == f"perplexity: {_ppl(q, SAMPLE_TEXT, 64, 3):.4f}"

    # an existing output directory needs --overwrite; a one-line error, exit status 1
    rc, out, err = run(["quantize", model_dir, "--out", q, "--group-size", 32, *common], capsys)
    assert rc == 1
    assert err.strip().splitlines()[-1].startswith("awq-ao: error: ") and "already exists" in err
    assert "Traceback" not in err


def test_quantize_sequential_with_spill(model_dir, text_file, tmp_path, capsys):
    q, spill = tmp_path / "q", tmp_path / "spill"
    common = ["--calib", text_file, "--n-samples", 4, "--seq-len", 32, "--batch-size", 2, "--no-progress"]
    rc, out, err = run(["quantize", model_dir, "--out", q, "--group-size", 32, "--sequential", "--spill-dir", spill,
                        "--search-samples", 2, "--screen-rows", 1, "--rounding", "gptq", *common], capsys)
    assert rc == 0, err
    assert "rollback originals kept on disk instead of in memory" in out
    assert "error-feedback rounded 14" in out
    assert list(spill.iterdir()) == []  # the private folder is gone
    assert load_quantized(q) is not None


def test_quantize_with_an_8bit_head_info_and_eval(model_dir, text_file, tmp_path, capsys):
    q = tmp_path / "q8"
    rc, out, err = run(["quantize", model_dir, "--out", q, "--group-size", 32, "--head", "int8", "--calib", text_file,
                        "--n-samples", 4, "--seq-len", 32, "--batch-size", 2, "--no-progress"], capsys)
    assert rc == 0, err
    assert "8-bit row-wise" in out
    rc, out, err = run(["info", q], capsys)
    assert rc == 0 and "8-bit head:" in out, err
    rc, out, err = run(["eval", q, "--text", text_file, "--seq-len", 64, "--windows", 2, "--no-progress"], capsys)
    assert rc == 0, err
    assert out.strip().splitlines()[-1] == f"perplexity: {_ppl(q, SAMPLE_TEXT, 64, 2):.4f}"


def test_quantize_compressed_tensors_symmetric_and_eval_all_formats(model_dir, text_file, tmp_path, capsys):
    ct = tmp_path / "ct"
    rc, out, err = run(["quantize", model_dir, "--out", ct, "--group-size", 32, "--no-zero-point",
                        "--format", "compressed-tensors", "--calib", text_file, "--n-samples", 4,
                        "--seq-len", 32, "--no-progress", "--quiet"], capsys)
    assert rc == 0, err
    cfg = json.loads((ct / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors" and cfg["config_groups"]["group_0"]["weights"]["symmetric"]
    rc, out, _ = run(["info", ct], capsys)
    assert "format:         compressed-tensors" in out and "symmetric" in out
    # autoawq: export an in-memory model, then evaluate every format through the CLI
    awq = save_quantized(quantized("tied_llama"), tmp_path / "awq", tokenizer=char_tokenizer(), format="autoawq")
    for d in (ct, awq):
        rc, out, err = run(["eval", d, "--text", text_file, "--seq-len", 64, "--windows", 2, "--no-progress"], capsys)
        assert rc == 0, err
        assert out.strip().splitlines()[-1] == f"perplexity: {_ppl(d, SAMPLE_TEXT, 64, 2):.4f}"


def test_errors_are_one_line(model_dir, text_file, tmp_path, capsys):
    cases = [
        (["info", tmp_path / "missing"], "no such directory"),
        (["info", model_dir], "no quantization_config"),
        (["eval", model_dir, "--text", tmp_path / "none.txt"], "does not exist"),
        (["quantize", "someone/not-a-cached-model", "--out", tmp_path / "o", "--calib", text_file], "pass --allow-download"),
        (["quantize", model_dir, "--out", tmp_path / "o", "--bits", 3, "--format", "autoawq", "--calib", text_file], "4-bit weights only"),
        (["quantize", model_dir, "--out", tmp_path / "o", "--calib", text_file, "--n-samples", 500], "500 x 512 = 256000 are needed"),
        (["quantize", model_dir, "--out", tmp_path / "o", "--group-size", 48, "--format", "autoawq", "--calib", text_file], "divisible by --group-size 48"),
        (["quantize", model_dir, "--out", tmp_path / "o", "--calib", text_file, "--spill-dir", tmp_path, "--in-memory"], "drop --in-memory"),
        (["quantize", model_dir, "--out", tmp_path / "o", "--calib", text_file, "--head", "int8", "--format", "autoawq"], "--head int8"),
    ]
    for argv, msg in cases:
        rc, out, err = run(argv, capsys)
        assert rc == 1, argv
        lines = err.strip().splitlines()
        assert lines[-1].startswith("awq-ao: error: ") and msg in lines[-1], (argv, err)
        assert "Traceback" not in err
    assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit) as ei:  # argparse errors: status 2
        main(["quantize", str(model_dir)])
    assert ei.value.code == 2


def test_debug_shows_traceback(tmp_path):
    with pytest.raises(Exception, match="no such directory"):
        main(["info", str(tmp_path / "missing"), "--debug"])


def test_console_entry_point_subprocess(tmp_path):
    r = subprocess.run([sys.executable, "-m", "awq_ao.cli", "info", str(tmp_path / "missing")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith("awq-ao: error: ")
    assert "Traceback" not in r.stderr


def test_calibration_sources(tmp_path):
    import datasets

    rows = ["first row of text", "", "second row", "third"]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": r, "id": i}) for i, r in enumerate(rows)))
    assert load_calibration_text(str(tmp_path / "a.jsonl")) == "first row of text\n\nsecond row\n\nthird"
    with pytest.raises(CLIError, match="no column 'content'"):
        load_calibration_text(str(tmp_path / "a.jsonl"), text_field="content")
    folder = tmp_path / "txt"
    folder.mkdir()
    (folder / "1.txt").write_text("alpha\nbeta\n")
    (folder / "2.txt").write_text("gamma\n")
    assert load_calibration_text(str(folder)) == "alpha\nbeta\n\n\ngamma\n"  # one row per text file
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": ["x y", "z"]}).save_to_disk(str(saved))
    assert load_calibration_text(str(saved)) == "x y\n\nz"
    (tmp_path / "plain.txt").write_text("just text\n")
    assert load_calibration_text(str(tmp_path / "plain.txt")) == "just text\n"
    with pytest.raises(CLIError, match="does not exist"):
        load_calibration_text(str(tmp_path / "nope.txt"))


def test_generate_from_cli_checkpoint(tmp_path):
    """The transformers path documented in the README: load_quantized -> generate()."""
    d = save_quantized(quantized("tied_llama"), tmp_path / "q", tokenizer=char_tokenizer())
    from transformers import AutoTokenizer

    model = load_quantized(d)
    tok = AutoTokenizer.from_pretrained(str(d))
    ids = tok("The quick", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert out.shape == (1, ids.shape[1] + 8)
    assert isinstance(tok.decode(out[0]), str)


def test_quantize_search_loss_and_act_order_flags_reach_the_config(model_dir, text_file, tmp_path, capsys, monkeypatch):
    import awq_ao

    seen: list[dict] = []
    real = awq_ao.quantize

    def spy(*a, **kw):
        seen.append(kw)
        return real(*a, **kw)

    monkeypatch.setattr(awq_ao, "quantize", spy)
    common = ["--calib", text_file, "--n-samples", 2, "--seq-len", 32, "--batch-size", 2, "--no-progress", "--quiet"]
    rc, _, err = run(["quantize", model_dir, "--out", tmp_path / "a", "--group-size", 32, "--search-loss", "linear",
                      "--search-rounding", "nearest", "--no-act-order", "--channel-stats", "sample", "--refine-steps", 3,
                      *common], capsys)
    assert rc == 0, err
    rc, _, err = run(["quantize", model_dir, "--out", tmp_path / "b", "--group-size", 32, *common], capsys)
    assert rc == 0, err
    assert seen[0]["search_loss"] == "linear" and seen[0]["gptq_act_order"] is False
    assert seen[0]["search_rounding"] == "nearest" and seen[0]["channel_stats"] == "sample"
    assert seen[0]["block_refine_steps"] == 3
    assert not {"search_loss", "gptq_act_order", "search_rounding", "channel_stats", "block_refine_steps"} & set(seen[1])
