"""What a checkpoint holds: the save dtype of unquantized tensors, bits per weight on disk."""

from __future__ import annotations

import json

import pytest
import torch
from checkpoint_helpers import logits, quantized
from safetensors import safe_open

from awq_ao.checkpoint import checkpoint_summary, load_quantized, save_quantized
from awq_ao.cli import main as cli_main


def _dtypes(d) -> dict[str, torch.dtype]:
    out = {}
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        for k in f.keys():
            out[k] = f.get_slice(k).get_dtype()
    return out


def test_awq_ao_save_dtype_bfloat16(tmp_path):
    model = quantized("llama")
    d = save_quantized(model, tmp_path / "bf16", dtype="bfloat16")
    dts = _dtypes(d)
    assert dts["model.norm.weight"] == "BF16" and dts["model.embed_tokens.weight"] == "BF16"
    assert json.loads((d / "config.json").read_text())["dtype"] == "bfloat16"
    assert model.model.norm.weight.dtype == torch.float32  # the model in memory is unchanged
    back = load_quantized(d)
    assert back.model.norm.weight.dtype == torch.bfloat16
    a, b = logits(model), logits(back).float()
    assert ((a - b).abs().max() / a.abs().max()).item() < 3e-2


def test_vllm_formats_default_to_float16(tmp_path):
    pytest.importorskip("compressed_tensors")
    model = quantized("llama")
    ct = save_quantized(model, tmp_path / "ct", format="compressed-tensors")
    dts = _dtypes(ct)
    assert dts["model.norm.weight"] == "F16"
    assert dts["model.layers.0.self_attn.q_proj.weight_scale"] == "F16"
    assert json.loads((ct / "config.json").read_text())["dtype"] == "float16"
    ct32 = save_quantized(model, tmp_path / "ct32", format="compressed-tensors", dtype=torch.float32)
    assert _dtypes(ct32)["model.norm.weight"] == "F32"
    same = save_quantized(model, tmp_path / "ao", format="awq_ao")  # awq_ao: as in memory
    assert _dtypes(same)["model.norm.weight"] == "F32"


@pytest.mark.parametrize("bad", ["int8", "fp8", torch.int8])
def test_bad_save_dtype_fails_before_writing(tmp_path, bad):
    with pytest.raises(ValueError, match="dtype"):
        save_quantized(quantized("llama"), tmp_path / "x", dtype=bad)
    assert not (tmp_path / "x").exists()


def test_bits_per_weight_on_disk_and_in_info(tmp_path, capsys):
    model = quantized("llama", group_size=32)
    d = save_quantized(model, tmp_path / "q")
    s = checkpoint_summary(d)
    assert s["quantized_weights"] > 0
    assert 4.0 < s["bits_per_weight"] <= 4 + 32 / 32 + 1e-6
    assert s["full_precision_bytes"] > 0
    assert cli_main(["info", str(d)]) == 0
    assert "bits per quantized weight" in capsys.readouterr().out


def test_report_prints_footprint():
    from awq_ao.state import get_state

    model = quantized("llama", group_size=32)
    text = get_state(model).report.summary()
    assert "bits per quantized weight" in text and "kept in full precision" in text
