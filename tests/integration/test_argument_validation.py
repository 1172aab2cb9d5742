"""Issue 15, item 7: bad arguments are refused at the boundary (awq_config fields, CLI numbers
and sizes, save_quantized's max_shard_size, a model on the meta device) with a message that
names the argument and what it accepts (item 6, checkpoint load validation, is in
checkpoint/test_load_validation.py)."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
from checkpoint_helpers import int4_layers, quantized, tied_llama
from tiny_models import tiny_model, token_batches

import awq_ao
from awq_ao import awq_config
from awq_ao.checkpoint import save_quantized
from awq_ao.cli import main

# ------------------------------------------------------------------------------------------------
# item 7: arguments checked at the boundary
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "match"),
    [({"bits": 4.0}, r"bits=4\.0 \(float\).*an integer in 2, 3, 4"),
     ({"group_size": 32.5}, r"group_size=32\.5 \(float\).*integer >= 1, or -1"),
     ({"bits": "4"}, r"bits='4' \(str\)"),
     ({"bits": True}, r"bits=True \(bool\)"),
     ({"group_size": 0}, r"group_size=0"),
     ({"zero_point": 1}, r"zero_point=1 \(int\).*True or False"),
     ({"n_grid": 2.0}, r"n_grid=2\.0.*integer >= 1"),
     ({"max_search_samples": 0}, r"max_search_samples=0"),
     ({"clip_tokens": "all"}, r"clip_tokens='all'.*or None"),
     ({"sequential": 1}, r"sequential=1 \(int\).*'auto'"),
     ({"duo_scaling": 1}, r"duo_scaling=1"),
     ({"max_shrink": float("nan")}, r"max_shrink=nan"),
     ({"gptq_damp": "0.1"}, r"gptq_damp='0\.1'.*> 0"),
     ({"skip": 3}, r"skip=3.*pattern"),
     ({"include": [1]}, r"include=\[1\]"),
     ({"device": "gpu"}, r"device='gpu'"),
     ({"seed": 1.5}, r"seed=1\.5"),
     ({"rounding": "gtpq"}, r"rounding='gtpq'.*'nearest' or 'gptq'")],
)
def test_awq_config_fields_are_checked(kw, match):
    with pytest.raises(ValueError, match=rf"awq_config: {match}"):
        awq_config(**kw)
    with pytest.raises(ValueError, match=rf"awq_config: {match}"):
        awq_ao.quantize(tiny_model("llama", layers=1), token_batches(1), **kw)


def test_awq_config_keeps_good_values():
    c = awq_config(skip="lm_head", include=["model.layers.*"], device="cpu", max_shrink=0)
    assert c.skip == ("lm_head",) and c.include == ("model.layers.*",) and c.device == "cpu"


def _quantize_args(tmp_path: Path, *extra: str) -> list[str]:
    return ["quantize", str(tmp_path / "no-model"), "--out", str(tmp_path / "out"), *extra]


@pytest.mark.parametrize(
    ("extra", "match"),
    [(["--max-shard-size", "lots"], r"argument --max-shard-size: 'lots' is not a size"),
     (["--max-shard-size", "0GB"], r"argument --max-shard-size: '0GB' is not a size"),
     (["--n-samples", "-1"], r"argument --n-samples: -1 is out of range; accepted: an integer >= 1"),
     (["--batch-size", "0"], r"argument --batch-size: 0 is out of range"),
     (["--search-samples", "x"], r"argument --search-samples: 'x' is not an integer"),
     (["--seq-len", "0"], r"argument --seq-len: 0 is out of range"),
     (["--bits", "4.0"], r"argument --bits: '4\.0': accepted: an integer in 2, 3, 4"),
     (["--group-size", "0"], r"argument --group-size: 0 is out of range; accepted: an integer >= 1, or -1"),
     (["--dtype", "float64"], r"argument --dtype: invalid choice")],
)
def test_cli_quantize_numbers_refused_when_parsing(tmp_path, capsys, extra, match):
    with pytest.raises(SystemExit) as e:
        main(_quantize_args(tmp_path, *extra))
    assert e.value.code == 2
    assert re.search(match, capsys.readouterr().err)


@pytest.mark.parametrize(
    ("extra", "match"),
    [(["--windows", "0"], r"argument --windows: 0 is out of range"),
     (["--seq-len", "1"], r"argument --seq-len: 1 is out of range; accepted: an integer >= 2"),
     (["--dtype", "int8"], r"argument --dtype: invalid choice")],
)
def test_cli_eval_numbers_refused_when_parsing(tmp_path, capsys, extra, match):
    with pytest.raises(SystemExit) as e:
        main(["eval", str(tmp_path), "--text", str(tmp_path / "t.txt"), *extra])
    assert e.value.code == 2
    assert re.search(match, capsys.readouterr().err)


@pytest.mark.parametrize(
    ("extra", "match"),
    [(["--format", "autoawq", "--fallback", "multiply"], "--fallback multiply adds input scales"),
     (["--sequential", "--in-memory"], "exclude each other"),
     (["--calib", "/no/such/calib.txt"], "calibration data /no/such/calib.txt does not exist"),
     (["--device", "tpu:x"], "is not a device")],
)
def test_cli_combinations_refused_before_loading(tmp_path, capsys, monkeypatch, extra, match):
    import awq_ao.cli.commands as cli

    def never(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(cli, "load_source_model", never)
    assert main(_quantize_args(tmp_path, *extra)) == 1
    assert match in capsys.readouterr().err


def test_max_shard_size_checked_by_save_quantized_too(tmp_path):
    for bad in ("lots", 0, -1, True, "nanGB"):
        with pytest.raises(ValueError, match=r"max_shard_size=.*accepted: a positive number of bytes"):
            save_quantized(quantized("llama"), tmp_path / "x", max_shard_size=bad)
    assert not (tmp_path / "x").exists()


def test_meta_device_error_gives_advice_that_works(tmp_path):
    real = tied_llama()
    real.save_pretrained(tmp_path / "src")
    with torch.device("meta"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            empty = type(real)(real.config)
    for mode in (True, False):  # no mode quantizes weights without values: the message says so
        with pytest.raises(ValueError, match=r"meta device.*in every mode.*from_pretrained\(path\) without device_map") as e:
            awq_ao.quantize(empty, token_batches(1), sequential=mode, verbose=False, progress=False)
        assert "or use the layer-by-layer mode" not in str(e.value)
    # what it suggests: load the real weights with from_pretrained, no device_map
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "src").eval()
    awq_ao.quantize(model, token_batches(2), group_size=32, verbose=False, progress=False)
    assert len(int4_layers(model)) == 14


@pytest.mark.gpu
def test_meta_device_advice_model_on_cpu_blocks_on_gpu():
    """The other half of the advice: a model kept on the CPU, quantized with device='cuda'."""
    model = tied_llama()
    awq_ao.quantize(model, token_batches(2), group_size=32, device="cuda", verbose=False, progress=False)
    assert len(int4_layers(model)) == 14
