"""The checkpoint manifest: what a save wrote, so a load can tell a damaged or edited checkpoint.

:func:`~awq_ao.checkpoint.save_quantized` writes ``awq_ao_manifest.json`` into every folder it
saves (all three formats), after the shards and before ``config.json``::

    {
      "writer": "awq_ao", "version": 1, "awq_ao_version": "...", "format": "awq_ao",
      "algorithm": "sha256",
      "shards": {"model.safetensors": {"bytes": N, "header_sha256": "...", "sha256": "..."}},
      "quantization_config": {...},            # exactly what config.json got
      "layers": {"m": [bits, group_size, out_features, in_features]},
      "experts": {"p": [bits, group_size, num_experts, out_features, in_features]}
    }

A load always checks (cheaply: no tensor data is read) the shard list, sizes and safetensors
header digests, and compares ``config.json``'s quantization fields and every layer's bits and
group size with the ones recorded (:mod:`awq_ao.checkpoint.validate`). The full ``sha256`` of
every shard, which catches flipped data bytes, is checked with ``load_quantized(...,
verify=True)`` or ``awq-ao info DIR --verify`` (it costs about 40% of a load, see
docs/checkpoints.md). Checkpoints without a manifest (other tools, older awq_ao) still load;
only the checks that need it are skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from awq_ao.checkpoint.formats import CheckpointError, QuantExperts, QuantLayer

__all__ = [
    "MANIFEST_NAME",
    "MANIFEST_VERSION",
    "file_sha256",
    "header_sha256",
    "manifest_dict",
    "write_manifest",
    "read_manifest",
    "verify_shards",
]

#: File name of the manifest inside a checkpoint folder.
MANIFEST_NAME = "awq_ao_manifest.json"
#: Version of the manifest's JSON layout.
MANIFEST_VERSION = 1

_CHUNK = 16 * 2**20


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a whole file (read in 16 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def header_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a safetensors file's header (its 8-byte length and the JSON after it).

    The header holds every tensor's name, dtype, shape and offsets, so this digest changes with
    any edit to them; it costs one small read.
    """
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return hashlib.sha256(head).hexdigest()
        (n,) = struct.unpack("<Q", head)
        body = f.read(min(n, 100 * 2**20))
    return hashlib.sha256(head + body).hexdigest()


def _shard_record(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "header_sha256": header_sha256(path), "sha256": file_sha256(path)}


def manifest_dict(
    d: str | os.PathLike,
    shard_names: Iterable[str],
    fmt: str,
    quantization_config: dict[str, Any],
    layers: dict[str, QuantLayer],
    experts: dict[str, QuantExperts] | None = None,
) -> dict[str, Any]:
    """The manifest of the shards ``shard_names`` already written in folder ``d``."""
    from awq_ao import __version__

    d = Path(d)
    return {
        "writer": "awq_ao",
        "version": MANIFEST_VERSION,
        "awq_ao_version": __version__,
        "format": fmt,
        "algorithm": "sha256",
        "shards": {name: _shard_record(d / name) for name in sorted(shard_names)},
        "quantization_config": json.loads(json.dumps(quantization_config)),
        "layers": {
            n: [int(q.weight.bits), int(q.weight.group_size), q.out_features, q.in_features]
            for n, q in sorted(layers.items())
        },
        "experts": {
            k: [int(q.weight.bits), int(q.weight.group_size), q.num_experts, q.out_features, q.in_features]
            for k, q in sorted((experts or {}).items())
        },
    }


def write_manifest(
    d: str | os.PathLike,
    shard_names: Iterable[str],
    fmt: str,
    quantization_config: dict[str, Any],
    layers: dict[str, QuantLayer],
    experts: dict[str, QuantExperts] | None = None,
) -> Path:
    """Write :data:`MANIFEST_NAME` into ``d`` (fsynced) and return its path.

    Called by ``save_quantized`` once the shards are written (the digests are computed from the
    files on disk, so they describe exactly what a later load reads).
    """
    path = Path(d) / MANIFEST_NAME
    data = manifest_dict(d, shard_names, fmt, quantization_config, layers, experts)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    return path


