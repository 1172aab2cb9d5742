"""What :func:`~awq_ao.checkpoint.save.save_quantized` writes: the tensors of each format, the
awq_ao ``quantization_config`` and ``config.json``, and the dtype of the unquantized tensors.

Split out of :mod:`awq_ao.checkpoint.save`, which re-exports these names (the transformers
quantizer's ``save_pretrained`` path uses the awq_ao tensors and config from here too).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from awq_ao.checkpoint.formats import (
    FORMAT_AUTOAWQ,
    FORMAT_AWQ_AO,
    FORMAT_COMPRESSED_TENSORS,
    FORMAT_VERSION,
    CheckpointError,
    QuantExperts,
    QuantLayer,
    float_linear_names,
    quantized_keys,
    tensor_aliases,
    zero_is_symmetric,
)
from awq_ao.lowering import packing
from awq_ao.lowering.int4_tensor import Int4WeightTensor

__all__ = ["resolve_save_dtype", "refuse_int8_head", "int8_weights"]


# ------------------------------------------------------------------------------------------------
# tensors per format
# ------------------------------------------------------------------------------------------------


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous()


def _canonical_packed(w: Int4WeightTensor) -> torch.Tensor:
    """The codes of ``w`` in the on-disk layout: nibbles for bits <= 4, one byte above."""
    if w.bits <= 4:
        if w.pack_layout == packing.LAYOUT_NIBBLE:
            return w.packed
        return packing.pack(w.codes(), w.bits, packing.LAYOUT_NIBBLE)
    return w.packed if w.pack_layout == packing.LAYOUT_BYTE else w.codes()


def _file_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Byte codes get a trailing unit dimension on disk (see :func:`codes_shape`)."""
    return codes if bits <= 4 else codes.unsqueeze(-1)


def _awq_ao_weight_tensors(layer: QuantLayer) -> dict[str, torch.Tensor]:
    w = layer.weight
    codes, scale, zero = quantized_keys(f"{layer.name}.weight")
    return {
        codes: _cpu(_file_codes(_canonical_packed(w), w.bits)),
        scale: _cpu(w.scale),
        zero: _cpu(w.zero.round().to(torch.uint8)),
    }


def _awq_ao_experts_tensors(qe: QuantExperts) -> dict[str, torch.Tensor]:
    w = qe.weight
    slabs = [w.slab(e) for e in range(qe.num_experts)]
    codes, scale, zero = quantized_keys(qe.key)
    return {
        codes: _cpu(_file_codes(torch.stack([_canonical_packed(s) for s in slabs]), w.bits)),
        scale: _cpu(w.scale),
        zero: _cpu(w.zero.round().to(torch.uint8)),
    }


