"""``save_quantized``: write a quantized model as a transformers-style directory, atomically.

The tensors and config each format writes (and the save dtype) are built in
:mod:`~awq_ao.checkpoint.save_tensors` and write failures become one error in
:mod:`~awq_ao.checkpoint.write_errors`; their names are re-exported here. The folder itself is
claimed or swapped by :mod:`~awq_ao.checkpoint.atomic_dir`.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn

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
    FORMATS,
    INDEX_FILE,
    SINGLE_FILE,
    CheckpointError,
    CheckpointWriteError,
    experts_format_error,
    find_quantized_experts,
    find_quantized_layers,
    float_linear_names,
)
from awq_ao.checkpoint.model_card import model_card as make_model_card
from awq_ao.checkpoint.save_tensors import (
    _awq_ao_config,
    _awq_ao_experts_tensors,
    _awq_ao_int8_tensors,
    _awq_ao_weight_tensors,
    _cast_float,
    _config_dict,
    _float_tensors,
    _stored_bits_per_weight,
    int8_weights,
    refuse_int8_head,
    resolve_save_dtype,
)
from awq_ao.checkpoint.vllm_compat import describe_issues, marlin_issues
from awq_ao.checkpoint.write_errors import _write_error
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
    if format != FORMAT_AWQ_AO:
        refuse_int8_head(model, f"format={format!r}")
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
        int8 = int8_weights(model)
        items, aliases = _float_tensors(model, layers, keep_aliases=True, experts=experts, int8_keys=set(int8))
        for layer in layers.values():
            items.extend(_awq_ao_weight_tensors(layer).items())
        for qe in experts.values():
            items.extend(_awq_ao_experts_tensors(qe).items())
        for key, w in int8.items():
            items.extend(_awq_ao_int8_tensors(key, w).items())
        qc = _awq_ao_config(model, layers, aliases, experts, set(int8))
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
