"""``save_quantized``: write a quantized model as a transformers-style directory, atomically."""

from __future__ import annotations

import errno
import math
import os
import re
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from awq_ao.checkpoint import autoawq, checksums, compressed_tensors
from awq_ao.checkpoint.atomic_dir import (
    atomic_directory,
    check_output_dir,
    current_umask,
    fsync_path,
    source_dirs,
    write_json,
)
from awq_ao.checkpoint.formats import (
    CONFIG_NAME,
    FORMAT_AUTOAWQ,
    FORMAT_AWQ_AO,
    FORMAT_COMPRESSED_TENSORS,
    FORMAT_VERSION,
    FORMATS,
    INDEX_FILE,
    SINGLE_FILE,
    CheckpointError,
    CheckpointWriteError,
    QuantExperts,
    QuantLayer,
    experts_format_error,
    find_quantized_experts,
    find_quantized_layers,
    float_linear_names,
    quantized_keys,
    tensor_aliases,
    zero_is_symmetric,
)
from awq_ao.checkpoint.model_card import model_card as make_model_card
from awq_ao.checkpoint.vllm_compat import describe_issues, marlin_issues
from awq_ao.lowering import packing
from awq_ao.lowering.int4_tensor import Int4WeightTensor
from awq_ao.progress import current

__all__ = ["save_quantized", "parse_size"]

DEFAULT_MAX_SHARD_SIZE = "2GB"


def parse_size(size: int | str) -> int:
    """``"2GB"`` / ``"500MB"`` / ``"64KiB"`` / ``12345`` -> bytes.

    Raises ``ValueError`` naming the value and the accepted forms for anything else (``"lots"``,
    ``0``, negative sizes, ``True``, NaN or infinite numbers).
    """
    accepted = "a positive number of bytes, or a size such as '2GB', '500MB', '64KiB'"
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise ValueError(f"max_shard_size={size!r} is not a size; accepted: {accepted}.")
    if isinstance(size, int):
        n = size
    else:
        s = size.strip().upper().replace(" ", "")
        units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
        number, mult = s, 1
        for u, m in units.items():
            if s.endswith(u):
                number, mult = s[: -len(u)], m
                break
        try:
            value = float(number)
        except ValueError:
            value = float("nan")
        if not math.isfinite(value):
            raise ValueError(f"max_shard_size={size!r} is not a size; accepted: {accepted}.")
        n = int(value * mult)
    if n <= 0:
        raise ValueError(f"max_shard_size={size!r} must be positive; accepted: {accepted}.")
    return n


