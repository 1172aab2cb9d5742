"""compressed-tensors ``pack-quantized`` checkpoints (W4A16 and other INT weight-only schemes).

Format (as written by llm-compressor / compressed-tensors, read by vLLM and transformers), for a
linear with ``N`` outputs, ``K`` inputs, ``b`` bits and ``G`` groups:

* ``weight_packed``: ``int32 [N, ceil(K * b / 32)]``; element ``k`` of a row occupies bits
  ``k*b .. k*b+b-1`` of the row's little-endian bit stream (elements may straddle words for
  b = 3, 5, 6, 7). The stored value is the *signed* code plus ``2**(b-1)``, which is exactly
  awq_ao's unsigned code.
* ``weight_scale``: ``[N, G]`` in the model dtype.
* ``weight_zero_point`` (asymmetric only): ``int32 [ceil(N * b / 32), G]``, the signed zero
  points (+ ``2**(b-1)``, i.e. awq_ao's zero) packed the same way along dim 0.
* ``weight_shape``: ``int64 [2]`` = ``[N, K]``.

Dequantization ``(q - zp) * scale`` with signed ``q, zp`` equals awq_ao's ``(code - zero) *
scale``. A symmetric scheme has no zero point (signed 0 = awq_ao zero ``2**(b-1)``).
``quantization_config`` has ``quant_method: compressed-tensors``, ``format: pack-quantized``,
``quantization_status: compressed``, ``config_groups`` (targets + weight args) and ``ignore``.
"""

from __future__ import annotations

import math
import re
import sys
from typing import Any

import torch
from torch import nn

from awq_ao.checkpoint.formats import (
    CheckpointError,
    LayerPlan,
    LoadPlan,
    QuantLayer,
    ShardSet,
    check_layer_geometry,
    uniform_setting,
    zero_is_symmetric,
)

__all__ = ["pack_int32", "unpack_int32", "package_packer", "pack_quantized_tensors", "export_config", "plan_load"]

PACK_QUANTIZED = "pack-quantized"