def int8_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The 8-bit row-wise weights (``head="int8"``) by the first name holding each tensor."""
    from awq_ao.lowering.int8_tensor import Int8RowWeightTensor

    tensors, _ = tensor_aliases(model)
    return {k: t for k, t in tensors.items() if isinstance(t, Int8RowWeightTensor)}


def refuse_int8_head(model: nn.Module, where: str = "this format") -> None:
    """Only the awq_ao format written by ``save_quantized`` holds an 8-bit head (``head="int8"``)."""
    found = int8_weights(model)
    if found:
        raise CheckpointError(
            f"{next(iter(found))} is an 8-bit head (head='int8'); {where} cannot store it. Use "
            "save_quantized(model, dir) (format='awq_ao'), or save a model quantized with "
            "head='keep' and call awq_ao.quantize_head(model) after loading it. Nothing was written."
        )


def _awq_ao_int8_tensors(key: str, w: Any) -> dict[str, torch.Tensor]:
    """An 8-bit weight on disk: codes ``[N, K, 1]`` int8 under its own name (never the float
    weight's shape) and ``{key}_scale`` ``[N, 1]`` float32."""
    return {key: _cpu(w.codes.unsqueeze(-1)), f"{key}_scale": _cpu(w.row_scale.to(torch.float32).unsqueeze(-1))}


def _float_tensors(
    model: nn.Module,
    layers: dict[str, QuantLayer],
    keep_aliases: bool,
    experts: dict[str, QuantExperts] | None = None,
    int8_keys: set[str] | None = None,
) -> tuple[list[tuple[str, torch.Tensor]], dict[str, str]]:
    """Plain tensors to write (quantized weights excluded) and the alias map of tied tensors.

    With ``keep_aliases=False`` (export formats) aliases that transformers re-ties from the
    config are dropped and any other alias is written as its own copy. ``int8_keys``: the
    8-bit weights the caller writes itself (awq_ao format); without it an 8-bit head is refused.
    """
    if int8_keys is None:
        refuse_int8_head(model)
    tensors, aliases = tensor_aliases(model)
    qweights = {f"{n}.weight" for n in layers} | set(experts or {})
    for a, src in aliases.items():
        if int8_keys and src in int8_keys and a not in qweights:
            continue  # an embedding tied to the 8-bit head: one copy, re-tied on load
        if a in qweights or src in qweights:
            raise CheckpointError(f"{a} is tied to {src}, a quantized weight; tied quantized weights are not supported.")
    items: list[tuple[str, torch.Tensor]] = []
    seen_storage: dict[tuple, str] = {}
    for name, t in tensors.items():
        if name in qweights or (int8_keys and name in int8_keys):
            continue
        if is_traceable_wrapper_subclass(t):
            raise CheckpointError(f"{name}: cannot save a {type(t).__name__} tensor.")
        c = _cpu(t)
        key = (c.untyped_storage().data_ptr(), c.storage_offset(), tuple(c.shape), c.dtype)
        if c.numel() and key in seen_storage:
            # distinct objects sharing memory: safetensors wants separate buffers
            c = c.clone()
        elif c.numel():
            seen_storage[key] = name
        items.append((name, c))
    if keep_aliases:
        return items, aliases
    hf_tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    if not getattr(getattr(model, "config", None), "tie_word_embeddings", True):
        hf_tied = set()
    by_name = dict(items)
    for a, src in aliases.items():
        if a not in hf_tied:
            items.append((a, by_name[src].clone()))
    return items, {}


def _config_dict(model: nn.Module, qc: dict[str, Any]) -> dict[str, Any]:
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "to_dict"):
        raise CheckpointError(
            f"{type(model).__name__} has no transformers config; save_quantized needs a "
            "transformers PreTrainedModel (e.g. *ForCausalLM)."
        )
    d = cfg.to_dict()
    d.pop("quantization_config", None)
    d["architectures"] = [type(model).__name__]
    dtype = getattr(model, "dtype", None)
    if isinstance(dtype, torch.dtype):
        d["dtype"] = str(dtype).removeprefix("torch.")
        d.pop("torch_dtype", None)
    d["quantization_config"] = qc
    return d


