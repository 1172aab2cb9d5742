"""The checkpoint formats: which one a folder holds (``config.json``), and the shared pieces.

This module reads ``config.json`` (:func:`read_config`, :func:`detect_format`) and refuses
folders that ask for custom code (:func:`refuse_custom_code`). The shared pieces live in smaller
modules and are re-exported here: names, versions and key layout on disk
(:mod:`~awq_ao.checkpoint.disk_layout`), the errors (:mod:`~awq_ao.checkpoint.errors`),
safetensors reading and validation (:mod:`~awq_ao.checkpoint.shards`), the quantized parts of a
model being saved (:mod:`~awq_ao.checkpoint.quantized_modules`) and the load plans format
readers return (:mod:`~awq_ao.checkpoint.load_plan`).

Three on-disk formats are understood (all transformers-style directories: ``config.json`` with
a ``quantization_config`` entry, safetensors shards, optional tokenizer files):

``"awq_ao"``
    awq_ao's own format. For every quantized linear ``m``: ``m.weight_packed`` (uint8, the
    canonical ``nibble`` layout of :mod:`awq_ao.lowering.packing` for bits <= 4, one code per
    byte above), ``m.weight_scale`` (``[N, G]``, the model dtype) and ``m.weight_zero`` (uint8
    ``[N, G]``), so ``w_hat = (code - zero) * scale``. ``input_scale`` buffers of
    :class:`~awq_ao.lowering.scaled_input.ScaledInputLinear` layers and every other tensor are
    stored as they are. ``quantization_config`` lists the quantized and the
    ScaledInputLinear modules and the tied weights.

    INT4 MoE experts (a 3-D parameter ``p`` of a transformers experts module held as an
    3-D :class:`~awq_ao.lowering.int4_tensor.Int4WeightTensor`) are stored per parameter as
    ``p_packed`` (uint8 ``[E, N, ceil(K/2)]``, each expert's ``[out, in]`` slab in the same
    canonical layout as a linear; ``[E, N, K]`` above 4 bits), ``p_scale`` ``[E, N, G]`` and
    ``p_zero`` (uint8 ``[E, N, G]``); ``quantization_config.quantized_experts`` maps ``p`` to its
    ``bits``, ``group_size`` and ``transposed`` flag. Checkpoints with experts are format
    version 2 (version 1 otherwise), so an older awq_ao refuses them with a clear message.

``"autoawq"``
    AutoAWQ's GEMM format (``qweight`` / ``qzeros`` / ``scales``), see
    :mod:`awq_ao.checkpoint.autoawq`.

``"compressed-tensors"``
    compressed-tensors ``pack-quantized`` (``weight_packed`` / ``weight_scale`` /
    ``weight_zero_point`` / ``weight_shape``), see :mod:`awq_ao.checkpoint.compressed_tensors`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

# The pieces live in smaller modules; they are re-exported here so ``awq_ao.checkpoint.formats``
# keeps every name it always had.
from awq_ao.checkpoint.disk_layout import (
    CONFIG_NAME,
    FORMAT_AUTOAWQ,
    FORMAT_AWQ_AO,
    FORMAT_COMPRESSED_TENSORS,
    FORMAT_VERSION,
    FORMAT_VERSION_SAME_NAME,
    FORMATS,
    INDEX_FILE,
    MARKER_NAME,
    MARKER_VERSION,
    SINGLE_FILE,
    codes_shape,
    quantized_keys,
)
from awq_ao.checkpoint.errors import CheckpointError, CheckpointWriteError
from awq_ao.checkpoint.load_plan import ExpertsPlan, LayerPlan, LoadPlan, check_layer_geometry
from awq_ao.checkpoint.quantized_modules import (
    QuantExperts,
    QuantLayer,
    experts_format_error,
    find_quantized_experts,
    find_quantized_layers,
    float_linear_names,
    tensor_aliases,
    uniform_setting,
    zero_is_symmetric,
)
from awq_ao.checkpoint.shards import (
    ShardSet,
    TensorInfo,
    read_safetensors_header,
    shard_files,
)

__all__ = [
    "FORMATS",
    "FORMAT_AWQ_AO",
    "FORMAT_AUTOAWQ",
    "FORMAT_COMPRESSED_TENSORS",
    "FORMAT_VERSION",
    "quantized_keys",
    "codes_shape",
    "CheckpointError",
    "CheckpointWriteError",
    "MARKER_NAME",
    "refuse_custom_code",
    "QuantLayer",
    "QuantExperts",
    "LayerPlan",
    "ExpertsPlan",
    "LoadPlan",
    "ShardSet",
    "detect_format",
    "read_config",
    "read_safetensors_header",
    "find_quantized_layers",
    "find_quantized_experts",
    "experts_format_error",
    "tensor_aliases",
    "uniform_setting",
    "float_linear_names",
    # also used from here by the other checkpoint modules
    "FORMAT_VERSION_SAME_NAME",
    "CONFIG_NAME",
    "SINGLE_FILE",
    "INDEX_FILE",
    "MARKER_VERSION",
    "TensorInfo",
    "shard_files",
    "zero_is_symmetric",
    "check_layer_geometry",
]

#: Files whose ``auto_map`` would make transformers import Python code shipped in the folder.
CUSTOM_CODE_FILES = (CONFIG_NAME, "tokenizer_config.json")


def refuse_custom_code(path: str | os.PathLike) -> None:
    """Raise :class:`CheckpointError` if a model folder asks transformers to run its own code.

    A ``config.json`` or ``tokenizer_config.json`` with an ``auto_map`` entry points
    transformers at Python files shipped in the folder (``trust_remote_code``). awq_ao never
    runs such code: it refuses the folder, naming the file, before transformers sees it. A
    path that is not a folder, or files that are absent or not JSON, pass (the loader reports
    those).
    """
    d = Path(path)
    if not d.is_dir():
        return
    for name in CUSTOM_CODE_FILES:
        f = d / name
        if not f.is_file():
            continue
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(data, dict) and data.get("auto_map"):
            entries = data["auto_map"]
            shown = ", ".join(sorted(map(str, entries)))[:200] if isinstance(entries, dict) else str(entries)[:200]
            raise CheckpointError(
                f"{f} asks for custom code (auto_map: {shown}); awq_ao never runs code shipped "
                "with a model (trust_remote_code is always off). Use a model whose architecture "
                "transformers implements, or remove auto_map if the folder does not need it."
            )


# ------------------------------------------------------------------------------------------------
# config.json
# ------------------------------------------------------------------------------------------------


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``config.json`` of a checkpoint directory (clear errors when absent/bad)."""
    d = Path(path)
    if not d.exists():
        raise CheckpointError(f"{d}: no such directory.")
    if not d.is_dir():
        raise CheckpointError(f"{d}: not a directory (a checkpoint is a directory).")
    cfg = d / CONFIG_NAME
    if not cfg.is_file():
        raise CheckpointError(f"{d}: missing {CONFIG_NAME}; not a model directory.")
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg}: not valid JSON ({e}).") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{cfg}: expected a JSON object.")
    return data


