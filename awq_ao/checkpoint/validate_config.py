"""Load-time validation, step 1: the quantization fields of ``config.json`` (or AutoAWQ's
``quant_config.json``) have the right types and ranges, for all three formats.

Split out of :mod:`awq_ao.checkpoint.validate` (which describes the three checks a load makes
and re-exports :func:`check_config`); the field checkers here are shared with its other steps.
"""

from __future__ import annotations

import json
import numbers
import os
from pathlib import Path
from typing import Any

from awq_ao.checkpoint.formats import (
    CONFIG_NAME,
    FORMAT_AUTOAWQ,
    FORMAT_AWQ_AO,
    FORMAT_COMPRESSED_TENSORS,
    CheckpointError,
)
from awq_ao.lowering.quant_math import SUPPORTED_BITS

__all__ = ["check_config"]

_RESTORE = "restore the value the checkpoint was saved with, or re-save the checkpoint with awq_ao"


def _kind(v: Any) -> str:
    return "a bool" if isinstance(v, bool) else f"a {type(v).__name__}"


def _fail(file: Path, field: str, value: Any, expected: str) -> CheckpointError:
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return CheckpointError(f"{file}: {field} is {shown} ({_kind(value)}); expected {expected}. Fix: {_RESTORE}.")


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _bits(file: Path, field: str, v: Any, allowed: tuple[int, ...] = SUPPORTED_BITS) -> None:
    if not _is_int(v) or int(v) not in allowed:
        raise _fail(file, field, v, f"an integer in {', '.join(map(str, allowed))}")


def _group_size(file: Path, field: str, v: Any) -> None:
    if not _is_int(v) or not (int(v) == -1 or int(v) >= 1):
        raise _fail(file, field, v, "an integer >= 1, or -1 for one group per row")


def _bool(file: Path, field: str, v: Any) -> None:
    if not isinstance(v, bool):
        raise _fail(file, field, v, "true or false")


def _str_list(file: Path, field: str, v: Any, optional: bool = True) -> None:
    if v is None and optional:
        return
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise _fail(file, field, v, "a list of module names (strings)")


def _mapping(file: Path, field: str, v: Any) -> dict[str, Any]:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise _fail(file, field, v, "an object mapping names to settings")
    return v


# ------------------------------------------------------------------------------------------------
# 1. config.json fields
# ------------------------------------------------------------------------------------------------


def check_config(path: str | os.PathLike, fmt: str, qc: dict[str, Any]) -> None:
    """Raise :class:`CheckpointError` unless the quantization fields of ``qc`` (read from
    ``path``'s ``config.json``, or AutoAWQ's ``quant_config.json``) have valid types and ranges.

    Checked: bits (integers the format supports), group sizes (integers >= 1, or -1), flags
    (booleans) and module lists, including per-layer overrides and MoE experts entries. No
    value is coerced: ``4.0``, ``"4"``, ``true`` and ``0`` are all refused.
    """
    d = Path(path)
    file = d / CONFIG_NAME
    if fmt == FORMAT_AUTOAWQ and "quantization_config" not in _raw_config(d):
        file = d / "quant_config.json"
    p = "quantization_config."
    if fmt == FORMAT_AWQ_AO:
        _bits(file, p + "bits", qc.get("bits"))
        _group_size(file, p + "group_size", qc.get("group_size"))
        if "zero_point" in qc:
            _bool(file, p + "zero_point", qc["zero_point"])
        _str_list(file, p + "quantized_modules", qc.get("quantized_modules"), optional=False)
        _str_list(file, p + "scaled_input_modules", qc.get("scaled_input_modules"))
        for name, o in _mapping(file, p + "module_overrides", qc.get("module_overrides")).items():
            if not isinstance(o, dict):
                raise _fail(file, f"{p}module_overrides[{name!r}]", o, "an object with bits and/or group_size")
            if "bits" in o:
                _bits(file, f"{p}module_overrides[{name!r}].bits", o["bits"])
            if "group_size" in o:
                _group_size(file, f"{p}module_overrides[{name!r}].group_size", o["group_size"])
        _str_list(file, p + "int8_weights", qc.get("int8_weights"))
        tied = _mapping(file, p + "tied_weights", qc.get("tied_weights"))
        for k, v in tied.items():
            if not isinstance(v, str):
                raise _fail(file, f"{p}tied_weights[{k!r}]", v, "the name of the tensor it shares (a string)")
        for key, o in _mapping(file, p + "quantized_experts", qc.get("quantized_experts")).items():
            f = f"{p}quantized_experts[{key!r}]"
            if not isinstance(o, dict):
                raise _fail(file, f, o, "an object with bits, group_size and transposed")
            _bits(file, f + ".bits", o.get("bits"))
            _group_size(file, f + ".group_size", o.get("group_size"))
            _bool(file, f + ".transposed", o.get("transposed"))
    elif fmt == FORMAT_AUTOAWQ:
        for key in ("bits", "w_bit"):  # the value (4 only) is the format reader's to refuse
            if key in qc and not _is_int(qc[key]):
                raise _fail(file, p + key, qc[key], "the integer 4 (AutoAWQ GEMM is 4-bit)")
        for key in ("group_size", "q_group_size"):
            if key in qc:
                _group_size(file, p + key, qc[key])
        if "zero_point" in qc:
            _bool(file, p + "zero_point", qc["zero_point"])
        if "version" in qc and not isinstance(qc["version"], str):
            raise _fail(file, p + "version", qc["version"], "a string such as 'gemm'")
        _str_list(file, p + "modules_to_not_convert", qc.get("modules_to_not_convert"))
    elif fmt == FORMAT_COMPRESSED_TENSORS:
        groups = qc.get("config_groups")
        if not isinstance(groups, dict) or not groups:
            raise _fail(file, p + "config_groups", groups, "an object of quantization schemes")
        _str_list(file, p + "ignore", qc.get("ignore"))
        for gname, g in groups.items():
            f = f"{p}config_groups[{gname!r}]"
            if not isinstance(g, dict):
                raise _fail(file, f, g, "a scheme object (targets, weights)")
            _str_list(file, f + ".targets", g.get("targets"))
            w = g.get("weights")
            if not isinstance(w, dict):
                raise _fail(file, f + ".weights", w, "an object with num_bits, strategy and group_size")
            _bits(file, f + ".weights.num_bits", w.get("num_bits"))
            strategy = w.get("strategy")
            if strategy not in ("group", "channel"):
                raise _fail(file, f + ".weights.strategy", strategy, "'group' or 'channel'")
            gs = w.get("group_size")
            if strategy == "group" or gs is not None:
                if not _is_int(gs) or int(gs) < 1:
                    raise _fail(file, f + ".weights.group_size", gs, "an integer >= 1")
            if "symmetric" in w:
                _bool(file, f + ".weights.symmetric", w["symmetric"])


def _raw_config(d: Path) -> dict[str, Any]:
    try:
        data = json.loads((d / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
