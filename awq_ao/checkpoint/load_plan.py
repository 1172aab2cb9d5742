"""Load plans: what each format reader hands the generic loader (the quantized linears and
experts parameters to build, how to read them, and which file keys they use)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from awq_ao.checkpoint.errors import CheckpointError
from awq_ao.lowering.quant_math import num_groups

__all__ = ["LayerPlan", "ExpertsPlan", "LoadPlan", "check_layer_geometry"]


@dataclass
class LayerPlan:
    """One quantized linear to build on load.

    ``read()`` returns ``(data, scale, zero)`` where ``data`` is either ``uint8 [N, K]`` codes
    or, if ``nibble_packed``, ``uint8 [N, ceil(K/2)]`` in the canonical nibble layout.
    """

    name: str
    bits: int
    group_size: int
    out_features: int
    in_features: int
    read: Any
    nibble_packed: bool = False
    scaled_input: bool = False
    #: awq_ao format only: the file keys ``(codes, scale, zero)`` (see :func:`quantized_keys`)
    keys: tuple[str, ...] = ()


@dataclass
class ExpertsPlan:
    """One quantized 3-D experts parameter (``key`` = ``module.attr``) to build on load.

    ``read()`` returns ``(data, scale, zero)``: ``data`` uint8 ``[E, N, ceil(K/2)]`` (canonical
    nibble layout, ``nibble_packed``) or ``[E, N, K]`` codes; ``scale`` / ``zero`` ``[E, N, G]``.
    Slabs are ``[out, in]``; ``transposed`` means the parameter's shape is ``[E, in, out]``.
    """

    key: str
    bits: int
    group_size: int
    num_experts: int
    out_features: int
    in_features: int
    transposed: bool
    read: Any
    nibble_packed: bool = True
    #: awq_ao format only: the file keys ``(codes, scale, zero)`` (see :func:`quantized_keys`)
    keys: tuple[str, ...] = ()


@dataclass
class LoadPlan:
    """What a format reader found: quantized layers, keys they use, and key handling rules."""

    layers: dict[str, LayerPlan] = field(default_factory=dict)
    experts: dict[str, ExpertsPlan] = field(default_factory=dict)
    int8: dict[str, tuple[int, int]] = field(default_factory=dict)  # 8-bit row-wise weights: key -> (N, K)
    consumed: set[str] = field(default_factory=set)
    tied: dict[str, str] = field(default_factory=dict)
    strict_dtypes: bool = True


def check_layer_geometry(
    name: str, n: int, k: int, bits: int, group_size: int, scale_shape: tuple[int, ...]
) -> None:
    """Raise :class:`CheckpointError` unless ``scale_shape`` is ``[N, G]`` for this layer."""
    g = num_groups(k, group_size)
    if tuple(scale_shape) != (n, g):
        raise CheckpointError(
            f"{name}: scales of shape {list(scale_shape)} do not match a [{n}, {k}] weight with "
            f"group_size={group_size} (expected [{n}, {g}])."
        )
