"""``checkpoint_summary``: what a checkpoint holds and its footprint, from ``config.json`` and
the shard headers (no weights read)."""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from awq_ao.checkpoint.formats import FORMAT_AUTOAWQ, FORMAT_AWQ_AO, ShardSet, detect_format
from awq_ao.checkpoint.hub import resolve_checkpoint

__all__ = ["checkpoint_summary"]


def checkpoint_summary(path: str | os.PathLike) -> dict[str, Any]:
    """What a checkpoint holds, from ``config.json`` and the shard headers (no weights read).

    Keys: ``format``, ``architecture``, ``bits``, ``group_size``, ``zero_point``,
    ``quantized_layers`` (names), ``quantized_experts`` (3-D INT4 MoE expert parameters,
    awq_ao format), ``int8_weights`` and ``int8_bytes`` (the 8-bit head, awq_ao format),
    ``scaled_input_layers``, ``float_linears`` (if recorded),
    ``size_bytes`` (all files), ``tensor_bytes``, ``shards``, ``dtype``.
    """
    from awq_ao.checkpoint.formats import read_config

    path = resolve_checkpoint(path)
    fmt, qc = detect_format(path)
    cfg = read_config(path)
    shards = ShardSet(path)
    out: dict[str, Any] = {
        "path": str(path),
        "format": fmt,
        "architecture": (cfg.get("architectures") or [cfg.get("model_type")])[0],
        "dtype": cfg.get("dtype") or cfg.get("torch_dtype"),
        "shards": list(shards.files),
        "size_bytes": sum(p.stat().st_size for p in path.iterdir() if p.is_file()),
        "tensor_bytes": shards.total_bytes(),
    }
    if fmt == FORMAT_AWQ_AO:
        out.update(
            format_version=qc.get("format_version"),
            bits=qc.get("bits"),
            group_size=qc.get("group_size"),
            zero_point=qc.get("zero_point"),
            quantized_layers=list(qc.get("quantized_modules") or []),
            scaled_input_layers=list(qc.get("scaled_input_modules") or []),
            float_linears=list(qc.get("modules_to_not_convert") or []),
            module_overrides=qc.get("module_overrides") or {},
            quantized_experts=sorted(qc.get("quantized_experts") or {}),
            int8_weights=list(qc.get("int8_weights") or []),
        )
    elif fmt == FORMAT_AUTOAWQ:
        out.update(
            bits=qc.get("bits", qc.get("w_bit")),
            group_size=qc.get("group_size", qc.get("q_group_size")),
            zero_point=qc.get("zero_point"),
            version=qc.get("version"),
            quantized_layers=sorted(k[: -len(".qweight")] for k in shards.keys() if k.endswith(".qweight")),
            scaled_input_layers=[],
            float_linears=list(qc.get("modules_to_not_convert") or []),
        )
    else:
        groups = qc.get("config_groups") or {}
        w = next(iter(groups.values()), {}).get("weights", {}) if groups else {}
        out.update(
            bits=w.get("num_bits"),
            group_size=w.get("group_size") if w.get("strategy") == "group" else -1,
            zero_point=not w.get("symmetric", True),
            quantized_layers=sorted(
                k[: -len(".weight_packed")] for k in shards.keys() if k.endswith(".weight_packed")
            ),
            scaled_input_layers=[],
            float_linears=list(qc.get("ignore") or []),
        )
    out.setdefault("quantized_experts", [])
    out["num_quantized_layers"] = len(out["quantized_layers"])
    out["num_quantized_experts"] = len(out["quantized_experts"])
    out["num_tensors"] = len(shards.keys())
    out["num_stored_elements"] = sum(math.prod(shards.shape(k)) for k in shards.keys())
    out.update(_footprint(shards, out["quantized_layers"], fmt, out.get("bits")))
    int8 = [k for key in out.get("int8_weights", []) for k in (key, f"{key}_scale") if k in shards.keys()]
    out["int8_bytes"] = sum(math.prod(shards.shape(k)) * shards.dtype(k).itemsize for k in int8)
    out["full_precision_bytes"] -= out["int8_bytes"]
    out.setdefault("int8_weights", [])
    return out


def _footprint(shards: ShardSet, layers: list[str], fmt: str, bits: int | None) -> dict[str, Any]:
    """Bytes of the quantized layers' tensors (codes, scales, zeros), the logical weights they
    hold, bits per weight, and the bytes of everything else (kept in full precision).

    The weight count comes from ``weight_shape`` (compressed-tensors), or from the packed codes
    (awq_ao: the uint8 ``m.weight``, ``m.weight_packed`` before format version 3):
    two per byte for awq_ao's nibble layout (bits <= 4; an odd K counts half a code more),
    one per byte above, eight per int32 ``qweight`` element (AutoAWQ).
    """
    prefixes = {f"{n}." for n in layers}
    q_bytes, q_weights = 0, 0
    for key in shards.keys():
        prefix = key[: key.rfind(".") + 1]
        if prefix not in prefixes or key.endswith(".bias"):
            continue
        q_bytes += math.prod(shards.shape(key)) * shards.dtype(key).itemsize
        if key.endswith(".weight_shape"):
            q_weights += int(math.prod(shards.get(key).tolist()))
        elif key.endswith(".qweight"):
            q_weights += 8 * math.prod(shards.shape(key))
        elif fmt == FORMAT_AWQ_AO and shards.dtype(key) == torch.uint8 and key.endswith((".weight", ".weight_packed")):
            q_weights += (2 if (bits or 4) <= 4 else 1) * math.prod(shards.shape(key))
    total = sum(math.prod(shards.shape(k)) * shards.dtype(k).itemsize for k in shards.keys())
    return {
        "quantized_bytes": q_bytes,
        "quantized_weights": q_weights,
        "bits_per_weight": round(8 * q_bytes / q_weights, 3) if q_weights else None,
        "full_precision_bytes": total - q_bytes,
    }