def read_manifest(d: str | os.PathLike) -> dict[str, Any] | None:
    """The parsed manifest of checkpoint folder ``d``, or ``None`` if it has none.

    Raises :class:`CheckpointError` (naming the file) for a manifest that is not valid JSON,
    not awq_ao's, of a newer layout, or whose entries have the wrong types.
    """
    path = Path(d) / MANIFEST_NAME
    if not path.is_file():
        return None
    fix = f"restore it, or delete {path.name} to load without the checks it enables"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a valid awq_ao manifest ({e}); {fix}.") from e
    if not isinstance(data, dict) or data.get("writer") != "awq_ao":
        raise CheckpointError(f"{path}: not an awq_ao manifest; {fix}.")
    version = data.get("version")
    if type(version) is not int or version < 1:
        raise CheckpointError(f"{path}: manifest version {version!r} is not an integer >= 1; {fix}.")
    if version > MANIFEST_VERSION:
        raise CheckpointError(
            f"{path}: manifest version {version} is newer than this awq_ao reads ({MANIFEST_VERSION}); "
            "upgrade awq_ao."
        )
    shards = data.get("shards")
    ok = isinstance(shards, dict) and all(
        isinstance(k, str)
        and isinstance(v, dict)
        and type(v.get("bytes")) is int
        and isinstance(v.get("header_sha256"), str)
        and isinstance(v.get("sha256"), str)
        for k, v in shards.items()
    )
    ok = ok and isinstance(data.get("quantization_config"), dict)
    for key, width in (("layers", 4), ("experts", 5)):
        entries = data.get(key, {})
        ok = ok and isinstance(entries, dict) and all(
            isinstance(v, list) and len(v) == width and all(type(x) is int for x in v) for v in entries.values()
        )
    if not ok:
        raise CheckpointError(f"{path}: malformed manifest (shards, quantization_config, layers or experts); {fix}.")
    return data


def verify_shards(d: str | os.PathLike, manifest: dict[str, Any], shard_names: Iterable[str], full: bool) -> int:
    """Check the shards of folder ``d`` against ``manifest``; return the bytes hashed.

    Always: the same shard files as recorded, each of the recorded size and with the recorded
    header digest (one small read per shard). With ``full``: also the sha256 of every whole
    shard (reads every byte). Raises :class:`CheckpointError` naming the shard.
    """
    d = Path(d)
    recorded: dict[str, dict[str, Any]] = manifest["shards"]
    names = sorted(shard_names)
    where = f"(recorded in {d / MANIFEST_NAME})"
    redo = (
        "Re-save or re-download the checkpoint (if you rewrote its shards on purpose with another "
        f"tool, delete the stale {MANIFEST_NAME})."
    )
    if names != sorted(recorded):
        raise CheckpointError(
            f"{d}: the checkpoint's shards {names} are not the ones it was saved with {sorted(recorded)} "
            f"{where}; a shard or the index was replaced. {redo}"
        )
    hashed = 0
    for name in names:
        p, rec = d / name, recorded[name]
        size = p.stat().st_size
        if size != rec["bytes"]:
            raise CheckpointError(
                f"shard {p} has {size} bytes, but it was saved with {rec['bytes']} {where}: it was "
                f"truncated, extended or replaced. {redo}"
            )
        if header_sha256(p) != rec["header_sha256"]:
            raise CheckpointError(
                f"shard {p}: its safetensors header (tensor names, dtypes, shapes, offsets) differs "
                f"from the one saved {where}; it was edited or damaged. {redo}"
            )
        if full:
            if file_sha256(p) != rec["sha256"]:
                raise CheckpointError(
                    f"shard {p}: sha256 mismatch, its tensor data differs from what was saved {where} "
                    f"(flipped bytes or a damaged copy). {redo}"
                )
            hashed += size
    return hashed
