"""AutoAWQ GEMM checkpoints: import into awq_ao, export from awq_ao.

Format (AutoAWQ ``WQLinear_GEMM``, ``version: gemm``), for a linear with ``K`` inputs, ``N``
outputs, group size ``gs`` and ``G = K / gs`` groups:

* ``qweight``: ``int32 [K, N / 8]``. Word ``(k, j)`` holds the 4-bit codes of columns
  ``8j .. 8j+7`` of row ``k`` of the *transposed* weight, in AWQ's interleaved order: nibble
  ``i`` (bits ``4i .. 4i+3``) holds column ``8j + ORDER[i]`` with ``ORDER = [0, 2, 4, 6, 1, 3,
  5, 7]``.
* ``qzeros``: ``int32 [G, N / 8]``, the integer zero points packed the same way.
* ``scales``: ``float16 [G, N]``.
* ``bias`` (optional): ``float16 [N]``.

Dequantization is ``w[n, k] = (q[k, n] - z[k // gs, n]) * s[k // gs, n]``, i.e. awq_ao's own
``(code - zero) * scale`` convention, transposed. ``config.json`` carries
``quantization_config = {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": gs,
"zero_point": true, "modules_to_not_convert": [...]}`` (AutoAWQ's own ``quant_config.json``
spells ``w_bit`` / ``q_group_size``; both are read).

AutoAWQ only stores asymmetric 4-bit weights with whole groups; awq_ao's symmetric models are
exported with ``zero = 8``, which is the same arithmetic.
"""

from __future__ import annotations

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
)

__all__ = [
    "AWQ_ORDER",
    "AWQ_REVERSE_ORDER",
    "pack_gemm",
    "unpack_gemm",
    "gemm_tensors",
    "export_config",
    "plan_load",
]

#: nibble ``i`` of a packed word holds column ``8j + AWQ_ORDER[i]``.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
#: column ``8j + c`` lives in nibble ``AWQ_REVERSE_ORDER[c]`` (inverse permutation).
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)

_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