def _write_shards(
    tmp: Path, items: list[tuple[str, torch.Tensor]], max_shard_size: int, metadata: dict[str, str], progress: bool
) -> list[str]:
    """Write ``items`` as safetensors shards of at most ``max_shard_size`` bytes (a bigger
    tensor gets a shard of its own), split by ``huggingface_hub`` the way transformers does,
    plus the index file when there are several; returns the shard file names."""
    from huggingface_hub import split_torch_state_dict_into_shards

    by_name = dict(items)
    split = split_torch_state_dict_into_shards(
        by_name, filename_pattern=SINGLE_FILE.replace(".safetensors", "{suffix}.safetensors"), max_shard_size=max_shard_size
    )
    names = list(split.filename_to_tensors) or [SINGLE_FILE]
    chunks = [[(k, by_name[k]) for k in split.filename_to_tensors.get(f, [])] for f in names]
    n = len(chunks)
    bar = None
    run = current()  # a run that planned saving (the CLI's quantize) shows it on its own bar
    planned = run.totals.get("save", 0.0) if run is not None and run.planned("save") else None
    everything = sum(t.numel() * t.element_size() for _, t in items) or 1
    if planned is None and progress and n > 1:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc="writing shards", leave=False)
    weight_map: dict[str, str] = {}
    total = 0
    for fname, chunk in zip(names, chunks, strict=True):
        tensors = dict(chunk)
        path = tmp / fname
        save_file(tensors, str(path), metadata=metadata)
        os.chmod(path, 0o666 & ~current_umask())  # safetensors creates its files 0600
        fsync_path(path)
        chunk_bytes = sum(t.numel() * t.element_size() for _, t in chunk)
        for k, _ in chunk:
            weight_map[k] = fname
        total += chunk_bytes
        if bar is not None:
            bar.update(1)
        if planned is not None:
            run.advance("save", planned * chunk_bytes / everything, fname)
    if bar is not None:
        bar.close()
    if n > 1:
        write_json(tmp / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
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
    return qc


# ------------------------------------------------------------------------------------------------
# write errors
# ------------------------------------------------------------------------------------------------


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _errno_of(e: BaseException) -> int:
    if isinstance(e, OSError) and e.errno:
        return int(e.errno)
    m = re.search(r"os error (\d+)|code: (\d+)", str(e))  # safetensors: "... (os error 28)"
    if m:
        return int(m.group(1) or m.group(2))
    if "no space left" in str(e).lower():
        return errno.ENOSPC
    return errno.EIO


def _write_error(target: Path, e: BaseException, needed: int) -> CheckpointWriteError:
    """The one error every failed write becomes: names the folder, the cause and, for a full
    disk, the space the checkpoint needs."""
    code = _errno_of(e)
    untouched = "nothing was written (any previous directory there is unchanged)"
    if code == errno.ENOSPC:
        try:
            free = f", {_human_bytes(shutil.disk_usage(_existing_parent(target)).free)} free"
        except OSError:
            free = ""
        return CheckpointWriteError(
            code,
            f"no space left on device while saving to {target} (the checkpoint needs about "
            f"{_human_bytes(needed)}{free}); {untouched}",
        )
    cause = " ".join(str(e).split()) or type(e).__name__
    return CheckpointWriteError(code, f"cannot save to {target}: {cause}; {untouched}")


def _existing_parent(p: Path) -> Path:
    while not p.exists() and p.parent != p:
        p = p.parent
    return p


# ------------------------------------------------------------------------------------------------
# public entry point
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


def save_quantized(
    model: nn.Module,
    out_dir: str | os.PathLike,
    tokenizer: Any = None,
    format: str = FORMAT_AWQ_AO,
    overwrite: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    progress: bool = False,
    dtype: torch.dtype | str | None = None,
    model_card: bool | Mapping[str, Any] = True,
) -> Path:
    """Save a model quantized by awq_ao as a transformers-style directory.

    Args:
        model: a transformers ``PreTrainedModel`` whose linears hold
            :class:`~awq_ao.lowering.Int4WeightTensor` weights (after ``awq_ao.quantize`` or
            the ``quantize_`` flow, or :func:`load_quantized`); MoE experts may hold
            3-D :class:`~awq_ao.lowering.Int4WeightTensor` weights.
        out_dir: target directory. Written atomically: files go to a hidden temporary
            directory beside it, are fsynced, and the directory is renamed into place.
        tokenizer: optional tokenizer (anything with ``save_pretrained``) saved alongside.
        format: ``"awq_ao"`` (default; every awq_ao model, INT4 MoE experts included),
            ``"autoawq"`` (AutoAWQ GEMM: 4-bit, whole groups, no ScaledInputLinear, no INT4
            MoE experts) or ``"compressed-tensors"`` (``pack-quantized``; whole groups, no
            ScaledInputLinear, no INT4 MoE experts).
        overwrite: replace an existing ``out_dir``. Only a folder awq_ao wrote (it carries the
            ``.awq_ao-checkpoint`` marker file every save writes) or an empty folder is
            replaced, never the current directory or a parent of it, the home directory, the
            filesystem root, or the folder the model or tokenizer was loaded from. The old
            checkpoint is swapped for the new one atomically (Linux ``renameat2``), so the
            target is always the complete old or the complete new one.
        max_shard_size: largest shard (bytes or e.g. ``"2GB"``); more shards get an index file.
        progress: show a progress bar while writing several shards.
        dtype: dtype of everything that is not quantized (embeddings, norms, head, biases;
            and of compressed-tensors' scales), also written as the config's ``dtype``:
            ``"float16"``, ``"bfloat16"``, ``"float32"`` or a ``torch.dtype``. Default: the
            model's own dtypes for ``"awq_ao"``; ``float16`` for ``"autoawq"`` and
            ``"compressed-tensors"``, the formats vLLM serves (its AWQ kernels are
            float16-first). The model in memory is not changed.
        model_card: write a ``README.md`` model card (settings, layout, bits per weight, what
            the convert report recorded, how to load it); a mapping adds rows to its table
            (e.g. ``{"calibration": "...", "perplexity (WikiText-2)": 22.8}``). ``False``
            writes none.

    Returns:
        The absolute path of the saved directory.

    Raises:
        FileExistsError: ``out_dir`` exists (or appears during the save: the target is claimed
            atomically, so of two concurrent saves to one new folder exactly one succeeds) and
            ``overwrite`` is False; or ``overwrite`` is True and ``out_dir`` may not be
            replaced (the message names the folder and why). Nothing is changed.
        CheckpointError: the model cannot be expressed in ``format`` (the message names the
            layers) or is not a transformers model.
        CheckpointWriteError: (an ``OSError``) writing failed: disk full (``errno`` ENOSPC;
            the message gives the space needed), no permission, an I/O error, or an error
            from safetensors while writing. The message names the folder and the cause; no
            partial directory is left behind and an existing ``out_dir`` is unchanged.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}.")
    save_dtype = resolve_save_dtype(dtype, format)
    max_bytes = parse_size(max_shard_size)
    sources = source_dirs(model, tokenizer)
    target = check_output_dir(out_dir, overwrite, sources)
    layers = find_quantized_layers(model)
    experts = find_quantized_experts(model)
    if not layers and not experts:
        raise CheckpointError("the model has no quantized (Int4WeightTensor) layers; quantize it first.")
    if experts and format != FORMAT_AWQ_AO:
        raise experts_format_error(sorted(experts), format)
    if format != FORMAT_AWQ_AO:  # the formats vLLM serves: say which layers its kernels refuse
        issues = marlin_issues(
            (n, q.out_features, q.in_features, q.weight.bits, q.weight.group_size) for n, q in layers.items()
        )
        if issues:
            warnings.warn(describe_issues(issues, format), stacklevel=2)
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
    if save_dtype is not None:
        items = [(k, _cast_float(k, t, save_dtype, format)) for k, t in items]
        config["dtype"] = str(save_dtype).removeprefix("torch.")
    items.sort(key=lambda kv: kv[0])
    metadata = {"format": "pt", "quant_format": format}
    if format == FORMAT_AWQ_AO:
        metadata["awq_ao_format_version"] = str(qc["format_version"])
    needed = sum(t.numel() * t.element_size() for _, t in items)
    try:
        with atomic_directory(target, overwrite, format, sources) as tmp:
            shard_names = _write_shards(tmp, items, max_bytes, metadata, progress)
            checksums.write_manifest(tmp, shard_names, format, config["quantization_config"], layers, experts)
            gen = getattr(model, "generation_config", None)
            if gen is not None and hasattr(gen, "to_dict"):
                write_json(tmp / "generation_config.json", gen.to_dict())
            for fname, obj in extra_json.items():
                write_json(tmp / fname, obj)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
            if model_card is not False:
                extra = model_card if isinstance(model_card, Mapping) else None
                bpw = _stored_bits_per_weight(items, layers, experts)
                card = make_model_card(model, target.name, format, config["quantization_config"], bpw, extra)
                (tmp / "README.md").write_text(card, encoding="utf-8")
            write_json(tmp / CONFIG_NAME, config)  # last: a directory without it is not a model
    except (FileExistsError, CheckpointWriteError):
        raise  # refusals and lost races: already clear, nothing was changed
    except (OSError, SafetensorError) as e:
        raise _write_error(target, e, needed) from e
    return target
