"""Shared pieces of the checkpoint formats: names, errors, safetensors reading and validation.

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
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from awq_ao.lowering.int4_tensor import Int4WeightTensor
from awq_ao.lowering.quant_math import num_groups
from awq_ao.lowering.scaled_input import ScaledInputLinear

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
]

FORMAT_AWQ_AO = "awq_ao"
FORMAT_AUTOAWQ = "autoawq"
FORMAT_COMPRESSED_TENSORS = "compressed-tensors"
FORMATS = (FORMAT_AWQ_AO, FORMAT_AUTOAWQ, FORMAT_COMPRESSED_TENSORS)

#: Version of the awq_ao on-disk format this code writes, and the newest it reads.
FORMAT_VERSION = 3
#: First version whose codes carry the float parameter's own name (``m.weight``).
FORMAT_VERSION_SAME_NAME = 3


def quantized_keys(param: str, version: int = FORMAT_VERSION) -> tuple[str, str, str]:
    """The file keys ``(codes, scale, zero)`` of quantized parameter ``param`` (``m.weight`` of
    a linear, ``m.gate_up_proj`` of an experts module) in awq_ao format ``version``."""
    codes = param if version >= FORMAT_VERSION_SAME_NAME else f"{param}_packed"
    return codes, f"{param}_scale", f"{param}_zero"


def codes_shape(lead: tuple[int, ...], n: int, k: int, bits: int, version: int = FORMAT_VERSION) -> tuple[int, ...]:
    """On-disk shape of the codes of an ``[*lead, n, k]`` weight in awq_ao format ``version``:
    nibbles ``[*lead, n, ceil(k/2)]`` for bits <= 4, else one byte per code (``[*lead, n, k, 1]``
    since version 3, so the shape never equals the float weight's)."""
    if bits <= 4:
        return (*lead, n, (k + 1) // 2)
    return (*lead, n, k, 1) if version >= FORMAT_VERSION_SAME_NAME else (*lead, n, k)

CONFIG_NAME = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

#: The file awq_ao writes into every folder it saves (a small JSON: writer, format, version).
#: ``overwrite=True`` only ever replaces a folder that carries it (or an empty one).
MARKER_NAME = ".awq_ao-checkpoint"
#: Version of the marker file's JSON.
MARKER_VERSION = 1

#: Files whose ``auto_map`` would make transformers import Python code shipped in the folder.
CUSTOM_CODE_FILES = (CONFIG_NAME, "tokenizer_config.json")

_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


class CheckpointError(ValueError):
    """A checkpoint directory is missing, damaged, or does not match its configuration."""


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (disk full, no permission, an I/O error, or an error raised by
    safetensors while writing a shard).

    ``errno`` is the cause's error number where one is known (``ENOSPC`` for a full disk,
    ``EIO`` otherwise); the message names the target folder and the cause. Nothing is left
    half-written: the target folder is exactly as it was before the save.
    """


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


# ------------------------------------------------------------------------------------------------
# safetensors shards
# ------------------------------------------------------------------------------------------------


@dataclass
class TensorInfo:
    """Where a tensor lives and what it is, from the safetensors header (no data read)."""

    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict]:
    """Parse and validate a safetensors file's header without reading tensor data.

    Returns ``({name: TensorInfo}, metadata)``. Raises :class:`CheckpointError` for a missing
    file, a damaged header, or a file shorter than its header says (a truncated shard).
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"missing shard {p.name} (expected at {p}).")
    size = p.stat().st_size
    if size < 8:
        raise CheckpointError(f"shard {p.name} is truncated: {size} bytes, no header.")
    with open(p, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8 or n > 100 * 2**20:
            raise CheckpointError(
                f"shard {p.name} is truncated or corrupt: header of {n} bytes, file is {size} bytes."
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"shard {p.name} has a corrupt safetensors header ({e}).") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"shard {p.name} has a corrupt safetensors header.")
    meta = header.pop("__metadata__", None) or {}
    infos: dict[str, TensorInfo] = {}
    end = 0
    for name, h in header.items():
        try:
            dtype = _ST_DTYPES[h["dtype"]]
            shape = tuple(int(s) for s in h["shape"])
            start, stop = (int(o) for o in h["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"shard {p.name}: bad header entry for {name!r} ({e}).") from e
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if stop - start != nbytes:
            raise CheckpointError(
                f"shard {p.name}: tensor {name!r} has {stop - start} bytes for shape "
                f"{list(shape)} {dtype} ({nbytes} expected)."
            )
        end = max(end, stop)
        infos[name] = TensorInfo(p.name, dtype, shape)
    if 8 + n + end > size:
        raise CheckpointError(
            f"shard {p.name} is truncated: its header describes {8 + n + end} bytes but the file "
            f"has {size}."
        )
    return infos, meta


def shard_files(path: str | os.PathLike) -> tuple[list[str], dict[str, str] | None]:
    """Shard file names of a checkpoint directory and the index's weight map (or ``None``)."""
    d = Path(path)
    index = d / INDEX_FILE
    if index.is_file():
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
            weight_map = dict(data["weight_map"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{index}: corrupt safetensors index ({e}).") from e
        files = sorted(set(weight_map.values()))
        for f in files:
            if "/" in f or "\\" in f or f.startswith("."):
                raise CheckpointError(f"{index}: bad shard name {f!r}.")
        return files, weight_map
    if (d / SINGLE_FILE).is_file():
        return [SINGLE_FILE], None
    found = sorted(p.name for p in d.glob("*.safetensors"))
    if len(found) == 1:
        return found, None
    if not found:
        raise CheckpointError(f"{d}: no safetensors weights ({SINGLE_FILE} or {INDEX_FILE}).")
    raise CheckpointError(f"{d}: several .safetensors files but no {INDEX_FILE}.")


class ShardSet:
    """Read access to a checkpoint's tensors across shards via memory-mapped ``safe_open``.

    Headers are read and validated on construction (missing or truncated shards, keys the index
    places in another shard); tensor data is only read by :meth:`get`.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.dir = Path(path)
        files, weight_map = shard_files(self.dir)
        self.files = files
        self.info: dict[str, TensorInfo] = {}
        self.metadata: dict[str, dict] = {}
        for f in files:
            infos, meta = read_safetensors_header(self.dir / f)
            self.metadata[f] = meta
            for k, v in infos.items():
                if k in self.info:
                    raise CheckpointError(f"tensor {k!r} appears in both {self.info[k].file} and {f}.")
                self.info[k] = v
        if weight_map is not None:
            for k, f in weight_map.items():
                got = self.info.get(k)
                if got is None:
                    raise CheckpointError(f"index lists tensor {k!r} in {f}, but {f} does not hold it.")
                if got.file != f:
                    raise CheckpointError(f"index lists tensor {k!r} in {f}, found in {got.file}.")
            extra = set(self.info) - set(weight_map)
            if extra:
                raise CheckpointError(
                    f"tensors missing from {INDEX_FILE}: {', '.join(sorted(extra)[:5])}"
                )
        self._handles: dict[str, Any] = {}

    def keys(self) -> list[str]:
        """All tensor names."""
        return list(self.info)

    def __contains__(self, key: str) -> bool:
        return key in self.info

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of ``key`` (from the header)."""
        return self.info[key].shape

    def dtype(self, key: str) -> torch.dtype:
        """dtype of ``key`` (from the header)."""
        return self.info[key].dtype

    def get(self, key: str) -> torch.Tensor:
        """The tensor ``key`` (CPU), read from the memory-mapped shard."""
        from safetensors import safe_open

        if key not in self.info:
            raise CheckpointError(f"tensor {key!r} is missing from the checkpoint.")
        f = self.info[key].file
        h = self._handles.get(f)
        if h is None:
            try:
                h = safe_open(str(self.dir / f), framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"cannot open shard {f}: {e}") from e
            self._handles[f] = h
        return h.get_tensor(key)

    def expect(self, key: str, shape: tuple[int, ...] | None, dtypes: tuple[torch.dtype, ...] | None) -> None:
        """Raise :class:`CheckpointError` unless ``key`` exists with this shape and one of ``dtypes``."""
        if key not in self.info:
            raise CheckpointError(f"tensor {key!r} is missing from the checkpoint.")
        got = self.info[key]
        if shape is not None and tuple(got.shape) != tuple(shape):
            raise CheckpointError(
                f"tensor {key!r} has shape {list(got.shape)} in {got.file}; the model config "
                f"expects {list(shape)}."
            )
        if dtypes is not None and got.dtype not in dtypes:
            names = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
            raise CheckpointError(
                f"tensor {key!r} has dtype {str(got.dtype).removeprefix('torch.')} in {got.file}; "
                f"expected {names}."
            )

    def total_bytes(self) -> int:
        """Size of all shard files on disk."""
        return sum((self.dir / f).stat().st_size for f in self.files)

    def close(self) -> None:
        """Drop the shard handles (tensors already returned stay valid)."""
        self._handles.clear()


# ------------------------------------------------------------------------------------------------
# quantized layers of an in-memory model
# ------------------------------------------------------------------------------------------------


@dataclass
class QuantLayer:
    """A quantized linear of a model being saved."""

    name: str
    module: nn.Module
    weight: Int4WeightTensor
    scaled_input: bool

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    @property
    def ragged(self) -> bool:
        """True when in_features is not a whole number of groups."""
        gs = self.weight.group_size
        return gs != -1 and self.in_features % gs != 0


def find_quantized_layers(model: nn.Module) -> dict[str, QuantLayer]:
    """Every module whose ``weight`` is an :class:`Int4WeightTensor`, by name.

    Raises :class:`CheckpointError` for a quantized weight held by a module that is neither an
    ``nn.Linear`` nor a :class:`ScaledInputLinear` (it could not be rebuilt on load).
    """
    out: dict[str, QuantLayer] = {}
    for name, mod in model.named_modules():
        w = mod._parameters.get("weight") if hasattr(mod, "_parameters") else None
        if not isinstance(w, Int4WeightTensor) or w.dim() != 2:
            continue
        if isinstance(mod, ScaledInputLinear):
            out[name] = QuantLayer(name, mod, w, True)
        elif isinstance(mod, nn.Linear):
            out[name] = QuantLayer(name, mod, w, False)
        else:
            raise CheckpointError(
                f"{name}: a quantized weight in a {type(mod).__name__} module cannot be saved "
                "(only nn.Linear and ScaledInputLinear are supported)."
            )
    return out


@dataclass
class QuantExperts:
    """A quantized 3-D experts parameter (``key`` = ``module.attr``) of a model being saved."""

    key: str
    module: nn.Module
    weight: Int4WeightTensor

    @property
    def num_experts(self) -> int:
        return int(self.weight.shape[0])

    @property
    def out_features(self) -> int:
        return self.weight.out_features

    @property
    def in_features(self) -> int:
        return int(self.weight.in_features)


def find_quantized_experts(model: nn.Module) -> dict[str, QuantExperts]:
    """Every parameter held as a 3-D (experts) :class:`Int4WeightTensor`, by its full name."""
    out: dict[str, QuantExperts] = {}
    for mname, mod in model.named_modules():
        for attr, p in mod._parameters.items():
            if isinstance(p, Int4WeightTensor) and p.dim() == 3:
                key = f"{mname}.{attr}" if mname else attr
                out[key] = QuantExperts(key, mod, p)
    return out


def experts_format_error(keys: list[str], fmt: str) -> CheckpointError:
    """The error for INT4 MoE experts that format ``fmt`` cannot hold (names the parameters)."""
    shown = ", ".join(keys[:3]) + (" ..." if len(keys) > 3 else "")
    return CheckpointError(
        f"the {fmt} format cannot hold INT4 MoE experts (3-D expert weights quantized by awq_ao: "
        f"{shown}); awq_ao does not write their 3-D layout in that format. Save with "
        "format='awq_ao' (CLI: --format awq_ao), or quantize with experts=False to keep the "
        "experts in full precision."
    )


def tensor_aliases(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, aliases)``: persistent parameters/buffers by name, each object once.

    ``aliases`` maps a name to the first name holding the same tensor object (tied weights,
    e.g. ``lm_head.weight -> model.embed_tokens.weight``).
    """
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first: dict[int, str] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if t is None:
            continue
        key = id(t)
        if key in first:
            aliases[name] = first[key]
            continue
        first[key] = name
        tensors[name] = t
    return tensors, aliases


def float_linear_names(model: nn.Module, quantized: dict[str, QuantLayer]) -> list[str]:
    """Linear-like modules (nn.Linear, transformers Conv1D) left in full precision."""
    from awq_ao.lowering.swap import is_quantizable_linear

    return [n for n, m in model.named_modules() if n not in quantized and is_quantizable_linear(m)]


def uniform_setting(layers: dict[str, QuantLayer], attr: str, fmt: str) -> Any:
    """The value of ``attr`` (``bits`` / ``group_size``) shared by all layers, else an error."""
    values: dict[Any, list[str]] = {}
    for n, layer in layers.items():
        values.setdefault(getattr(layer.weight, attr), []).append(n)
    if len(values) > 1:
        desc = "; ".join(f"{v}: {', '.join(ns[:3])}" for v, ns in values.items())
        raise CheckpointError(f"the {fmt} format needs one {attr} for all layers; found {desc}.")
    return next(iter(values)) if values else None


def zero_is_symmetric(w: Int4WeightTensor) -> bool:
    """True if every zero point equals ``2**(bits-1)`` (symmetric quantization)."""
    return bool((w.zero == 2 ** (w.bits - 1)).all())


# ------------------------------------------------------------------------------------------------
# load plans (what each format reader hands the generic loader)
# ------------------------------------------------------------------------------------------------


@dataclass
class LayerPlan:
    """One quantized linear to build on load.

    ``read()`` returns ``(data, scale, zero)`` where ``data`` is either ``uint8 [N, K]`` codes
    or, if ``nibble_packed``, ``uint8 [N, ceil(K/2)]`` in the canonical nibble layout.
    """

    name: str
    bits: int
    group_size: int
    out_features: int
    in_features: int
    read: Any
    nibble_packed: bool = False
    scaled_input: bool = False
    #: awq_ao format only: the file keys ``(codes, scale, zero)`` (see :func:`quantized_keys`)
    keys: tuple[str, ...] = ()


@dataclass
class ExpertsPlan:
    """One quantized 3-D experts parameter (``key`` = ``module.attr``) to build on load.

    ``read()`` returns ``(data, scale, zero)``: ``data`` uint8 ``[E, N, ceil(K/2)]`` (canonical
    nibble layout, ``nibble_packed``) or ``[E, N, K]`` codes; ``scale`` / ``zero`` ``[E, N, G]``.
    Slabs are ``[out, in]``; ``transposed`` means the parameter's shape is ``[E, in, out]``.
    """

    key: str
    bits: int
    group_size: int
    num_experts: int
    out_features: int
    in_features: int
    transposed: bool
    read: Any
    nibble_packed: bool = True
    #: awq_ao format only: the file keys ``(codes, scale, zero)`` (see :func:`quantized_keys`)
    keys: tuple[str, ...] = ()


@dataclass
class LoadPlan:
    """What a format reader found: quantized layers, keys they use, and key handling rules."""

    layers: dict[str, LayerPlan] = field(default_factory=dict)
    experts: dict[str, ExpertsPlan] = field(default_factory=dict)
    consumed: set[str] = field(default_factory=set)
    tied: dict[str, str] = field(default_factory=dict)
    strict_dtypes: bool = True


def check_layer_geometry(
    name: str, n: int, k: int, bits: int, group_size: int, scale_shape: tuple[int, ...]
) -> None:
    """Raise :class:`CheckpointError` unless ``scale_shape`` is ``[N, G]`` for this layer."""
    g = num_groups(k, group_size)
    if tuple(scale_shape) != (n, g):
        raise CheckpointError(
            f"{name}: scales of shape {list(scale_shape)} do not match a [{n}, {k}] weight with "
            f"group_size={group_size} (expected [{n}, {g}])."
        )