def _awq_ao_config(
    model: nn.Module,
    layers: dict[str, QuantLayer],
    aliases: dict[str, str],
    experts: dict[str, QuantExperts],
    int8_keys: set[str] | None = None,
) -> dict[str, Any]:
    from awq_ao import __version__
    from awq_ao.state import get_state

    bits_count: dict[int, int] = {}
    gs_count: dict[int, int] = {}
    for w in [layer.weight for layer in layers.values()] + [qe.weight for qe in experts.values()]:
        bits_count[w.bits] = bits_count.get(w.bits, 0) + 1
        gs_count[w.group_size] = gs_count.get(w.group_size, 0) + 1
    bits = max(bits_count, key=lambda b: bits_count[b]) if bits_count else 4
    gs = max(gs_count, key=lambda g: gs_count[g]) if gs_count else 128
    state = get_state(model)
    report = getattr(state, "report", None) if state is not None else None
    if report is not None and hasattr(report, "zero_point"):
        zero_point = bool(report.zero_point)
    else:
        zero_point = not all(zero_is_symmetric(layer.weight) for layer in layers.values()) or any(
            not bool((qe.weight.zero == 2 ** (qe.weight.bits - 1)).all()) for qe in experts.values()
        )
    overrides = {
        n: {"bits": layer.weight.bits, "group_size": layer.weight.group_size}
        for n, layer in layers.items()
        if (layer.weight.bits, layer.weight.group_size) != (bits, gs)
    }
    qc: dict[str, Any] = {
        "quant_method": "awq_ao",
        "format": FORMAT_AWQ_AO,
        "format_version": FORMAT_VERSION,
        "awq_ao_version": __version__,
        "bits": bits,
        "group_size": gs,
        "zero_point": zero_point,
        "packing": "nibble for bits <= 4 (low nibble = even column), one byte per code above",
        "quantized_modules": sorted(layers),
        "scaled_input_modules": sorted(n for n, layer in layers.items() if layer.scaled_input),
        "module_overrides": overrides,
        "tied_weights": dict(sorted(aliases.items())),
        "modules_to_not_convert": float_linear_names(model, layers),
    }
    if experts:
        qc["quantized_experts"] = {
            k: {"bits": qe.weight.bits, "group_size": qe.weight.group_size, "transposed": bool(qe.weight.transposed)}
            for k, qe in sorted(experts.items())
        }
    if int8_keys:
        qc["int8_weights"] = sorted(int8_keys)  # 8-bit row-wise (head="int8"): codes + row scale
    return qc


# ------------------------------------------------------------------------------------------------
# the dtype and size of what is written
# ------------------------------------------------------------------------------------------------


_SAVE_DTYPES = {"float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
                "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                "float32": torch.float32, "fp32": torch.float32, "float": torch.float32}


def resolve_save_dtype(dtype: torch.dtype | str | None, format: str) -> torch.dtype | None:
    """The dtype :func:`save_quantized` writes unquantized tensors in (``None``: as they are)."""
    if dtype is None or dtype == "auto":
        return None if format == FORMAT_AWQ_AO else torch.float16
    if isinstance(dtype, str):
        if dtype.lower().removeprefix("torch.") not in _SAVE_DTYPES:
            raise ValueError(
                f"unknown save dtype {dtype!r}; use one of float16, bfloat16, float32 (or auto)."
            )
        return _SAVE_DTYPES[dtype.lower().removeprefix("torch.")]
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"save dtype must be float16, bfloat16 or float32, got {dtype}.")
    return dtype


def _cast_float(key: str, t: torch.Tensor, dtype: torch.dtype, format: str) -> torch.Tensor:
    """Unquantized float tensors (and compressed-tensors' scales) in the save dtype; the
    quantized layers' own tensors (codes, zeros, awq_ao / AutoAWQ scales) as they are."""
    if not t.is_floating_point() or t.dtype == dtype:
        return t
    leaf = key.rpartition(".")[2]
    if format == FORMAT_AWQ_AO and (leaf.startswith("weight_") or key.endswith(("_scale", "_zero"))):
        return t  # awq_ao's 16-bit scales: kept exactly
    if format == FORMAT_AUTOAWQ and leaf in ("scales", "qweight", "qzeros"):
        return t
    if format == FORMAT_COMPRESSED_TENSORS and leaf in ("weight_packed", "weight_zero_point", "weight_shape"):
        return t
    return t.to(dtype)


def _stored_bits_per_weight(
    items: list[tuple[str, torch.Tensor]], layers: dict[str, QuantLayer], experts: dict[str, QuantExperts]
) -> float | None:
    """Bits per quantized weight of what is written (codes, scales, zeros; not biases)."""
    weights = sum(layer.out_features * layer.in_features for layer in layers.values())
    weights += sum(qe.num_experts * qe.out_features * qe.in_features for qe in experts.values())
    experts_keys = tuple(experts)
    nbytes = sum(
        t.numel() * t.element_size()
        for k, t in items
        if not k.endswith((".bias", ".input_scale"))
        and (k.rpartition(".")[0] in layers or k.startswith(experts_keys))
    )
    return 8.0 * nbytes / weights if weights else None
