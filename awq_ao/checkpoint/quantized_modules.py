"""The quantized parts of an in-memory model that a save writes: INT4 linears
(:class:`QuantLayer`), INT4 MoE experts parameters (:class:`QuantExperts`), tied tensors, the
linears left in full precision, and checks of settings a format needs to be uniform."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from awq_ao.checkpoint.errors import CheckpointError
from awq_ao.lowering.int4_tensor import Int4WeightTensor
from awq_ao.lowering.scaled_input import ScaledInputLinear

__all__ = [
    "QuantLayer",
    "QuantExperts",
    "find_quantized_layers",
    "find_quantized_experts",
    "experts_format_error",
    "tensor_aliases",
    "float_linear_names",
    "uniform_setting",
    "zero_is_symmetric",
]


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