def _pack_rows(v: torch.Tensor) -> torch.Tensor:
    """``[R, C]`` integers in 0..15 (C % 8 == 0) -> ``int32 [R, C / 8]`` in AWQ order."""
    r, c = v.shape
    if c % 8:
        raise CheckpointError(f"AutoAWQ packing needs a multiple of 8 columns, got {c}.")
    if sys.byteorder == "little":
        # nibble i of a word = byte i // 2 (low nibble first) on little-endian machines
        x = v.to(torch.uint8).reshape(r, c // 8, 8)[..., list(AWQ_ORDER)]
        return (x[..., 0::2] | (x[..., 1::2] << 4)).contiguous().view(torch.int32).reshape(r, c // 8)
    x = v.to(torch.int64).reshape(r, c // 8, 8)[..., list(AWQ_ORDER)]
    words = (x << _SHIFTS.to(torch.int64)).sum(-1)  # < 2**32, exact in int64
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def _unpack_rows(words: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_pack_rows`: ``int32 [R, W]`` -> ``uint8 [R, 8W]``."""
    r, w = words.shape
    if sys.byteorder == "little":
        b = words.contiguous().view(torch.uint8).reshape(r, w, 4)
        nib = torch.stack([b & 15, b >> 4], dim=-1).reshape(r, w, 8)  # nibble order
    else:
        nib = ((words.to(torch.int32).unsqueeze(-1) >> _SHIFTS.to(words.device)) & 15).to(torch.uint8)
    return nib[..., list(AWQ_REVERSE_ORDER)].reshape(r, 8 * w).contiguous()


def pack_gemm(
    codes: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """awq_ao ``codes [N, K]``, ``zero [N, G]``, ``scale [N, G]`` -> AutoAWQ
    ``(qweight int32 [K, N/8], qzeros int32 [G, N/8], scales float16 [G, N])``."""
    if int(codes.max()) > 15 or int(zero.max()) > 15 or int(zero.min()) < 0:
        raise CheckpointError("AutoAWQ stores 4-bit codes and zero points only.")
    qweight = _pack_rows(codes.t().contiguous())
    qzeros = _pack_rows(zero.round().to(torch.int64).t().contiguous())
    scales = scale.t().contiguous().to(torch.float16)
    return qweight, qzeros, scales


def unpack_gemm(
    qweight: torch.Tensor, qzeros: torch.Tensor | None, scales: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AutoAWQ GEMM tensors -> awq_ao ``(codes uint8 [N, K], zero [N, G], scale [N, G])``.

    ``qzeros=None`` (a symmetric checkpoint without zeros) gives ``zero = 8``. ``zero`` and
    ``scale`` keep the dtype of ``scales``.
    """
    if qweight.dtype != torch.int32:
        raise CheckpointError(f"qweight must be int32, got {qweight.dtype}.")
    codes = _unpack_rows(qweight).t().contiguous()
    g, n = scales.shape
    if qzeros is None:
        zero = torch.full((n, g), 8.0, dtype=scales.dtype)
    else:
        zero = _unpack_rows(qzeros).t().to(scales.dtype).contiguous()
    return codes, zero, scales.t().contiguous()


# ------------------------------------------------------------------------------------------------
# export
# ------------------------------------------------------------------------------------------------


def _check_exportable(layers: dict[str, QuantLayer]) -> tuple[int, int]:
    if not layers:
        raise CheckpointError("the model has no quantized layers to export.")
    scaled = [n for n, layer in layers.items() if layer.scaled_input]
    if scaled:
        raise CheckpointError(
            "the autoawq format cannot express ScaledInputLinear layers (AWQ scales that could "
            f"not be folded): {', '.join(scaled)}. Save with format='awq_ao', or quantize with "
            "fallback='skip'."
        )
    bits = uniform_setting(layers, "bits", "autoawq")
    if bits != 4:
        raise CheckpointError(f"the autoawq format stores 4-bit weights only; this model has bits={bits}.")
    gs = uniform_setting(layers, "group_size", "autoawq")
    bad = [
        f"{n} [{layer.out_features}x{layer.in_features}]"
        for n, layer in layers.items()
        if layer.ragged or layer.out_features % 8 or (gs != -1 and gs > layer.in_features)
    ]
    if bad:
        raise CheckpointError(
            f"the autoawq format needs in_features divisible by group_size={gs} and "
            f"out_features divisible by 8; not so for: {', '.join(bad[:6])}"
            + (f" (+{len(bad) - 6} more)" if len(bad) > 6 else "")
        )
    return bits, gs


def gemm_tensors(layers: dict[str, QuantLayer]) -> dict[str, torch.Tensor]:
    """``{name.qweight, name.qzeros, name.scales}`` for every quantized layer (CPU)."""
    _check_exportable(layers)
    out: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        w = layer.weight
        qw, qz, sc = pack_gemm(w.codes().cpu(), w.zero.cpu(), w.scale.cpu())
        out[f"{name}.qweight"] = qw
        out[f"{name}.qzeros"] = qz
        out[f"{name}.scales"] = sc
    return out


def export_config(layers: dict[str, QuantLayer], float_linears: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(quantization_config for config.json, AutoAWQ's quant_config.json)``."""
    bits, gs = _check_exportable(layers)
    not_convert = [n for n in float_linears if n != "lm_head"] or None
    qc = {
        "quant_method": "awq",
        "version": "gemm",
        "bits": bits,
        "group_size": gs,
        "zero_point": True,
        "modules_to_not_convert": not_convert,
    }
    autoawq = {
        "zero_point": True,
        "q_group_size": gs,
        "w_bit": bits,
        "version": "GEMM",
        "modules_to_not_convert": not_convert,
    }
    return qc, autoawq


# ------------------------------------------------------------------------------------------------
# import
# ------------------------------------------------------------------------------------------------


def _linear_shape(name: str, mod: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)`` of a meta Linear / Conv1D."""
    w = getattr(mod, "weight", None)
    if type(mod).__name__ == "Conv1D" and w is not None:
        return int(w.shape[1]), int(w.shape[0])
    if isinstance(mod, nn.Linear):
        return mod.out_features, mod.in_features
    raise CheckpointError(f"{name}: quantized tensors for a {type(mod).__name__}, which is not a linear layer.")


def plan_load(qc: dict[str, Any], shards: ShardSet, model: nn.Module) -> LoadPlan:
    """Check an AutoAWQ ``quantization_config`` and tensors; plan the quantized layers."""
    version = str(qc.get("version", "gemm")).lower()
    if version != "gemm":
        raise CheckpointError(
            f"AutoAWQ version {qc.get('version')!r} is not supported: only GEMM packing "
            "(version 'gemm') can be imported (GEMV / GEMV-fast / Marlin use other layouts)."
        )
    bits = qc.get("bits", qc.get("w_bit", 4))
    if bits != 4:
        raise CheckpointError(f"AutoAWQ checkpoint has bits={bits}; only 4-bit is supported.")
    gs = int(qc.get("group_size", qc.get("q_group_size", 128)))
    if gs == 0 or gs < -1:
        raise CheckpointError(f"AutoAWQ checkpoint has an invalid group size {gs}.")
    zero_point = bool(qc.get("zero_point", True))
    if qc.get("desc_act") or any(k.endswith(".g_idx") for k in shards.keys()):
        raise CheckpointError(
            "this AWQ checkpoint uses act-order (desc_act / g_idx), which AutoAWQ GEMM does not "
            "define and awq_ao does not support."
        )
    not_convert = list(qc.get("modules_to_not_convert") or [])
    plan = LoadPlan(strict_dtypes=False)
    for key in shards.keys():
        if not key.endswith(".qweight"):
            continue
        name = key[: -len(".qweight")]
        hit = [m for m in not_convert if m and m in name]
        if hit:
            raise CheckpointError(
                f"{name} has packed weights but matches modules_to_not_convert {hit}; "
                "the checkpoint is inconsistent."
            )
        try:
            mod = model.get_submodule(name)
        except AttributeError as e:
            raise CheckpointError(f"unknown tensor {key!r}: the model has no module {name!r}.") from e
        n, k = _linear_shape(name, mod)
        egs = k if gs == -1 else gs
        if k % egs:
            raise CheckpointError(f"{name}: in_features={k} is not divisible by group_size={gs}.")
        if n % 8:
            raise CheckpointError(f"{name}: out_features={n} is not divisible by 8 (AutoAWQ packing).")
        g = k // egs
        shards.expect(key, (k, n // 8), (torch.int32,))
        shards.expect(f"{name}.scales", (g, n), (torch.float16, torch.bfloat16, torch.float32))
        zkey = f"{name}.qzeros"
        has_zeros = zkey in shards
        if has_zeros:
            shards.expect(zkey, (g, n // 8), (torch.int32,))
        elif zero_point:
            raise CheckpointError(f"tensor {zkey!r} is missing from the checkpoint.")
        check_layer_geometry(name, n, k, 4, gs, (n, g))

        def read(name: str = name, has_zeros: bool = has_zeros) -> tuple:
            qz = shards.get(f"{name}.qzeros") if has_zeros else None
            codes, zero, scale = unpack_gemm(shards.get(f"{name}.qweight"), qz, shards.get(f"{name}.scales"))
            return codes, scale, zero

        plan.layers[name] = LayerPlan(name, 4, gs, n, k, read)
        plan.consumed |= {key, f"{name}.scales"} | ({zkey} if has_zeros else set())
    if not plan.layers:
        raise CheckpointError("the AWQ checkpoint holds no '.qweight' tensors.")
    return plan
