"""``load_quantized``: rebuild a quantized ``*ForCausalLM`` from a saved directory.

The model is built from ``config.json`` with its parameters on the meta device (buffers that
are not saved, such as rotary ``inv_freq``, are computed normally); quantized linears are
swapped for ``nn.Linear`` modules holding :class:`~awq_ao.lowering.Int4WeightTensor` weights
(:class:`~awq_ao.lowering.scaled_input.ScaledInputLinear` where recorded); every tensor is then
read once from the memory-mapped safetensors shards. No full-precision copy of a quantized
weight is ever made.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from awq_ao.checkpoint import autoawq, compressed_tensors, validate
from awq_ao.checkpoint.formats import (
    FORMAT_AUTOAWQ,
    FORMAT_AWQ_AO,
    FORMAT_VERSION,
    CheckpointError,
    ExpertsPlan,
    LayerPlan,
    LoadPlan,
    ShardSet,
    codes_shape,
    detect_format,
    quantized_keys,
    refuse_custom_code,
)
from awq_ao.checkpoint.hub import resolve_checkpoint
from awq_ao.lowering import packing
from awq_ao.lowering.int4_experts import IMPLEMENTATION
from awq_ao.lowering.int4_tensor import Int4WeightTensor, round_scale, scale_storage_dtype
from awq_ao.lowering.quant_math import num_groups
from awq_ao.lowering.scaled_input import ScaledInputLinear

__all__ = ["load_quantized", "build_empty_model", "checkpoint_summary", "quantized_linear"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


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


def _linear_shape(name: str, mod: nn.Module) -> tuple[int, int]:
    if isinstance(mod, nn.Linear):
        return mod.out_features, mod.in_features
    if type(mod).__name__ == "Conv1D":
        k, n = mod.weight.shape
        return int(n), int(k)
    raise CheckpointError(f"{name}: listed as quantized, but the model built from config.json has a {type(mod).__name__} there.")


def _check_version(qc: dict[str, Any]) -> None:
    version = qc.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"quantization_config.format_version is {version!r}; expected an integer >= 1.")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"unsupported awq_ao checkpoint format version {version}: this awq_ao reads versions "
            f"up to {FORMAT_VERSION}; upgrade awq_ao."
        )


def _plan_awq_ao(qc: dict[str, Any], shards: ShardSet, model: nn.Module) -> LoadPlan:
    """The :class:`LoadPlan` of an awq_ao checkpoint (every key's shape and dtype checked
    against the model built from ``config.json``; no data read)."""
    _check_version(qc)
    version = int(qc["format_version"])
    try:
        bits, gs = int(qc["bits"]), int(qc["group_size"])
        qmods = list(qc["quantized_modules"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"quantization_config is incomplete: {e!r} missing or invalid.") from e
    scaled = set(qc.get("scaled_input_modules") or [])
    if scaled - set(qmods):
        raise CheckpointError(f"scaled_input_modules not in quantized_modules: {sorted(scaled - set(qmods))}")
    overrides = qc.get("module_overrides") or {}
    plan = LoadPlan(strict_dtypes=True, tied=dict(qc.get("tied_weights") or {}))
    for name in qmods:
        try:
            mod = model.get_submodule(name)
        except AttributeError as e:
            raise CheckpointError(f"config lists quantized module {name!r}, but the model built from config.json has none.") from e
        n, k = _linear_shape(name, mod)
        b = int(overrides.get(name, {}).get("bits", bits))
        g = int(overrides.get(name, {}).get("group_size", gs))
        ng = num_groups(k, g)
        keys = quantized_keys(f"{name}.weight", version)
        shards.expect(keys[0], codes_shape((), n, k, b, version), (torch.uint8,))
        shards.expect(keys[1], (n, ng), _FLOAT_DTYPES)
        shards.expect(keys[2], (n, ng), (torch.uint8,))

        def read(keys: tuple[str, ...] = keys, n: int = n, k: int = k) -> tuple:
            codes = shards.get(keys[0])
            return (codes.reshape(n, k) if codes.dim() == 3 else codes), shards.get(keys[1]), shards.get(keys[2])

        plan.layers[name] = LayerPlan(
            name, b, g, n, k, read, nibble_packed=b <= 4, scaled_input=name in scaled, keys=keys
        )
        plan.consumed |= set(keys)
    _plan_awq_ao_experts(qc, shards, model, plan)
    return plan


def _plan_awq_ao_experts(qc: dict[str, Any], shards: ShardSet, model: nn.Module, plan: LoadPlan) -> None:
    """Add the INT4 MoE experts parameters listed in ``quantized_experts`` to ``plan``."""
    entries = qc.get("quantized_experts") or {}
    if not isinstance(entries, dict):
        raise CheckpointError("quantization_config.quantized_experts must map parameter names to settings.")
    for key, opts in entries.items():
        mod_name, _, attr = key.rpartition(".")
        try:
            mod = model.get_submodule(mod_name)
        except AttributeError as e:
            raise CheckpointError(f"config lists quantized experts {key!r}, but the model built from config.json has no {mod_name!r}.") from e
        p = mod._parameters.get(attr)
        if p is None or p.dim() != 3:
            raise CheckpointError(f"config lists quantized experts {key!r}, but the model built from config.json has no 3-D parameter there.")
        try:
            b, g, transposed = int(opts["bits"]), int(opts["group_size"]), bool(opts["transposed"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"quantized_experts[{key!r}] is incomplete: {e!r} missing or invalid.") from e
        if transposed != bool(getattr(mod, "is_transposed", transposed)):
            raise CheckpointError(f"{key}: stored transposed={transposed}, but the model's experts module has is_transposed={mod.is_transposed}.")
        e, a, c = (int(d) for d in p.shape)
        n, k = (c, a) if transposed else (a, c)
        ng = num_groups(k, g)
        version = int(qc["format_version"])
        keys = quantized_keys(key, version)
        shards.expect(keys[0], codes_shape((e,), n, k, b, version), (torch.uint8,))
        shards.expect(keys[1], (e, n, ng), _FLOAT_DTYPES)
        shards.expect(keys[2], (e, n, ng), (torch.uint8,))

        def read(keys: tuple[str, ...] = keys, shape: tuple[int, ...] = (e, n, k)) -> tuple:
            codes = shards.get(keys[0])
            return (codes.reshape(shape) if codes.dim() == 4 else codes), shards.get(keys[1]), shards.get(keys[2])

        plan.experts[key] = ExpertsPlan(key, b, g, e, n, k, transposed, read, nibble_packed=b <= 4, keys=keys)
        plan.consumed |= set(keys)


def _make_experts(
    ep: ExpertsPlan, data: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, device: torch.device, dtype: torch.dtype
) -> Int4WeightTensor:
    """The 3-D :class:`Int4WeightTensor` of ``ep`` from its stored tensors, one slab per expert
    (each built like a quantized linear's weight, in the layout ``device`` reads)."""
    slabs = []
    for e in range(ep.num_experts):
        lp = LayerPlan(f"{ep.key}[{e}]", ep.bits, ep.group_size, ep.out_features, ep.in_features, None, ep.nibble_packed)
        slabs.append(_make_weight(lp, data[e], scale[e], zero[e], device, dtype))
    return Int4WeightTensor.from_slabs(slabs, ep.transposed)


def _use_int4_experts_implementation(mod: nn.Module) -> None:
    """Switch one experts module to the ``"awq_ao_int4"`` implementation through a copy of
    its config (the model's shared config, and every other module, keep theirs)."""
    cfg = getattr(mod, "config", None)
    if cfg is None:
        raise CheckpointError(f"{type(mod).__name__}: experts module without a config; cannot select the INT4 experts implementation.")
    cfg = copy.copy(cfg)
    cfg._experts_implementation_internal = IMPLEMENTATION
    mod.config = cfg


def _make_weight(
    lp: LayerPlan, data: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, device: torch.device, dtype: torch.dtype
) -> Int4WeightTensor:
    n, k = lp.out_features, lp.in_features
    # scales keep the checkpoint's 16-bit dtype where the layout allows (exact imports)
    scale = scale.to(device=device).contiguous()
    zero = zero.to(device=device).contiguous()
    layout = packing.choose_layout(device, lp.bits, n, k, lp.group_size)
    try:
        if lp.nibble_packed:
            if layout == packing.LAYOUT_NIBBLE and lp.bits == 4:
                # no repacking: build directly (from_codes would validate the zero points)
                if zero.numel() and (float(zero.min()) < 0 or float(zero.max()) > 2**lp.bits - 1):
                    raise CheckpointError(f"{lp.name}: zero points outside [0, {2**lp.bits - 1}].")
                sdt = scale_storage_dtype(dtype, packing.LAYOUT_NIBBLE, scale.dtype)
                return Int4WeightTensor(
                    data.to(device).contiguous(), lp.bits, lp.group_size,
                    packing.LAYOUT_NIBBLE, "", torch.Size([n, k]), dtype,
                    round_scale(scale, sdt).to(sdt), zero.round().to(torch.uint8),
                )
            codes = packing.unpack(data, lp.bits, packing.LAYOUT_NIBBLE, n, k)
        else:
            codes = data
        return Int4WeightTensor.from_codes(
            codes.to(device), scale, zero, lp.bits, lp.group_size, dtype, layout=layout
        )
    except (ValueError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{lp.name}: invalid quantized weight ({e}).") from e


def quantized_linear(
    lp: LayerPlan,
    data: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    device: torch.device,
    dtype: torch.dtype,
    bias: torch.Tensor | None,
    input_scale: torch.Tensor | None = None,
) -> nn.Module:
    """The eval-mode ``nn.Linear`` (or :class:`ScaledInputLinear` where ``lp.scaled_input``)
    holding the :class:`Int4WeightTensor` built from a layer's stored tensors.

    ``bias`` / ``input_scale`` may be meta tensors, filled later by the caller.
    """
    w = _make_weight(lp, data, scale, zero, device, dtype)
    lin = nn.Linear(lp.in_features, lp.out_features, bias=False, device="meta", dtype=dtype)
    lin.weight = nn.Parameter(w, requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach().to(dtype=dtype), requires_grad=bool(getattr(bias, "requires_grad", False)))
    new: nn.Module = lin
    if lp.scaled_input:
        if input_scale is None:
            raise CheckpointError(f"{lp.name}: recorded as a ScaledInputLinear, but no input_scale was given.")
        new = ScaledInputLinear(lin, input_scale)
    new.train(False)
    return new


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
    qweights = {f"{n}.weight" for n in plan.layers} | set(plan.experts)
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


def checkpoint_summary(path: str | os.PathLike) -> dict[str, Any]:
    """What a checkpoint holds, from ``config.json`` and the shard headers (no weights read).

    Keys: ``format``, ``architecture``, ``bits``, ``group_size``, ``zero_point``,
    ``quantized_layers`` (names), ``quantized_experts`` (3-D INT4 MoE expert parameters,
    awq_ao format), ``scaled_input_layers``, ``float_linears`` (if recorded),
    ``size_bytes`` (all files), ``tensor_bytes``, ``shards``, ``dtype``.
    """
    from awq_ao.checkpoint.formats import read_config

    path = resolve_checkpoint(path)
    fmt, qc = detect_format(path)
    cfg = read_config(path)
    shards = ShardSet(path)
    out: dict[str, Any] = {
        "path": str(path),
        "format": fmt,
        "architecture": (cfg.get("architectures") or [cfg.get("model_type")])[0],
        "dtype": cfg.get("dtype") or cfg.get("torch_dtype"),
        "shards": list(shards.files),
        "size_bytes": sum(p.stat().st_size for p in path.iterdir() if p.is_file()),
        "tensor_bytes": shards.total_bytes(),
    }
    if fmt == FORMAT_AWQ_AO:
        out.update(
            format_version=qc.get("format_version"),
            bits=qc.get("bits"),
            group_size=qc.get("group_size"),
            zero_point=qc.get("zero_point"),
            quantized_layers=list(qc.get("quantized_modules") or []),
            scaled_input_layers=list(qc.get("scaled_input_modules") or []),
            float_linears=list(qc.get("modules_to_not_convert") or []),
            module_overrides=qc.get("module_overrides") or {},
            quantized_experts=sorted(qc.get("quantized_experts") or {}),
        )
    elif fmt == FORMAT_AUTOAWQ:
        out.update(
            bits=qc.get("bits", qc.get("w_bit")),
            group_size=qc.get("group_size", qc.get("q_group_size")),
            zero_point=qc.get("zero_point"),
            version=qc.get("version"),
            quantized_layers=sorted(k[: -len(".qweight")] for k in shards.keys() if k.endswith(".qweight")),
            scaled_input_layers=[],
            float_linears=list(qc.get("modules_to_not_convert") or []),
        )
    else:
        groups = qc.get("config_groups") or {}
        w = next(iter(groups.values()), {}).get("weights", {}) if groups else {}
        out.update(
            bits=w.get("num_bits"),
            group_size=w.get("group_size") if w.get("strategy") == "group" else -1,
            zero_point=not w.get("symmetric", True),
            quantized_layers=sorted(
                k[: -len(".weight_packed")] for k in shards.keys() if k.endswith(".weight_packed")
            ),
            scaled_input_layers=[],
            float_linears=list(qc.get("ignore") or []),
        )
    out.setdefault("quantized_experts", [])
    out["num_quantized_layers"] = len(out["quantized_layers"])
    out["num_quantized_experts"] = len(out["quantized_experts"])
    out["num_tensors"] = len(shards.keys())
    out["num_stored_elements"] = sum(math.prod(shards.shape(k)) for k in shards.keys())
    out.update(_footprint(shards, out["quantized_layers"], fmt, out.get("bits")))
    return out


def _footprint(shards: ShardSet, layers: list[str], fmt: str, bits: int | None) -> dict[str, Any]:
    """Bytes of the quantized layers' tensors (codes, scales, zeros), the logical weights they
    hold, bits per weight, and the bytes of everything else (kept in full precision).

    The weight count comes from ``weight_shape`` (compressed-tensors), or from the packed codes
    (awq_ao: the uint8 ``m.weight``, ``m.weight_packed`` before format version 3):
    two per byte for awq_ao's nibble layout (bits <= 4; an odd K counts half a code more),
    one per byte above, eight per int32 ``qweight`` element (AutoAWQ).
    """
    prefixes = {f"{n}." for n in layers}
    q_bytes, q_weights = 0, 0
    for key in shards.keys():
        prefix = key[: key.rfind(".") + 1]
        if prefix not in prefixes or key.endswith(".bias"):
            continue
        q_bytes += math.prod(shards.shape(key)) * shards.dtype(key).itemsize
        if key.endswith(".weight_shape"):
            q_weights += int(math.prod(shards.get(key).tolist()))
        elif key.endswith(".qweight"):
            q_weights += 8 * math.prod(shards.shape(key))
        elif fmt == FORMAT_AWQ_AO and shards.dtype(key) == torch.uint8 and key.endswith((".weight", ".weight_packed")):
            q_weights += (2 if (bits or 4) <= 4 else 1) * math.prod(shards.shape(key))
    total = sum(math.prod(shards.shape(k)) * shards.dtype(k).itemsize for k in shards.keys())
    return {
        "quantized_bytes": q_bytes,
        "quantized_weights": q_weights,
        "bits_per_weight": round(8 * q_bytes / q_weights, 3) if q_weights else None,
        "full_precision_bytes": total - q_bytes,
    }
