"""``load_quantized``: rebuild a quantized ``*ForCausalLM`` from a saved directory.

The model is built from ``config.json`` with its parameters on the meta device (buffers that
are not saved, such as rotary ``inv_freq``, are computed normally); quantized linears are
swapped for ``nn.Linear`` modules holding :class:`~awq_ao.lowering.Int4WeightTensor` weights
(:class:`~awq_ao.lowering.scaled_input.ScaledInputLinear` where recorded); every tensor is then
read once from the memory-mapped safetensors shards. No full-precision copy of a quantized
weight is ever made.

The awq_ao format's load plan is in :mod:`~awq_ao.checkpoint.awq_ao_plan`, the building of
INT4 weights and modules in :mod:`~awq_ao.checkpoint.build_int4`, and ``checkpoint_summary`` in
:mod:`~awq_ao.checkpoint.summary`; their names are re-exported here.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from awq_ao.checkpoint import autoawq, compressed_tensors, validate
from awq_ao.checkpoint.awq_ao_plan import _check_version, _plan_awq_ao
from awq_ao.checkpoint.build_int4 import (
    _make_experts,
    _use_int4_experts_implementation,
    quantized_linear,
)
from awq_ao.checkpoint.formats import (
    FORMAT_AUTOAWQ,
    FORMAT_AWQ_AO,
    CheckpointError,
    ShardSet,
    detect_format,
    refuse_custom_code,
)
from awq_ao.checkpoint.hub import resolve_checkpoint
from awq_ao.checkpoint.summary import checkpoint_summary

__all__ = ["load_quantized", "build_empty_model", "checkpoint_summary", "quantized_linear"]


def _as_dtype(x: Any) -> torch.dtype | None:
    if isinstance(x, torch.dtype):
        return x
    if isinstance(x, str):
        d = getattr(torch, x.removeprefix("torch."), None)
        if isinstance(d, torch.dtype):
            return d
    return None


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Create every new ``nn.Parameter`` on the meta device; buffers stay real.

    Like accelerate's ``init_empty_weights(include_buffers=False)``: non-persistent buffers
    computed in ``__init__`` (rotary frequencies) keep their values, parameters cost nothing.
    """
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        p = module._parameters.get(name)
        if p is not None and p.device.type != "meta":
            module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def build_empty_model(path: str | os.PathLike, dtype: torch.dtype | None = None) -> nn.Module:
    """The ``*ForCausalLM`` described by ``path/config.json``, parameters on the meta device.

    Never runs code shipped with the folder: a ``config.json`` / ``tokenizer_config.json``
    with ``auto_map`` is refused with a :class:`CheckpointError` naming the file, and
    transformers is always called with ``trust_remote_code=False``.
    """
    import transformers

    refuse_custom_code(path)
    try:
        config = transformers.AutoConfig.from_pretrained(str(path), trust_remote_code=False)
    except Exception as e:  # transformers raises several types for unknown model types
        raise CheckpointError(f"{path}: cannot build a transformers config from config.json ({e}).") from e
    qc = getattr(config, "quantization_config", None)
    if qc is not None:
        delattr(config, "quantization_config")
    if dtype is None:
        dtype = _as_dtype(getattr(config, "dtype", None)) or _as_dtype(getattr(config, "torch_dtype", None))
    dtype = dtype or torch.float32
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
    with _parameters_on_meta(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if cls is not None and hasattr(cls, "_from_config"):
                model = cls._from_config(config, dtype=dtype)
            else:
                model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
        except Exception as e:
            raise CheckpointError(f"{path}: cannot build the model {arch or config.model_type!r} from config.json ({e}).") from e
    if qc is not None:
        model.config.quantization_config = qc
    return model


def _set_tensor(model: nn.Module, key: str, value: torch.Tensor) -> None:
    mod_name, _, attr = key.rpartition(".")
    mod = model.get_submodule(mod_name)
    if attr in mod._parameters:
        old = mod._parameters[attr]
        if isinstance(value, nn.Parameter):
            mod._parameters[attr] = value
        else:
            req = bool(old.requires_grad) if old is not None and value.is_floating_point() else False
            mod._parameters[attr] = nn.Parameter(value, requires_grad=req)
    elif attr in mod._buffers:
        mod._buffers[attr] = value
    else:
        raise CheckpointError(f"{key}: not a parameter or buffer of the model.")


def _get_tensor(model: nn.Module, key: str) -> torch.Tensor:
    mod_name, _, attr = key.rpartition(".")
    mod = model.get_submodule(mod_name)
    if attr in mod._parameters:
        return mod._parameters[attr]
    return mod._buffers[attr]


def _int8_weight(key: str, codes: torch.Tensor, scale: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """An :class:`~awq_ao.lowering.int8_tensor.Int8RowWeightTensor` from its stored tensors,
    refusing codes of -128 (never written) and scales that are not finite and > 0."""
    from awq_ao.lowering.int8_tensor import Int8RowWeightTensor

    codes, scale = codes.reshape(n, k).contiguous(), scale.reshape(n).to(torch.float32).contiguous()
    if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
        raise CheckpointError(f"tensor {key + '_scale'!r}: row scales must be finite and > 0; the checkpoint is corrupt.")
    if bool((codes == -128).any()):
        raise CheckpointError(f"tensor {key!r}: 8-bit codes lie in -127..127, found -128; the checkpoint is corrupt.")
    return Int8RowWeightTensor(codes, scale, torch.Size([n, k]), torch.float32)


def _non_persistent_buffer_names(model: nn.Module) -> set[str]:
    out = set()
    for mname, mod in model.named_modules():
        for b in mod._non_persistent_buffers_set:
            out.add(f"{mname}.{b}" if mname else b)
    return out


def load_quantized(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    progress: bool = False,
    verify: bool = False,
) -> nn.Module:
    """Load a quantized model saved by :func:`save_quantized` (or an AutoAWQ GEMM /
    compressed-tensors ``pack-quantized`` checkpoint) as a ready ``*ForCausalLM``.

    Args:
        path: the checkpoint directory, or a Hugging Face hub id (``owner/name``, read
            through the hub cache; only data files are fetched).
        device: where the model should live (``"cpu"``, ``"cuda"``, ...). Quantized weights
            are packed in the layout that device's kernels read.
        dtype: optional float dtype for activations, scales and float weights (default: the
            dtype recorded in ``config.json``).
        progress: show a progress bar.
        verify: also check the sha256 of every shard against the checksums saved with the
            checkpoint (``awq_ao_manifest.json``; catches flipped data bytes). Reads every byte
            once more: about 40% of a load's time, so off by default. Without it a load still
            checks everything but the tensor data's checksums: the quantization fields of
            ``config.json``, the shards' sizes and headers against the manifest, every layer's
            bits and group size against the ones it was saved with, and every scale (finite,
            > 0) and zero point (in range).

    Returns:
        The model in eval mode; ``model.config.quantization_config`` describes the checkpoint.
        It runs ``forward`` / ``generate`` like the original, and ``torch.compile`` works.

    Raises:
        CheckpointError: unknown format or version, missing or truncated shard, tensors that
            do not match the configuration (shape, dtype, missing or unknown keys), or a folder
            that asks for custom code (``auto_map`` in ``config.json`` or
            ``tokenizer_config.json``: awq_ao never runs code shipped with a checkpoint), invalid
            quantization fields (bits / group sizes that are not valid integers), metadata that
            differs from what was saved, NaN/Inf or non-positive scales, zero points out of
            range, or (with ``verify``) a checksum mismatch or no checksums to verify. The
            message names the file, the field or tensor, and what to do.
    """
    path = resolve_checkpoint(path)  # a folder, or a hub id through the Hugging Face cache
    device = torch.device(device)
    refuse_custom_code(path)  # before anything reads the folder with transformers
    fmt, qc = detect_format(path)
    shards = ShardSet(path)
    if fmt == FORMAT_AWQ_AO:
        _check_version(qc)  # fail before building the model
    validate.check_config(path, fmt, qc)  # issue 15: types and ranges of the quantization fields
    manifest = validate.check_manifest(path, fmt, qc, shards, verify=verify)  # what the save wrote
    model = build_empty_model(path)
    if fmt == FORMAT_AWQ_AO:
        plan = _plan_awq_ao(qc, shards, model)
    elif fmt == FORMAT_AUTOAWQ:
        plan = autoawq.plan_load(qc, shards, model)
    else:
        plan = compressed_tensors.plan_load(qc, shards, model)
    validate.check_plan(path, plan, manifest)  # before any weight is built

    # ---- validate every key before reading any data --------------------------------------------
    qweights = {f"{n}.weight" for n in plan.layers} | set(plan.experts) | set(plan.int8)
    expected: dict[str, torch.Tensor] = {}
    for key, t in model.state_dict(keep_vars=True).items():
        if key not in qweights and t is not None:
            expected[key] = t  # includes biases of quantized layers
    for name, lp in plan.layers.items():
        if lp.scaled_input:
            expected[f"{name}.input_scale"] = torch.empty(lp.in_features, device="meta")
    file_keys = set(shards.keys()) - plan.consumed
    hf_tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    ties: dict[str, str] = {}
    missing = []
    for key, t in expected.items():
        if key in file_keys:
            shape = shards.shape(key)
            if tuple(shape) != tuple(t.shape):
                raise CheckpointError(
                    f"tensor {key!r} has shape {list(shape)} in the checkpoint; the model built "
                    f"from config.json expects {list(t.shape)}."
                )
            if plan.strict_dtypes and t.is_floating_point() and shards.dtype(key) != t.dtype and not key.endswith(".input_scale"):
                raise CheckpointError(
                    f"tensor {key!r} is {str(shards.dtype(key)).removeprefix('torch.')} in the "
                    f"checkpoint; config.json says {str(t.dtype).removeprefix('torch.')}."
                )
        elif key in plan.tied and (plan.tied[key] in file_keys or plan.tied[key] in qweights):
            ties[key] = plan.tied[key]
        elif key in hf_tied and hf_tied[key] in file_keys:
            ties[key] = hf_tied[key]
        else:
            missing.append(key)
    if missing:
        raise CheckpointError(
            f"{len(missing)} tensor(s) missing from the checkpoint: {', '.join(missing[:6])}"
            + (" ..." if len(missing) > 6 else "")
        )
    non_persistent = _non_persistent_buffer_names(model)
    unknown = sorted(k for k in file_keys - set(expected) if k not in non_persistent)
    if unknown:
        raise CheckpointError(
            f"{len(unknown)} unknown tensor(s) in the checkpoint (not in the model built from "
            f"config.json): {', '.join(unknown[:6])}" + (" ..." if len(unknown) > 6 else "")
        )

    # ---- quantized layers ----------------------------------------------------------------------
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(plan.layers) + len(plan.experts) + len(expected), desc="loading", leave=False)
    for name, lp in plan.layers.items():
        old = model.get_submodule(name)
        has_bias = getattr(old, "bias", None) is not None
        data, scale, zero = lp.read()
        # the logical dtype is the model's (config.json); scales are stored in 16 bits
        wdtype = dtype if dtype is not None else old.weight.dtype
        # bias and input_scale are filled with the other tensors below
        bias = torch.empty(lp.out_features, device="meta", dtype=wdtype) if has_bias else None
        input_scale = torch.empty(lp.in_features, device="meta", dtype=wdtype) if lp.scaled_input else None
        new = quantized_linear(lp, data, scale, zero, device, wdtype, bias, input_scale)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
        if bar is not None:
            bar.update(1)

    switched: dict[int, nn.Module] = {}
    for key, ep in plan.experts.items():
        mod_name, _, attr = key.rpartition(".")
        mod = model.get_submodule(mod_name)
        data, scale, zero = ep.read()
        old_dtype = mod._parameters[attr].dtype
        w = _make_experts(ep, data, scale, zero, device, dtype if dtype is not None else old_dtype)
        mod._parameters[attr] = nn.Parameter(w, requires_grad=False)
        switched[id(mod)] = mod
        if bar is not None:
            bar.update(1)
    for mod in switched.values():
        _use_int4_experts_implementation(mod)
    for key, (n, k) in plan.int8.items():
        w = _int8_weight(key, shards.get(key), shards.get(f"{key}_scale"), n, k)
        _set_tensor(model, key, nn.Parameter(w._convert(device, dtype or _get_tensor(model, key).dtype), requires_grad=False))

    # ---- everything else -----------------------------------------------------------------------
    for key, t in expected.items():
        if key in ties:
            continue
        value = shards.get(key)
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        elif not plan.strict_dtypes and value.is_floating_point() and value.dtype != t.dtype:
            value = value.to(t.dtype)
        if key.endswith(".input_scale") and key.rpartition(".")[0] in plan.layers:
            value = value.to(_get_tensor(model, key.rpartition(".")[0] + ".weight").dtype)
        if value.device != device:
            value = value.to(device)
        _set_tensor(model, key, value)
        if bar is not None:
            bar.update(1)
    for key, src in ties.items():
        _set_tensor(model, key, _get_tensor(model, src))
    if bar is not None:
        bar.close()
    shards.close()

    # ---- final checks ------------------------------------------------------------------------
    left = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    left += [n for n, b in model.named_buffers() if b.device.type == "meta"]
    if left:
        raise CheckpointError(f"tensors not filled from the checkpoint: {', '.join(left[:6])}")
    for mod in model.modules():
        for bname, b in list(mod._buffers.items()):
            if b is not None and b.device != device:
                mod._buffers[bname] = b.to(device)
    if dtype is not None:
        model.config.dtype = dtype
    model.config.quantization_config = qc
    gen = path / "generation_config.json"
    if gen.is_file() and hasattr(model, "generation_config"):
        try:
            from transformers import GenerationConfig

            model.generation_config = GenerationConfig.from_pretrained(str(path))
        except Exception as e:  # a bad generation config must not block loading the weights
            warnings.warn(f"ignoring {gen}: {e}", stacklevel=2)
    model.eval()
    return model
