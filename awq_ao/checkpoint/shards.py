"""Reading safetensors shards without loading them: header parsing and validation, the shard
list of a checkpoint folder, and :class:`ShardSet` (memory-mapped reads across shards)."""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from awq_ao.checkpoint.disk_layout import INDEX_FILE, SINGLE_FILE
from awq_ao.checkpoint.errors import CheckpointError

__all__ = ["TensorInfo", "read_safetensors_header", "shard_files", "ShardSet"]

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

