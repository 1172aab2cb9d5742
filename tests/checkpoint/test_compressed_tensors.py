"""Interop: compressed-tensors pack-quantized import/export checked against the library itself."""

from __future__ import annotations

import json
import math

import pytest
import torch
from checkpoint_helpers import assert_same_grid, int4_layers, logits, quantized
from safetensors.torch import load_file
from tiny_models import tiny_model

from awq_ao.checkpoint import CheckpointError, load_quantized, save_quantized
from awq_ao.checkpoint.compressed_tensors import pack_int32, unpack_int32
from awq_ao.lowering import Int4WeightTensor

# ------------------------------------------------------------------------------------------------
# compressed-tensors pack-quantized
# ------------------------------------------------------------------------------------------------


def _ct():
    return pytest.importorskip("compressed_tensors")


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_ct_bit_packing_matches_library(bits):
    _ct()
    from compressed_tensors.compressors.pack_quantized.helpers import (
        pack_to_int32,
        unpack_from_int32,
    )

    g = torch.Generator().manual_seed(bits)
    v = torch.randint(0, 2**bits, (5, 37), generator=g)
    signed = (v - 2 ** (bits - 1)).to(torch.int8)
    ours = pack_int32(v, bits)
    assert torch.equal(ours, pack_to_int32(signed, bits))
    assert torch.equal(unpack_int32(ours, bits, 37).long(), unpack_from_int32(ours, bits, torch.Size([5, 37])).long() + 2 ** (bits - 1))
    # zero points are packed along dim 0
    assert torch.equal(pack_int32(v.t().contiguous(), bits).t(), pack_to_int32(signed, bits, packed_dim=0))


def test_ct_bit_packing_round_trip_without_library():
    g = torch.Generator().manual_seed(0)
    for bits in range(2, 9):
        v = torch.randint(0, 2**bits, (3, 41), generator=g)
        p = pack_int32(v, bits)
        assert p.shape == (3, math.ceil(41 * bits / 32))
        assert torch.equal(unpack_int32(p, bits, 41).long(), v)


@pytest.mark.parametrize("bits, gs", [(4, 16), (3, 16), (8, 40)])
def test_ct_export_packs_through_the_package_and_without_it_identically(monkeypatch, bits, gs):
    """Where compressed-tensors is installed the export packs with its pack_to_int32; the
    hand-written packer used without it writes the same bytes."""
    _ct()
    from awq_ao.checkpoint import compressed_tensors as ct
    from awq_ao.checkpoint.formats import QuantLayer

    g = torch.Generator().manual_seed(bits)
    layers = {}
    for i in range(2):
        w = Int4WeightTensor.from_float(torch.randn(48, 80, generator=g), bits, gs)
        layers[f"l{i}"] = QuantLayer(f"l{i}", torch.nn.Linear(80, 48), w, False)
    assert ct.package_packer() is not None
    with_package = ct.pack_quantized_tensors(layers)
    monkeypatch.setattr(ct, "package_packer", lambda: None)
    without = ct.pack_quantized_tensors(layers)
    assert with_package.keys() == without.keys() and any(k.endswith("weight_zero_point") for k in without)
    for k in without:
        assert with_package[k].dtype == without[k].dtype and torch.equal(with_package[k], without[k]), k