def pack_int32(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned ``[R, C]`` integers of ``bits`` bits -> dense ``int32 [R, ceil(C*bits/32)]``
    (compressed-tensors' bit order: element ``c`` at stream bits ``c*bits ..``)."""
    r, c = values.shape
    words = math.ceil(c * bits / 32)
    if 8 % bits == 0 and sys.byteorder == "little":
        # whole values per byte: pack bytes (low bits first), then read them as int32 words
        per = 8 // bits
        v8 = values.to(torch.uint8)
        pad = words * 32 // bits - c
        if pad:
            v8 = torch.nn.functional.pad(v8, (0, pad))
        v8 = v8.reshape(r, -1, per)
        byte = v8[..., 0].clone()
        for i in range(1, per):
            byte |= v8[..., i] << (i * bits)
        return byte.contiguous().view(torch.int32)
    v = values.to(torch.int64)
    out = torch.zeros(r, words + 1, dtype=torch.int64)
    pos = torch.arange(c, dtype=torch.int64) * bits
    w, off = pos // 32, pos % 32
    # low part into word w, the bits above 32 (if any) into word w + 1
    out.index_add_(1, w, (v << off) & 0xFFFFFFFF)
    out.index_add_(1, w + 1, v >> (32 - off))
    out = out[:, :words]
    out = torch.where(out >= 2**31, out - 2**32, out)
    return out.to(torch.int32).contiguous()


def unpack_int32(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: ``int32 [R, W]`` -> ``uint8 [R, count]``."""
    if words.dtype != torch.int32:
        raise CheckpointError(f"packed tensors must be int32, got {words.dtype}.")
    r, nw = words.shape
    if bits == 4 and sys.byteorder == "little":
        b = words.contiguous().view(torch.uint8)  # [R, 4W], little-endian bytes
        return torch.stack([b & 15, b >> 4], dim=-1).reshape(r, 8 * nw)[:, :count].contiguous()
    w64 = words.to(torch.int64) & 0xFFFFFFFF
    w64 = torch.cat([w64, w64.new_zeros(r, 1)], dim=1)
    pos = torch.arange(count, dtype=torch.int64) * bits
    w, off = pos // 32, pos % 32
    val = (w64[:, w] >> off) | (w64[:, w + 1] << (32 - off))
    return (val & (2**bits - 1)).to(torch.uint8)


# ------------------------------------------------------------------------------------------------
# export
# ------------------------------------------------------------------------------------------------


def _check_exportable(layers: dict[str, QuantLayer]) -> tuple[int, int, bool]:
    if not layers:
        raise CheckpointError("the model has no quantized layers to export.")
    scaled = [n for n, layer in layers.items() if layer.scaled_input]
    if scaled:
        raise CheckpointError(
            "the compressed-tensors format cannot express ScaledInputLinear layers (AWQ scales "
            f"that could not be folded): {', '.join(scaled)}. Save with format='awq_ao', or "
            "quantize with fallback='skip'."
        )
    bits = uniform_setting(layers, "bits", "compressed-tensors")
    gs = uniform_setting(layers, "group_size", "compressed-tensors")
    bad = [
        f"{n} [{layer.out_features}x{layer.in_features}]"
        for n, layer in layers.items()
        if layer.ragged or (gs != -1 and gs > layer.in_features)
    ]
    if bad:
        raise CheckpointError(
            f"compressed-tensors needs in_features divisible by group_size={gs}; not so for: "
            + ", ".join(bad[:6])
            + (f" (+{len(bad) - 6} more)" if len(bad) > 6 else "")
        )
    symmetric = all(zero_is_symmetric(layer.weight) for layer in layers.values())
    return bits, gs, symmetric


def package_packer() -> Any:
    """compressed-tensors' own ``pack_to_int32`` as ``f(unsigned [R, C], bits, dim)``, or None.

    Used where the package is installed, so the export is packed by the code its readers
    use; :func:`pack_int32` writes the same bytes without it (tested against the package).
    """
    try:
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    except ImportError:
        return None

    def pack(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
        signed = (values.to(torch.int32) - (1 << (bits - 1))).to(torch.int8)
        return pack_to_int32(signed, bits, packed_dim=dim)

    return pack


def _own_packer(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    if dim == 1:
        return pack_int32(values, bits)
    return pack_int32(values.t().contiguous(), bits).t().contiguous()


def pack_quantized_tensors(layers: dict[str, QuantLayer]) -> dict[str, torch.Tensor]:
    """``weight_packed`` / ``weight_scale`` / ``weight_zero_point`` / ``weight_shape`` per layer.

    Packed by the ``compressed-tensors`` package where it is installed (:func:`package_packer`),
    else by :func:`pack_int32`; the bytes are the same.
    """
    bits, _, symmetric = _check_exportable(layers)
    pack = package_packer() or _own_packer
    out: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        w = layer.weight
        n, k = w.shape
        out[f"{name}.weight_packed"] = pack(w.codes().cpu(), bits, 1).contiguous()
        out[f"{name}.weight_scale"] = w.scale.detach().cpu().contiguous()
        if not symmetric:
            z = w.zero.detach().cpu().round().to(torch.int64)
            out[f"{name}.weight_zero_point"] = pack(z, bits, 0).contiguous()
        out[f"{name}.weight_shape"] = torch.tensor([n, k], dtype=torch.int64)
    return out


def export_config(layers: dict[str, QuantLayer], float_linears: list[str]) -> dict[str, Any]:
    """The ``quantization_config`` entry of ``config.json``."""
    bits, gs, symmetric = _check_exportable(layers)
    weights = {
        "num_bits": bits,
        "type": "int",
        "symmetric": symmetric,
        "group_size": None if gs == -1 else gs,
        "strategy": "channel" if gs == -1 else "group",
        "dynamic": False,
        "actorder": None,
        "block_structure": None,
        "observer": "minmax",
        "observer_kwargs": {},
    }
    return {
        "quant_method": "compressed-tensors",
        "format": PACK_QUANTIZED,
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weights,
                "input_activations": None,
                "output_activations": None,
                "format": PACK_QUANTIZED,
            }
        },
        "ignore": list(float_linears),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }


# ------------------------------------------------------------------------------------------------
# import
# ------------------------------------------------------------------------------------------------


def _target_matches(target: str, name: str, mod: nn.Module) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name or target == type(mod).__name__ or (
        target == "Linear" and type(mod).__name__ in ("Linear", "Conv1D")
    )


def _scheme_for(name: str, mod: nn.Module, groups: dict[str, Any], ignore: list[str]) -> dict | None:
    for ig in ignore:
        if _target_matches(ig, name, mod):
            return None
    if len(groups) == 1:
        return next(iter(groups.values()))
    for g in groups.values():
        if any(_target_matches(t, name, mod) for t in g.get("targets", [])):
            return g
    return None


def _check_scheme(gname: str, g: dict[str, Any], global_format: str | None) -> None:
    if not isinstance(g, dict):
        raise CheckpointError(f"config group {gname!r} uses a preset name; not supported.")
    fmt = g.get("format") or global_format
    if fmt != PACK_QUANTIZED:
        raise CheckpointError(
            f"compressed-tensors format {fmt!r} (group {gname!r}) is not supported; only "
            f"{PACK_QUANTIZED!r} (INT weight-only) can be imported."
        )
    if g.get("input_activations") or g.get("output_activations"):
        raise CheckpointError(
            f"config group {gname!r} quantizes activations; only weight-only schemes (W4A16) "
            "are supported."
        )
    w = g.get("weights") or {}
    if w.get("type", "int") != "int":
        raise CheckpointError(f"config group {gname!r}: weight type {w.get('type')!r}; only int.")
    if not 2 <= int(w.get("num_bits", 0)) <= 8:
        raise CheckpointError(f"config group {gname!r}: num_bits={w.get('num_bits')} unsupported.")
    if w.get("strategy") not in ("group", "channel"):
        raise CheckpointError(
            f"config group {gname!r}: strategy {w.get('strategy')!r} unsupported (group or channel)."
        )
    if w.get("actorder") not in (None, False, "none"):
        raise CheckpointError(
            f"config group {gname!r} uses act-order ({w.get('actorder')!r}); not supported."
        )
    if w.get("dynamic"):
        raise CheckpointError(f"config group {gname!r}: dynamic weight quantization unsupported.")


def plan_load(qc: dict[str, Any], shards: ShardSet, model: nn.Module) -> LoadPlan:
    """Check a compressed-tensors ``quantization_config`` and tensors; plan the quantized layers."""
    status = qc.get("quantization_status", "compressed")
    if status != "compressed":
        raise CheckpointError(
            f"compressed-tensors quantization_status {status!r}: only 'compressed' checkpoints "
            "(packed weights) can be imported."
        )
    groups = qc.get("config_groups") or {}
    if not groups:
        raise CheckpointError("compressed-tensors config has no config_groups.")
    for gname, g in groups.items():
        _check_scheme(gname, g, qc.get("format"))
    if any(k.endswith(".weight_g_idx") for k in shards.keys()):
        raise CheckpointError("this checkpoint uses act-order (weight_g_idx); not supported.")
    ignore = list(qc.get("ignore") or [])
    plan = LoadPlan(strict_dtypes=False)
    for key in shards.keys():
        if not key.endswith(".weight_packed"):
            continue
        name = key[: -len(".weight_packed")]
        try:
            mod = model.get_submodule(name)
        except AttributeError as e:
            raise CheckpointError(f"unknown tensor {key!r}: the model has no module {name!r}.") from e
        scheme = _scheme_for(name, mod, groups, ignore)
        if scheme is None:
            raise CheckpointError(f"{name} has packed weights but no config group targets it.")
        w = scheme["weights"]
        bits = int(w["num_bits"])
        gs = -1 if w["strategy"] == "channel" else int(w["group_size"])
        symmetric = bool(w.get("symmetric", True))
        if isinstance(mod, nn.Linear):
            n, k = mod.out_features, mod.in_features
        elif type(mod).__name__ == "Conv1D":
            k, n = (int(s) for s in mod.weight.shape)
        else:
            raise CheckpointError(f"{name}: packed weights for a {type(mod).__name__}, not a linear.")
        g = 1 if gs == -1 else math.ceil(k / gs)
        if gs != -1 and k % gs:
            raise CheckpointError(f"{name}: in_features={k} is not divisible by group_size={gs}.")
        shards.expect(key, (n, math.ceil(k * bits / 32)), (torch.int32,))
        shards.expect(f"{name}.weight_scale", (n, g), (torch.float16, torch.bfloat16, torch.float32))
        shards.expect(f"{name}.weight_shape", (2,), (torch.int64, torch.int32))
        shape = [int(s) for s in shards.get(f"{name}.weight_shape")]
        if shape != [n, k]:
            raise CheckpointError(
                f"{name}: weight_shape {shape} does not match the model's [{n}, {k}] layer."
            )
        zkey = f"{name}.weight_zero_point"
        if not symmetric:
            shards.expect(zkey, (math.ceil(n * bits / 32), g), (torch.int32,))
        check_layer_geometry(name, n, k, bits, gs, (n, g))

        def read(name: str = name, bits: int = bits, n: int = n, k: int = k, sym: bool = symmetric) -> tuple:
            scale = shards.get(f"{name}.weight_scale")
            codes = unpack_int32(shards.get(f"{name}.weight_packed"), bits, k)
            if sym:
                zero = torch.full_like(scale, float(2 ** (bits - 1)))
            else:
                zp = shards.get(f"{name}.weight_zero_point")
                zero = unpack_int32(zp.t().contiguous(), bits, n).t().to(scale.dtype).contiguous()
            return codes, scale, zero

        plan.layers[name] = LayerPlan(name, bits, gs, n, k, read)
        plan.consumed |= {key, f"{name}.weight_scale", f"{name}.weight_shape"}
        if not symmetric:
            plan.consumed.add(zkey)
    if not plan.layers:
        raise CheckpointError("the compressed-tensors checkpoint holds no '.weight_packed' tensors.")
    return plan
