"""Load-time validation: a checkpoint whose metadata or data is wrong is refused, never loaded.

``load_quantized`` calls this module at three points:

1. :func:`check_config` right after the format is detected: the quantization fields of
   ``config.json`` have the right types and ranges (integer bits and group sizes; no bool,
   float, string, 0 or negative), for all three formats.
2. :func:`check_manifest` before the model is built: where the checkpoint has awq_ao's
   manifest (:mod:`awq_ao.checkpoint.checksums`), the shard list, sizes and header digests
   match it and the load-relevant quantization fields equal the ones saved; with ``verify``
   also every shard's sha256.
3. :func:`check_plan` once the format reader has planned the quantized layers (and before any
   of them is built): every layer's bits and group size are valid and, with a manifest, equal
   to the ones its data was written with. Its ``read`` is wrapped so that the tensors it
   returns are checked just before the weight is built: shapes ``[N, G]`` with
   ``G = ceil(K / group_size)``, finite and positive scales, zero points in
   ``[0, 2**bits - 1]``.

Every failure is a :class:`~awq_ao.checkpoint.formats.CheckpointError` naming the file, the
field or tensor, and what to do.

The field checks of step 1 are in :mod:`~awq_ao.checkpoint.validate_config` and the tensor
checks of step 3 in :mod:`~awq_ao.checkpoint.validate_tensors`; their names are re-exported
here.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from awq_ao.checkpoint import checksums
from awq_ao.checkpoint.formats import (
    CONFIG_NAME,
    FORMAT_AUTOAWQ,
    FORMAT_AWQ_AO,
    FORMAT_COMPRESSED_TENSORS,
    CheckpointError,
    ExpertsPlan,
    LayerPlan,
    LoadPlan,
    ShardSet,
    detect_format,
    shard_files,
)
from awq_ao.checkpoint.validate_config import _RESTORE, _is_int, check_config
from awq_ao.checkpoint.validate_tensors import check_quantized_tensors
from awq_ao.lowering.quant_math import SUPPORTED_BITS

__all__ = [
    "check_config", "check_manifest", "check_plan", "check_quantized_tensors", "verify_checkpoint",
    "LOAD_RELEVANT_KEYS", "REWRITTEN_BY_KEY",
]

#: safetensors metadata key that ``save_pretrained`` (awq_ao's transformers quantizer) writes into
#: every shard: a manifest next to such shards describes an earlier save and is ignored.
REWRITTEN_BY_KEY = "awq_ao_written_by_save_pretrained"

#: ``quantization_config`` keys whose value changes how each format's tensors are read; a load
#: compares them with the manifest (other keys are informational and may be edited).
LOAD_RELEVANT_KEYS: dict[str, tuple[str, ...]] = {
    FORMAT_AWQ_AO: (
        "quant_method", "format_version", "bits", "group_size", "quantized_modules",
        "scaled_input_modules", "module_overrides", "tied_weights", "quantized_experts", "int8_weights",
    ),
    FORMAT_AUTOAWQ: (
        "quant_method", "version", "bits", "w_bit", "group_size", "q_group_size", "zero_point",
        "modules_to_not_convert", "desc_act",
    ),
    FORMAT_COMPRESSED_TENSORS: ("quant_method", "format", "quantization_status", "config_groups", "ignore"),
}

_MISSING = object()


# ------------------------------------------------------------------------------------------------
# 2. the manifest (what the save wrote)
# ------------------------------------------------------------------------------------------------


def _canonical(v: Any) -> str:
    return "<absent>" if v is _MISSING else json.dumps(v, sort_keys=True)


def _short(v: Any) -> str:
    t = _canonical(v)
    return t if len(t) <= 80 else t[:77] + "..."


def _difference(now: Any, then: Any) -> str:
    """How a config value differs from the saved one, in words (list items and dict keys named)."""
    if isinstance(now, list) and isinstance(then, list):
        added = [x for x in now if x not in then]
        removed = [x for x in then if x not in now]
        if added or removed:
            parts = ([f"adds {_short(added)}"] if added else []) + ([f"drops {_short(removed)}"] if removed else [])
            return " and ".join(parts) + " compared with the saved list"
    if isinstance(now, dict) and isinstance(then, dict):
        keys = sorted(k for k in set(now) | set(then) if _canonical(now.get(k, _MISSING)) != _canonical(then.get(k, _MISSING)))
        shown = "; ".join(f"[{k!r}] is {_short(now.get(k, _MISSING))}, saved {_short(then.get(k, _MISSING))}" for k in keys[:3])
        return f"differs from the saved one: {shown}"
    return f"is {_short(now)}, but the checkpoint was saved with {_short(then)}"


def check_manifest(
    path: str | os.PathLike, fmt: str, qc: dict[str, Any], shards: ShardSet, verify: bool = False
) -> dict[str, Any] | None:
    """Check ``path`` against its manifest; return the manifest (``None`` if it has none).

    Always (no tensor data read): the shard files, their sizes and safetensors headers are the
    ones saved, and the load-relevant quantization fields (:data:`LOAD_RELEVANT_KEYS`) of
    ``config.json`` equal the saved ones. With ``verify``: also every shard's sha256. A
    checkpoint without a manifest passes, except with ``verify`` (nothing to verify against).
    """
    d = Path(path)
    manifest = checksums.read_manifest(d)
    if manifest is None:
        if verify:
            raise CheckpointError(
                f"{d}: no {checksums.MANIFEST_NAME}, so there are no checksums to verify (the "
                "checkpoint was written by another tool or an older awq_ao). Load it without "
                "verify=True (its metadata is still checked), or re-save it with awq_ao's "
                "save_quantized to record checksums."
            )
        return None
    mfile = d / checksums.MANIFEST_NAME
    rewritten = [f for f in shards.files if shards.metadata.get(f, {}).get(REWRITTEN_BY_KEY)]
    if rewritten:  # transformers' save_pretrained wrote these shards over a save_quantized folder
        warnings.warn(
            f"{d}: ignoring {checksums.MANIFEST_NAME}: the shards were rewritten by save_pretrained "
            f"after it was written ({rewritten[0]}); the other checks still apply. Delete the file, "
            "or save with awq_ao.save_quantized to record a fresh one.",
            stacklevel=3,
        )
        return None
    if manifest.get("format") != fmt:
        raise CheckpointError(
            f"{d / CONFIG_NAME} describes a {fmt} checkpoint, but it was saved as "
            f"{manifest.get('format')!r} (recorded in {mfile}); {_RESTORE}."
        )
    saved = manifest["quantization_config"]
    for key in LOAD_RELEVANT_KEYS.get(fmt, ()):
        now, then = qc.get(key, _MISSING), saved.get(key, _MISSING)
        if _canonical(now) != _canonical(then):
            raise CheckpointError(
                f"{d / CONFIG_NAME}: quantization_config.{key} {_difference(now, then)} (recorded in "
                f"{mfile}); the tensors were written for the saved value. Fix: {_RESTORE}."
            )
    checksums.verify_shards(d, manifest, shards.files, full=verify)
    return manifest


# ------------------------------------------------------------------------------------------------
# 3. the load plan
# ------------------------------------------------------------------------------------------------


def _check_layer_settings(d: Path, name: str, bits: Any, gs: Any, dims: dict[str, Any]) -> None:
    where = f"{d}: {name}"
    if not _is_int(bits) or int(bits) not in SUPPORTED_BITS:
        raise CheckpointError(f"{where}: bits={bits!r}; expected an integer in {SUPPORTED_BITS}. Fix: {_RESTORE}.")
    if not _is_int(gs) or not (gs == -1 or gs >= 1):
        raise CheckpointError(f"{where}: group_size={gs!r}; expected an integer >= 1 or -1. Fix: {_RESTORE}.")
    for k, v in dims.items():
        if not _is_int(v) or v < 1:
            raise CheckpointError(f"{where}: {k}={v!r} in the model built from config.json; expected >= 1.")


def check_plan(path: str | os.PathLike, plan: LoadPlan, manifest: dict[str, Any] | None) -> None:
    """Check every planned quantized layer before any weight is built, and wrap its ``read``
    so that the tensors it returns are checked before the weight is built from them.

    With a manifest, every layer's ``(bits, group_size, out_features, in_features)`` must be
    the one its data was written with: a group size that gives the same number of groups
    (40 instead of 32 for ``in_features=64``) is refused, as is a layer missing or added.
    """
    d = Path(path)
    for name, lp in plan.layers.items():
        _check_layer_settings(d, name, lp.bits, lp.group_size, {"out_features": lp.out_features, "in_features": lp.in_features})
        lp.read = _checked_read(d, lp)
    for key, ep in plan.experts.items():
        _check_layer_settings(
            d, key, ep.bits, ep.group_size,
            {"num_experts": ep.num_experts, "out_features": ep.out_features, "in_features": ep.in_features},
        )
        ep.read = _checked_read(d, ep)
    if manifest is None:
        return
    mfile = d / checksums.MANIFEST_NAME
    for what, planned, rows in (
        ("layer", {n: [lp.bits, lp.group_size, lp.out_features, lp.in_features] for n, lp in plan.layers.items()},
         manifest.get("layers", {})),
        ("experts parameter", {k: [ep.bits, ep.group_size, ep.num_experts, ep.out_features, ep.in_features]
                               for k, ep in plan.experts.items()}, manifest.get("experts", {})),
    ):
        extra = sorted(set(planned) - set(rows))
        missing = sorted(set(rows) - set(planned))
        if extra or missing:
            parts = ([f"not saved as quantized: {', '.join(extra[:4])}"] if extra else []) + (
                [f"saved but not found: {', '.join(missing[:4])}"] if missing else []
            )
            raise CheckpointError(
                f"{d}: the quantized {what}s read from config.json differ from the ones saved "
                f"(recorded in {mfile}): {'; '.join(parts)}. Fix: {_RESTORE}."
            )
        labels = ("bits", "group_size", "num_experts", "out_features", "in_features") if what != "layer" else (
            "bits", "group_size", "out_features", "in_features")
        for n, now in planned.items():
            then = rows[n]
            if [int(x) for x in now] != then:
                diff = ", ".join(f"{lab} {a} (saved: {b})" for lab, a, b in zip(labels, now, then, strict=True) if a != b)
                raise CheckpointError(
                    f"{d}: {n}: config.json gives {diff}; its tensors were written with the saved "
                    f"values (recorded in {mfile}). Fix: {_RESTORE}."
                )


def _checked_read(d: Path, p: LayerPlan | ExpertsPlan) -> Any:
    """``p.read`` followed by :func:`check_quantized_tensors` of what it returns."""
    read = p.read

    def checked() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return check_quantized_tensors(d, p, *read())

    return checked


# ------------------------------------------------------------------------------------------------
# awq-ao info --verify
# ------------------------------------------------------------------------------------------------


def verify_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Check a checkpoint against the checksums saved with it, without loading the model.

    Runs :func:`check_config` and :func:`check_manifest` with ``verify=True`` (every shard's
    sha256). Returns ``{"format", "shards", "bytes", "seconds"}``; raises
    :class:`CheckpointError` naming what is wrong (including "no checksums recorded").
    """
    t0 = time.perf_counter()
    d = Path(path)
    fmt, qc = detect_format(d)
    check_config(d, fmt, qc)
    shards = ShardSet(d)
    check_manifest(d, fmt, qc, shards, verify=True)
    files, _ = shard_files(d)
    return {
        "format": fmt,
        "shards": len(files),
        "bytes": sum((d / f).stat().st_size for f in files),
        "seconds": time.perf_counter() - t0,
    }