@pytest.mark.parametrize("zero_point", [True, False])
def test_ct_export_matches_library_compressor(tmp_path, zero_point):
    _ct()
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    model = quantized("llama", zero_point=zero_point)
    out = save_quantized(model, tmp_path / "ct", format="compressed-tensors", dtype="float32")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate(qc)  # the library accepts our config
    scheme = parsed.config_groups["group_0"]
    assert scheme.weights.symmetric is (not zero_point) and scheme.weights.group_size == 32
    assert parsed.format == "pack-quantized" and parsed.ignore == ["lm_head"]
    t = load_file(str(out / "model.safetensors"))
    for name, w in int4_layers(model).items():
        sd = {"weight": w.dequantize(), "weight_scale": w.scale.float()}  # scales in the save dtype
        if zero_point:
            sd["weight_zero_point"] = (w.zero - 8).to(torch.int8)
        lib = PackedQuantizationCompressor.compress(sd, scheme)
        assert set(lib) == {k.rpartition(".")[2] for k in t if k.startswith(name + ".")}, name
        for key, v in lib.items():
            assert torch.equal(t[f"{name}.{key}"], v), (name, key)
        back = PackedQuantizationCompressor.decompress({k: t[f"{name}.{k}"] for k in lib}, scheme)
        assert_same_grid(w, back["weight"], name)
    loaded = load_quantized(out)
    assert torch.equal(logits(loaded), logits(model))


def test_ct_transformers_loads_our_export(tmp_path):
    _ct()
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    model = quantized("llama")
    out = save_quantized(model, tmp_path / "ct", format="compressed-tensors", dtype="float32")
    hf = AutoModelForCausalLM.from_pretrained(out, quantization_config=CompressedTensorsConfig(run_compressed=False))
    for name, w in int4_layers(model).items():
        assert_same_grid(w, hf.get_submodule(name).weight, name)
    torch.testing.assert_close(logits(hf), logits(model), atol=2e-2, rtol=2e-2)


def test_ct_import_library_written_checkpoint(tmp_path):
    _ct()
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        apply_quantization_config,
        preset_name_to_scheme,
    )
    from compressed_tensors.quantization.utils import calculate_qparams

    fp = tiny_model("llama", seed=4)
    scheme = preset_name_to_scheme("W4A16_ASYM", ["Linear"])
    scheme.weights.group_size = 32
    apply_quantization_config(fp, QuantizationConfig(config_groups={"group_0": scheme}, format="pack-quantized", ignore=["lm_head"]))
    dense = {}
    for name, mod in fp.named_modules():
        if hasattr(mod, "weight_scale"):
            w = mod.weight.data.view(mod.weight.shape[0], -1, 32)
            sc, zp = calculate_qparams(w.amin(-1), w.amax(-1), mod.quantization_scheme.weights)
            mod.weight_scale.data.copy_(sc)
            mod.weight_zero_point.data.copy_(zp)
            dense[name] = mod.weight.detach().clone()
    mc = ModelCompressor.from_pretrained_model(fp, "pack-quantized")
    mc.compress_model(fp)
    d = tmp_path / "ct_lib"
    fp.save_pretrained(d)
    mc.update_config(str(d))

    ours = load_quantized(d)
    t = load_file(str(d / "model.safetensors"))
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor

    layers = int4_layers(ours)
    assert layers.keys() == dense.keys()
    for name, w in layers.items():
        sd = {k: t[f"{name}.{k}"] for k in ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")}
        lib = PackedQuantizationCompressor.decompress(sd, scheme)["weight"]
        assert_same_grid(w, lib, name)


def test_ct_import_refusals(tmp_path):
    out = save_quantized(quantized("llama"), tmp_path / "ct", format="compressed-tensors")
    (out / "awq_ao_manifest.json").unlink()  # as llm-compressor writes it: the reader's own refusals answer
    cfg = json.loads((out / "config.json").read_text())
    for edit, match in [
        (lambda q: q.update(quantization_status="frozen"), "only 'compressed'"),
        (lambda q: q["config_groups"]["group_0"].update(input_activations={"num_bits": 8}), "weight-only"),
        (lambda q: q["config_groups"]["group_0"]["weights"].update(actorder="group"), "act-order"),
        (lambda q: (q.update(format="float-quantized"), q["config_groups"]["group_0"].update(format=None)), "float-quantized"),
    ]:
        c = json.loads(json.dumps(cfg))
        edit(c["quantization_config"])
        (out / "config.json").write_text(json.dumps(c))
        with pytest.raises(CheckpointError, match=match):
            load_quantized(out)
