"""``save_quantized``: write a quantized model as a transformers-style directory, atomically."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from awq_ao.checkpoint import autoawq, compressed_tensors
from awq_ao.checkpoint.formats import (
    CONFIG_NAME,
    FORMAT_AUTOAWQ,
    FORMAT_AWQ_AO,
    FORMAT_VERSION,
    FORMAT_VERSION_LINEAR,
    FORMATS,
    INDEX_FILE,
    SINGLE_FILE,
    CheckpointError,
    QuantExperts,
    QuantLayer,
    experts_format_error,
    find_quantized_experts,
    find_quantized_layers,
    float_linear_names,
    iter_chunks,
    tensor_aliases,
    zero_is_symmetric,
)
from awq_ao.lowering import packing
from awq_ao.lowering.int4_tensor import Int4WeightTensor

__all__ = ["save_quantized", "parse_size"]

DEFAULT_MAX_SHARD_SIZE = "2GB"


def parse_size(size: int | str) -> int:
    """``"2GB"`` / ``"500MB"`` / ``"64KiB"`` / ``12345`` -> bytes."""
    if isinstance(size, int):
        if size <= 0:
            raise ValueError(f"shard size must be positive, got {size}.")
        return size
    s = size.strip().upper().replace(" ", "")
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    for u, mult in units.items():
        if s.endswith(u):
            return int(float(s[: -len(u)]) * mult)
    return int(s)


# ------------------------------------------------------------------------------------------------
# atomic directory writes
# ------------------------------------------------------------------------------------------------


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _looks_like_model_dir(p: Path) -> bool:
    return p.is_dir() and (not any(p.iterdir()) or (p / CONFIG_NAME).is_file())


def check_output_dir(out_dir: str | os.PathLike, overwrite: bool) -> Path:
    """Validate the target of a save early (before expensive work); returns it as a Path."""
    target = Path(out_dir).expanduser().absolute()
    if target.exists():
        if not overwrite:
            raise FileExistsError(f"{target} already exists; pass overwrite=True (--overwrite) to replace it.")
        if not target.is_dir():
            raise FileExistsError(f"{target} exists and is not a directory; not replacing it.")
        if not _looks_like_model_dir(target):
            raise FileExistsError(
                f"refusing to overwrite {target}: it is not empty and has no {CONFIG_NAME} "
                "(it does not look like a model directory)."
            )
    return target


@contextmanager
def atomic_directory(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``out_dir``; on success it replaces ``out_dir``.

    Files are written into ``.<name>.tmp-XXXX`` in the same parent (so the final rename stays on
    one filesystem), fsynced, then renamed into place. On any error the temporary directory is
    removed and an existing ``out_dir`` is left untouched; an interrupted process leaves only a
    hidden ``.tmp`` directory, never a valid-looking ``out_dir``.
    """
    target = check_output_dir(out_dir, overwrite)
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700; a saved model should look like any dir
    try:
        yield tmp
        _fsync_path(tmp)
        if target.exists():
            old = parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(target, old)
            try:
                os.rename(tmp, target)
            except BaseException:
                os.rename(old, target)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
        _fsync_path(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_shards(
    tmp: Path, items: list[tuple[str, torch.Tensor]], max_shard_size: int, metadata: dict[str, str], progress: bool
) -> list[str]:
    chunks = list(iter_chunks(items, max_shard_size))
    if not chunks:
        chunks = [[]]
    n = len(chunks)
    names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    bar = None
    if progress and n > 1:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc="writing shards", leave=False)
    weight_map: dict[str, str] = {}
    total = 0
    for fname, chunk in zip(names, chunks, strict=True):
        tensors = dict(chunk)
        path = tmp / fname
        save_file(tensors, str(path), metadata=metadata)
        os.chmod(path, 0o666 & ~_umask())  # safetensors creates its files 0600
        _fsync_path(path)
        for k, t in chunk:
            weight_map[k] = fname
            total += t.numel() * t.element_size()
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if n > 1:
        _write_json(tmp / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return names


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


def _awq_ao_weight_tensors(layer: QuantLayer) -> dict[str, torch.Tensor]:
    w = layer.weight
    packed = _canonical_packed(w)
    return {
        f"{layer.name}.weight_packed": _cpu(packed),
        f"{layer.name}.weight_scale": _cpu(w.scale),
        f"{layer.name}.weight_zero": _cpu(w.zero.round().to(torch.uint8)),
    }


def _awq_ao_experts_tensors(qe: QuantExperts) -> dict[str, torch.Tensor]:
    w = qe.weight
    slabs = [w.slab(e) for e in range(qe.num_experts)]
    return {
        f"{qe.key}_packed": _cpu(torch.stack([_canonical_packed(s) for s in slabs])),
        f"{qe.key}_scale": _cpu(w.scale),
        f"{qe.key}_zero": _cpu(w.zero.round().to(torch.uint8)),
    }


def _float_tensors(
    model: nn.Module, layers: dict[str, QuantLayer], keep_aliases: bool, experts: dict[str, QuantExperts] | None = None
) -> tuple[list[tuple[str, torch.Tensor]], dict[str, str]]:
    """Plain tensors to write (quantized weights excluded) and the alias map of tied tensors.

    With ``keep_aliases=False`` (export formats) aliases that transformers re-ties from the
    config are dropped and any other alias is written as its own copy.
    """
    tensors, aliases = tensor_aliases(model)
    qweights = {f"{n}.weight" for n in layers} | set(experts or {})
    for a, src in aliases.items():
        if a in qweights or src in qweights:
            raise CheckpointError(f"{a} is tied to {src}, a quantized weight; tied quantized weights are not supported.")
    items: list[tuple[str, torch.Tensor]] = []
    seen_storage: dict[tuple, str] = {}
    for name, t in tensors.items():
        if name in qweights:
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
    model: nn.Module, layers: dict[str, QuantLayer], aliases: dict[str, str], experts: dict[str, QuantExperts]
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
        "format_version": FORMAT_VERSION if experts else FORMAT_VERSION_LINEAR,
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
    return qc


# ------------------------------------------------------------------------------------------------
# public entry point
# ------------------------------------------------------------------------------------------------


def save_quantized(
    model: nn.Module,
    out_dir: str | os.PathLike,
    tokenizer: Any = None,
    format: str = FORMAT_AWQ_AO,
    overwrite: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    progress: bool = False,
) -> Path:
    """Save a model quantized by awq_ao as a transformers-style directory.

    Args:
        model: a transformers ``PreTrainedModel`` whose linears hold
            :class:`~awq_ao.lowering.Int4WeightTensor` weights (after ``awq_ao.quantize`` or
            the ``quantize_`` flow, or :func:`load_quantized`); MoE experts may hold
            :class:`~awq_ao.lowering.int4_experts.Int4ExpertsTensor` weights.
        out_dir: target directory. Written atomically: files go to a hidden temporary
            directory beside it, are fsynced, and the directory is renamed into place.
        tokenizer: optional tokenizer (anything with ``save_pretrained``) saved alongside.
        format: ``"awq_ao"`` (default; every awq_ao model, INT4 MoE experts included),
            ``"autoawq"`` (AutoAWQ GEMM: 4-bit, whole groups, no ScaledInputLinear, no INT4
            MoE experts) or ``"compressed-tensors"`` (``pack-quantized``; whole groups, no
            ScaledInputLinear, no INT4 MoE experts).
        overwrite: replace an existing ``out_dir`` (only if empty or a model directory).
        max_shard_size: largest shard (bytes or e.g. ``"2GB"``); more shards get an index file.
        progress: show a progress bar while writing several shards.

    Returns:
        The absolute path of the saved directory.

    Raises:
        FileExistsError: ``out_dir`` exists and ``overwrite`` is False.
        CheckpointError: the model cannot be expressed in ``format`` (the message names the
            layers) or is not a transformers model.
        OSError: writing failed (e.g. disk full); no partial directory is left behind.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}.")
    max_bytes = parse_size(max_shard_size)
    check_output_dir(out_dir, overwrite)
    layers = find_quantized_layers(model)
    experts = find_quantized_experts(model)
    if not layers and not experts:
        raise CheckpointError("the model has no quantized (Int4WeightTensor) layers; quantize it first.")
    if experts and format != FORMAT_AWQ_AO:
        raise experts_format_error(sorted(experts), format)
    float_linears = float_linear_names(model, layers)
    extra_json: dict[str, Any] = {}
    if format == FORMAT_AWQ_AO:
        items, aliases = _float_tensors(model, layers, keep_aliases=True, experts=experts)
        for layer in layers.values():
            items.extend(_awq_ao_weight_tensors(layer).items())
        for qe in experts.values():
            items.extend(_awq_ao_experts_tensors(qe).items())
        qc = _awq_ao_config(model, layers, aliases, experts)
    elif format == FORMAT_AUTOAWQ:
        qc, extra_json["quant_config.json"] = autoawq.export_config(layers, float_linears)
        items, _ = _float_tensors(model, layers, keep_aliases=False)
        qnames = {f"{n}.bias" for n in layers}
        items = [(k, t.to(torch.float16) if k in qnames and t.is_floating_point() else t) for k, t in items]
        items.extend(autoawq.gemm_tensors(layers).items())
    else:
        qc = compressed_tensors.export_config(layers, float_linears)
        items, _ = _float_tensors(model, layers, keep_aliases=False)
        items.extend(compressed_tensors.pack_quantized_tensors(layers).items())
    config = _config_dict(model, qc)
    items.sort(key=lambda kv: kv[0])
    metadata = {"format": "pt", "quant_format": format}
    if format == FORMAT_AWQ_AO:
        metadata["awq_ao_format_version"] = str(qc["format_version"])
    try:
        with atomic_directory(out_dir, overwrite) as tmp:
            _write_shards(tmp, items, max_bytes, metadata, progress)
            gen = getattr(model, "generation_config", None)
            if gen is not None and hasattr(gen, "to_dict"):
                _write_json(tmp / "generation_config.json", gen.to_dict())
            for fname, obj in extra_json.items():
                _write_json(tmp / fname, obj)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
            _write_json(tmp / CONFIG_NAME, config)  # last: a directory without it is not a model
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise OSError(
                errno.ENOSPC,
                f"no space left on device while saving to {Path(out_dir)}; nothing was written "
                "(any previous directory there is unchanged)",
            ) from e
        raise
    return Path(out_dir).expanduser().absolute()
