"""Interop: AutoAWQ GEMM import/export checked against an independent, loop-based reference of
AutoAWQ's packing (and a GPT-2 Conv1D model exported to both vLLM formats)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from checkpoint_helpers import assert_same_grid, int4_layers, logits, quantized
from safetensors.torch import load_file, save_file
from tiny_models import tiny_model, token_batches
from torch import nn

import awq_ao
from awq_ao.checkpoint import CheckpointError, load_quantized, save_quantized
from awq_ao.checkpoint.autoawq import pack_gemm, unpack_gemm
from awq_ao.lowering import Int4WeightTensor, quantize_linear_module

# ------------------------------------------------------------------------------------------------
# independent reference for AutoAWQ GEMM (written from the format description, element by element)
# WQLinear_GEMM.from_linear packs, for each output column block j and i in 0..7:
#     qweight[:, j] |= intweight[:, j*8 + order_map[i]] << (i * 4),  order_map = [0,2,4,6,1,3,5,7]
# where intweight is the [in_features, out_features] (transposed) integer weight; qzeros likewise
# from the [n_groups, out_features] zeros; scales are [n_groups, out_features] fp16.
# ------------------------------------------------------------------------------------------------

ORDER_MAP = [0, 2, 4, 6, 1, 3, 5, 7]


def ref_pack(intmat: list[list[int]]) -> torch.Tensor:
    rows, cols = len(intmat), len(intmat[0])
    out = []
    for r in range(rows):
        words = []
        for j in range(cols // 8):
            word = 0
            for i in range(8):
                word |= intmat[r][j * 8 + ORDER_MAP[i]] << (i * 4)
            words.append(word - (1 << 32) if word >= (1 << 31) else word)
        out.append(words)
    return torch.tensor(out, dtype=torch.int32)


def ref_unpack(packed: torch.Tensor) -> list[list[int]]:
    rows, nw = packed.shape
    vals = packed.tolist()
    out = [[0] * (nw * 8) for _ in range(rows)]
    for r in range(rows):
        for j in range(nw):
            word = vals[r][j] & 0xFFFFFFFF
            for i in range(8):
                out[r][j * 8 + ORDER_MAP[i]] = (word >> (4 * i)) & 0xF
    return out


def ref_dequant(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """Float32 ``[N, K]`` weight: w[n][k] = (q[k][n] - z[k // gs][n]) * s[k // gs][n]."""
    q, z, s = ref_unpack(qweight), ref_unpack(qzeros), scales.float().tolist()
    k_dim, n_dim = len(q), len(q[0])
    w = [[(q[k][n] - z[k // group_size][n]) * s[k // group_size][n] for k in range(k_dim)] for n in range(n_dim)]
    return torch.tensor(w, dtype=torch.float32)


def test_reference_agrees_with_itself():
    g = torch.Generator().manual_seed(0)
    m = torch.randint(0, 16, (3, 16), generator=g).tolist()
    assert ref_unpack(ref_pack(m)) == m


def test_unpack_matches_reference_on_random_words():
    g = torch.Generator().manual_seed(1)
    k, n, gs = 64, 48, 16
    qweight = torch.randint(-(2**31), 2**31 - 1, (k, n // 8), generator=g, dtype=torch.int64).to(torch.int32)
    qzeros = torch.randint(-(2**31), 2**31 - 1, (k // gs, n // 8), generator=g, dtype=torch.int64).to(torch.int32)
    scales = (torch.rand(k // gs, n, generator=g) * 0.1 + 0.01).half()
    codes, zero, scale = unpack_gemm(qweight, qzeros, scales)
    assert codes.tolist() == [list(r) for r in zip(*ref_unpack(qweight), strict=True)]
    assert zero.t().long().tolist() == ref_unpack(qzeros)
    w = Int4WeightTensor.from_codes(codes, scale, zero.float(), 4, gs, torch.float32)  # fp16 kept
    assert torch.equal(w.dequantize(), ref_dequant(qweight, qzeros, scales, gs))
    # and packing back gives the same words
    qw2, qz2, sc2 = pack_gemm(codes, zero, scale)
    assert torch.equal(qw2, qweight) and torch.equal(qz2, qzeros) and torch.equal(sc2, scales)


# ------------------------------------------------------------------------------------------------
# export
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("zero_point", [True, False])
def test_export_matches_reference(tmp_path, zero_point):
    model = quantized("llama", zero_point=zero_point)
    out = save_quantized(model, tmp_path / "awq", format="autoawq")
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc == {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": 32,
                  "zero_point": True, "modules_to_not_convert": None}
    assert json.loads((out / "quant_config.json").read_text())["w_bit"] == 4
    t = load_file(str(out / "model.safetensors"))
    for name, w in int4_layers(model).items():
        qweight, qzeros, scales = t[f"{name}.qweight"], t[f"{name}.qzeros"], t[f"{name}.scales"]
        n, k = w.shape
        assert qweight.dtype == torch.int32 and tuple(qweight.shape) == (k, n // 8)
        assert tuple(qzeros.shape) == (k // 32, n // 8) and scales.dtype == torch.float16
        codes_kn = w.codes().t().tolist()
        assert torch.equal(qweight, ref_pack(codes_kn)), name
        zeros_gn = w.zero.t().long().tolist()
        assert torch.equal(qzeros, ref_pack(zeros_gn)), name
        if not zero_point:
            assert set(sum(zeros_gn, [])) == {8}
        assert torch.equal(scales, w.scale.t().half())
        assert torch.equal(ref_dequant(qweight, qzeros, scales, 32), (w.codes().float() - w.zero.repeat_interleave(32, 1)) * w.scale.half().float().repeat_interleave(32, 1))
        assert f"{name}.weight" not in t
    # and awq_ao reads it back: same codes and zeros, fp16-rounded scales
    loaded = load_quantized(out)
    for name, w in int4_layers(loaded).items():
        ref = int4_layers(model)[name]
        assert torch.equal(w.codes(), ref.codes()) and torch.equal(w.zero, ref.zero)
        assert torch.equal(w.scale.float(), ref.scale.half().float())
    # exports default to float16 (vLLM-bound): the loaded model is a float16 model
    assert loaded.model.norm.weight.dtype == torch.float16
    torch.testing.assert_close(logits(loaded).float(), logits(model), atol=2e-2, rtol=2e-2)


def test_export_refusals(tmp_path):
    with pytest.raises(CheckpointError, match=r"ScaledInputLinear.*transformer\.h\.0\.mlp\.c_proj, transformer\.h\.1\.mlp\.c_proj"):
        save_quantized(quantized("gpt2"), tmp_path / "a", format="autoawq")
    with pytest.raises(CheckpointError, match=r"ScaledInputLinear.*transformer\.h\.0\.mlp\.c_proj"):
        save_quantized(quantized("gpt2"), tmp_path / "a", format="compressed-tensors")
    m = tiny_model("llama")
    for mod in m.model.layers.modules():
        if isinstance(mod, nn.Linear):
            quantize_linear_module(mod, bits=4, group_size=48)  # ragged: 64 = 48 + 16
    with pytest.raises(CheckpointError, match=r"divisible by group_size=48.*q_proj"):
        save_quantized(m, tmp_path / "b", format="autoawq")
    with pytest.raises(CheckpointError, match=r"divisible by group_size=48"):
        save_quantized(m, tmp_path / "b", format="compressed-tensors")
    m3 = tiny_model("llama")
    for mod in m3.model.layers.modules():
        if isinstance(mod, nn.Linear):
            quantize_linear_module(mod, bits=3, group_size=32)
    with pytest.raises(CheckpointError, match="4-bit weights only; this model has bits=3"):
        save_quantized(m3, tmp_path / "c", format="autoawq")
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------------
# import of a checkpoint written without awq_ao (reference packer only)
# ------------------------------------------------------------------------------------------------


def _write_autoawq_checkpoint(d: Path, fp_model: nn.Module, gs: int = 32, not_convert: list[str] | None = None,
                              seed: int = 0, **qc_extra) -> dict[str, torch.Tensor]:
    """An AutoAWQ-GEMM-style checkpoint (fp16) built with the reference packer; returns the
    reference dequantized weight of every packed layer."""
    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    ref: dict[str, torch.Tensor] = {}
    for name, t in fp_model.state_dict().items():
        mod_name = name.rpartition(".")[0]
        mod = fp_model.get_submodule(mod_name)
        packable = (isinstance(mod, nn.Linear) and name.endswith(".weight") and ".layers." in name
                    and not any(s in mod_name for s in (not_convert or [])))
        if not packable:
            tensors[name] = t.half()
            continue
        n, k = t.shape
        q = torch.randint(0, 16, (k, n), generator=g).tolist()
        z = torch.randint(0, 16, (k // gs, n), generator=g).tolist()
        s = (torch.rand(k // gs, n, generator=g) * 0.02 + 0.005).half()
        tensors[f"{mod_name}.qweight"] = ref_pack(q)
        tensors[f"{mod_name}.qzeros"] = ref_pack(z)
        tensors[f"{mod_name}.scales"] = s
        ref[mod_name] = ref_dequant(tensors[f"{mod_name}.qweight"], tensors[f"{mod_name}.qzeros"], s, gs)
    d.mkdir()
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    cfg = fp_model.config.to_dict()
    cfg["torch_dtype"] = "float16"
    cfg.pop("dtype", None)
    cfg["architectures"] = [type(fp_model).__name__]
    cfg["quantization_config"] = {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": gs,
                                  "zero_point": True, "modules_to_not_convert": not_convert, **qc_extra}
    (d / "config.json").write_text(json.dumps(cfg))
    return ref


def test_import_matches_reference(tmp_path):
    fp = tiny_model("qwen2")  # q/k/v biases too
    d = tmp_path / "awq"
    ref = _write_autoawq_checkpoint(d, fp)
    m16 = load_quantized(d)  # the checkpoint's own dtype
    assert m16.model.norm.weight.dtype == torch.float16
    m = load_quantized(d, dtype=torch.float32)
    layers = int4_layers(m)
    assert layers.keys() == ref.keys() and len(ref) == 14
    for name, w in layers.items():
        assert isinstance(w, Int4WeightTensor) and w.bits == 4 and w.group_size == 32
        assert_same_grid(w, ref[name], name)
        assert_same_grid(int4_layers(m16)[name], ref[name], name)
    # same logits as a float model holding the reference-dequantized weights
    fp32 = tiny_model("qwen2")
    sd = {k: v.half().float() for k, v in fp.state_dict().items()}
    sd.update({f"{n}.weight": w for n, w in ref.items()})
    fp32.load_state_dict(sd)
    # 24 tokens: the CPU decode path (tinygemm in bfloat16) on bf16 scale/offset pairs
    err = (logits(m) - logits(fp32)).abs().max() / logits(fp32).abs().max()
    assert err < 2e-2, err
    # runs through awq_ao's op under torch.compile
    lin = m.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(lin, fullgraph=True)(x), lin(x))


def test_import_modules_to_not_convert(tmp_path):
    fp = tiny_model("llama")
    ref = _write_autoawq_checkpoint(tmp_path / "awq", fp, not_convert=["mlp.down_proj"])
    m = load_quantized(tmp_path / "awq")
    assert not any("down_proj" in n for n in ref)
    down = m.model.layers[1].mlp.down_proj
    assert type(down.weight) is nn.Parameter and not isinstance(down.weight, Int4WeightTensor)
    assert torch.equal(down.weight, fp.model.layers[1].mlp.down_proj.weight.half())
    assert isinstance(m.model.layers[1].mlp.up_proj.weight, Int4WeightTensor)


@pytest.mark.parametrize(
    "edit, match",
    [
        (dict(version="gemv"), "only GEMM packing"),
        (dict(bits=3), "bits=3; only 4-bit"),
        (dict(desc_act=True), "act-order"),
        (dict(modules_to_not_convert=["q_proj"]), "matches modules_to_not_convert"),
        (dict(quant_method="awq", group_size=64), r"scales. has shape \[\d, 64\].*expects \[\d, 64\]"),
    ],
)
def test_import_refusals(tmp_path, edit, match):
    d = tmp_path / "awq"
    _write_autoawq_checkpoint(d, tiny_model("llama"))
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"].update(edit)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=match):
        load_quantized(d)


def test_import_refuses_g_idx(tmp_path):
    d = tmp_path / "awq"
    _write_autoawq_checkpoint(d, tiny_model("llama"))
    t = load_file(str(d / "model.safetensors"))
    t["model.layers.0.self_attn.q_proj.g_idx"] = torch.arange(64, dtype=torch.int32)
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="act-order"):
        load_quantized(d)


def test_conv1d_model_exports_without_input_scales(tmp_path):
    """GPT-2 (Conv1D layers) quantized with fallback='skip' has no ScaledInputLinear and can be
    exported to both formats; awq_ao reads them back (Conv1D -> Linear)."""
    model = tiny_model("gpt2")
    awq_ao.quantize(model, token_batches(2), group_size=32, fallback="skip", verbose=False, progress=False)
    for fmt in ("autoawq", "compressed-tensors"):
        loaded = load_quantized(save_quantized(model, tmp_path / fmt, format=fmt))
        assert isinstance(loaded.transformer.h[0].attn.c_attn.weight, Int4WeightTensor)
        # both formats default to float16 for the unquantized tensors (vLLM-bound)
        torch.testing.assert_close(logits(loaded).float(), logits(model), atol=2e-2, rtol=2e-2)
        exact = load_quantized(save_quantized(model, tmp_path / f"{fmt}32", format=fmt, dtype="float32"))
        tol = 2e-3 if fmt == "autoawq" else 0.0  # autoawq stores fp16 scales and biases
        torch.testing.assert_close(logits(exact), logits(model), atol=tol, rtol=tol)