def detect_format(path: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """``(format, quantization_config)`` of a checkpoint directory.

    Raises :class:`CheckpointError` if the directory holds no quantized model awq_ao can read.
    """
    d = Path(path)
    cfg = read_config(d)
    qc = cfg.get("quantization_config")
    if qc is None and (d / "quant_config.json").is_file():  # older AutoAWQ checkpoints
        qfile = d / "quant_config.json"
        try:
            qc = json.loads(qfile.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(
                f"{qfile}: not valid JSON ({e}); an AutoAWQ quant_config.json is a JSON object such "
                'as {"w_bit": 4, "q_group_size": 128, "zero_point": true, "version": "GEMM"}. '
                "Fix the file, or add that object to config.json as quantization_config with "
                '"quant_method": "awq".'
            ) from e
        if not isinstance(qc, dict):
            raise CheckpointError(
                f"{qfile}: expected a JSON object (w_bit, q_group_size, zero_point, version), "
                f"got {type(qc).__name__}."
            )
        qc = {**qc, "quant_method": qc.get("quant_method", "awq")}
    if not isinstance(qc, dict):
        raise CheckpointError(
            f"{d / CONFIG_NAME}: no quantization_config; this is not a quantized checkpoint "
            "(load full-precision models with transformers' from_pretrained)."
        )
    method = str(qc.get("quant_method", "")).lower()
    if method == "awq_ao":
        return FORMAT_AWQ_AO, qc
    if method == "awq":
        return FORMAT_AUTOAWQ, qc
    if method == "compressed-tensors":
        return FORMAT_COMPRESSED_TENSORS, qc
    raise CheckpointError(
        f"{d / CONFIG_NAME}: quantization method {qc.get('quant_method')!r} is not supported "
        "(awq_ao reads 'awq_ao', AutoAWQ 'awq' GEMM and 'compressed-tensors' pack-quantized)."
    )

