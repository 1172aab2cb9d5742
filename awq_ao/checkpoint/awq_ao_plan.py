"""The load plan of a checkpoint in awq_ao's own format: the quantized linears and INT4 MoE
experts parameters ``quantization_config`` lists, every file key's shape and dtype checked
against the model built from ``config.json`` (no tensor data read)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from awq_ao.checkpoint.formats import (
    FORMAT_VERSION,
    CheckpointError,
    ExpertsPlan,
    LayerPlan,
    LoadPlan,
    ShardSet,
    codes_shape,
    quantized_keys,
)
from awq_ao.lowering.quant_math import num_groups

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


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
    _plan_awq_ao_int8(qc, shards, model, plan)
    return plan


def _plan_awq_ao_int8(qc: dict[str, Any], shards: ShardSet, model: nn.Module, plan: LoadPlan) -> None:
    """Add the 8-bit row-wise weights listed in ``int8_weights`` (``head="int8"``) to ``plan``:
    codes ``[N, K, 1]`` int8 and ``{key}_scale`` ``[N, 1]`` float32 for a 2-D ``[N, K]`` weight."""
    for key in qc.get("int8_weights") or []:
        mod_name, _, attr = key.rpartition(".")
        try:
            p = model.get_submodule(mod_name)._parameters.get(attr)
        except AttributeError:
            p = None
        if p is None or p.dim() != 2:
            raise CheckpointError(f"config lists the 8-bit weight {key!r}, but the model built from config.json has no 2-D parameter there.")
        n, k = (int(d) for d in p.shape)
        shards.expect(key, (n, k, 1), (torch.int8,))
        shards.expect(f"{key}_scale", (n, 1), (torch.float32,))
        plan.int8[key] = (n, k)
        plan.consumed |= {key, f"{key}_scale"}


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
